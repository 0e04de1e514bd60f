//! The `deltadoc` binary end to end on the committed full-vocabulary fixture (real tokenizer,
//! real chat template, real stop tokens): `model import`, `tokenize`, `generate`, `model logits`.

mod common;

use common::*;

const PROMPT: &str = "Summarise: the Supplier delivers 100 units by 1 March 2027.";

#[test]
fn import_then_generate_reproduces_the_reference_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let m = model.to_str().unwrap();
    let hf = fixture_dir("fullvocab").join("hf");
    deltadoc(&["model", "import", hf.to_str().unwrap(), "--out", m]);
    let g = Golden::load("fullvocab");

    // The chat prompt is tokenised exactly as the reference template + tokenizer do.
    let ids: Vec<u32> = serde_json::from_slice(&deltadoc(&["tokenize", "--model", m, "--chat", PROMPT]).stdout).unwrap();
    assert_eq!(ids, g.ids("chat.prompt"));

    // Greedy generation with the real stop tokens streams the reference's reply.
    let out = deltadoc(&["generate", "--model", m, "--prompt", PROMPT, "--max-new-tokens", "24"]);
    let mut want_tokens = g.ids("chat.greedy");
    let stopped = want_tokens.last().is_some_and(|t| deltadoc::tokenizer::STOP_TOKENS.contains(t));
    if stopped {
        want_tokens.pop();
    }
    let tok = open(&model).tokenizer().unwrap();
    let want = tok.decode(&want_tokens).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), want);

    // Logits of the prompt's last position: the reference's top 16, within 1e-4.
    let ids_file = tmp.path().join("ids.json");
    std::fs::write(&ids_file, serde_json::to_string(&ids).unwrap()).unwrap();
    let npy = tmp.path().join("logits.npy");
    deltadoc(&[
        "model",
        "logits",
        "--model",
        m,
        "--ids-file",
        ids_file.to_str().unwrap(),
        "--out",
        npy.to_str().unwrap(),
        "--prefill-chunk",
        "16",
    ]);
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains(&format!("'shape': ({}, 248320)", ids.len())), "{header}");
    let data: Vec<f32> = bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let last = &data[(ids.len() - 1) * 248320..];
    let (_, top_logits) = g.f32("chat.top_logits");
    for (id, want) in g.ids("chat.top_ids").iter().zip(top_logits) {
        let got = last[*id as usize];
        assert!((got - want).abs() <= 1e-4, "logit of token {id}: {got} vs {want}");
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = deltadoc_output;
    // Not a model folder.
    let out = run(&["generate", "--model", tmp.path().to_str().unwrap(), "--prompt", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a deltadoc model folder"), "{err}");
    // Token ids outside the vocabulary.
    let model = tmp.path().join("m");
    deltadoc(&["model", "import", fixture_dir("dense4").join("hf").to_str().unwrap(), "--out", model.to_str().unwrap()]);
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, "[1, 2, 99999]").unwrap();
    let out =
        run(&["model", "logits", "--model", model.to_str().unwrap(), "--ids-file", ids.to_str().unwrap(), "--out", "/dev/null"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("token id 99999 is outside the vocabulary"), "{err}");
}

#[test]
fn block_size_is_checked_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = fixture_dir("dense4").join("hf");
    let (hf, out) = (hf.to_str().unwrap(), tmp.path().join("m"));
    let import = |extra: &[&str]| {
        let mut args = vec!["model", "import", hf, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        deltadoc_output(&args)
    };
    let o = import(&["--block-size", "64"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--block-size applies to --precision int8 or int4, not fp32"), "{err}");
    let o = import(&["--precision", "int4", "--block-size", "48"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not a block length ONNX Runtime's MatMulNBits takes"), "{err}");
    let o = import(&["--precision", "int8", "--block-size", "64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = open(&out);
    assert_eq!((m.manifest.quant_block, m.manifest.precision_label().as_str()), (Some(64), "int8 (blocks of 64)"));
    // Every matmul of the graph, all deltadoc's QuantMatMul since format 5, carries it too.
    use prost::Message;
    let bytes = std::fs::read(out.join("model.onnx")).unwrap();
    let graph = deltadoc::onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
    assert!(!graph.node.iter().any(|n| n.op_type == "MatMulNBits"), "a projection on MatMulNBits");
    let blocks: Vec<i64> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "QuantMatMul")
        .flat_map(|n| n.attribute.iter().filter(|a| a.name == "block_size").map(|a| a.i))
        .collect();
    assert!(!blocks.is_empty() && blocks.iter().all(|&b| b == 64), "{blocks:?}");
    let v = bench_json(&out, &["--gen-tokens", "3"]);
    assert_eq!(v["quant_block"], 64);
    // The two decode steps ran every QuantMatMul node once each and read all of its packed
    // weights (no constraint: the head's every panel).
    let attr = |n: &deltadoc::onnx::proto::NodeProto, name: &str| n.attribute.iter().find(|a| a.name == name).unwrap().i as usize;
    let packed: usize = graph
        .node
        .iter()
        .filter(|n| n.op_type == "QuantMatMul")
        .map(|n| {
            deltadoc::ops::quant_matmul::Weights::packed_len(
                attr(n, "N"),
                attr(n, "K"),
                attr(n, "bits") as u32,
                attr(n, "block_size"),
            )
            .unwrap()
        })
        .sum();
    let ops = v["decode_ops"].as_array().unwrap();
    let matmul = ops.iter().find(|t| t["op"] == "QuantMatMul").expect("QuantMatMul in decode_ops");
    assert_eq!(matmul["calls"].as_u64().unwrap() as usize, 2 * blocks.len(), "{matmul}");
    assert_eq!(matmul["weight_bytes"].as_u64().unwrap() as usize, 2 * packed, "{matmul}");
}

/// `deltadoc model info` plans a context and says how many calls on it the budget holds decoded
/// together: each beside the plan with its own cache and state.
#[test]
fn model_info_plans_a_context_and_the_calls_decoded_together() {
    let model = imported("gqa8", deltadoc::model::quant::Precision::Int8);
    let info = |budget: &str| -> serde_json::Value {
        let args = ["model", "info", "--model", model.to_str().unwrap(), "--context", "1000", "--budget", budget];
        serde_json::from_slice(&deltadoc(&args).stdout).unwrap()
    };
    let v = info("64GiB");
    let mem = &v["memory"];
    let sequence = mem["kv_bytes_per_token"].as_u64().unwrap() * 1000 + mem["linear_state_bytes"].as_u64().unwrap();
    assert_eq!(v["batch"]["sequence_bytes"].as_u64(), Some(sequence), "{v}");
    let plan = v["plan"]["total_bytes"].as_u64().unwrap();
    assert_eq!(v["plan"]["context_tokens"], 1000);
    // Two and a half sequences' room beside the plan: two together; none: one at a time; less
    // than the plan: nothing runs.
    for (budget, together) in [(plan + 5 * sequence / 2, 2), (plan, 1), (plan - 1, 0)] {
        let v = info(&budget.to_string());
        assert_eq!(v["batch"]["calls_together_within_budget"], together, "budget {budget}: {}", v["batch"]);
        assert_eq!(v["fits_budget"], together > 0);
    }
}

/// `deltadoc bench --json` on `model` with 130 random prompt tokens, plus `extra` flags.
fn bench_json(model: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["bench", "--model", model.to_str().unwrap(), "--prompt-tokens", "130", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_slice(&deltadoc(&args).stdout).unwrap()
}

#[test]
fn bench_reports_the_documented_json_keys() {
    let model = imported("gqa8", deltadoc::model::quant::Precision::Fp32);
    let v = bench_json(&model, &["--gen-tokens", "5", "--prefill-chunk", "64", "--threads", "2"]);
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_rss_bytes", "kv_state_bytes"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} = {}", v[key]);
    }
    // KV for the 134 tokens fed (130 prompt + 4 decode steps) in the two attention layers, plus
    // the DeltaNet states.
    let f = deltadoc::model::plan::Footprint::of(&open(&model));
    let want = f.kv_bytes_per_token() as usize * (130 + 4) + f.cfg.linear_state_bytes();
    assert_eq!(v["kv_state_bytes"].as_u64().unwrap() as usize, want);
    assert!(v["prefix_reuse_ratio"].is_null() && v["stages_together_s"].is_null());
    // The four decode steps' time by deltadoc's operators: each DeltaNet layer (6 of gqa8's 8)
    // ran its conv and rule once a step, each attention layer its attention; an fp32 graph has no
    // QuantMatMul. Together they took part of the steps' time, not more.
    let ops = v["decode_ops"].as_array().unwrap();
    let calls = |op: &str| ops.iter().find(|t| t["op"] == op).map(|t| t["calls"].as_u64().unwrap());
    assert_eq!(
        [calls("GatedDeltaRule"), calls("CausalConv1dWithState"), calls("CausalAttention"), calls("QuantMatMul")],
        [Some(24), Some(24), Some(8), None],
        "{ops:?}"
    );
    let ours: f64 = ops.iter().map(|t| t["seconds"].as_f64().unwrap()).sum();
    assert!(ours > 0.0 && ours < v["decode_s"].as_f64().unwrap(), "{ops:?} in {}", v["decode_s"]);
    // Each call handed its work to the pool in parallel sections (the rule once: a single token's
    // q/k normalisation stays on the calling thread), which took part of the calls' time, and
    // their tasks ran for some of it.
    for t in ops {
        let (calls, sections) = (t["calls"].as_u64().unwrap(), t["sections"].as_u64().unwrap());
        assert!(sections >= calls, "{t}");
        assert!(t["op"] != "GatedDeltaRule" || sections == calls, "{t}");
        let [seconds, in_sections, tasks] = ["seconds", "section_seconds", "task_seconds"].map(|k| t[k].as_f64().unwrap());
        assert!(0.0 < in_sections && in_sections <= seconds && tasks > 0.0, "{t}");
    }
    // ONNX Runtime's own profile, asked for: a trace with every run and node.
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("ort");
    bench_json(&model, &["--gen-tokens", "2", "--ort-profile", prefix.to_str().unwrap()]);
    let traces: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(traces.len(), 1, "{traces:?}");
    let trace = std::fs::read_to_string(&traces[0]).unwrap();
    assert!(trace.contains("\"model_run\"") && trace.contains("GatedDeltaRule"), "{}", &trace[..trace.len().min(500)]);
    // Three stages on one prefilled prompt: each pays only its instruction and decode.
    let v = bench_json(&model, &["--gen-tokens", "3", "--stages", "3", "--stage-tokens", "8"]);
    assert_eq!(v["stage_s"].as_array().unwrap().len(), 3);
    assert!(v["prefix_reuse_ratio"].as_f64().unwrap() >= 1.0);
    assert!(v["snapshot_bytes"].as_u64().unwrap() > 0);
    // Then decoded together as the pipeline runs them (timed, not judged: benches/RESULTS.md).
    assert!(v["stages_together_s"].as_f64().is_some_and(|s| s > 0.0), "{v}");
    assert!(v["stages_together_ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    // Three sequences decoded together for as many steps as the one: each step runs every
    // operator once for all three, so the calls are the single sequence's.
    let v = bench_json(&model, &["--gen-tokens", "5", "--batch", "3"]);
    assert_eq!(v["batch"], 3);
    assert!(v["batch_decode_tokens_per_s"].as_f64().is_some_and(|x| x > 0.0), "{}", v["batch_decode_tokens_per_s"]);
    let ops = v["batch_decode_ops"].as_array().unwrap();
    let rule = ops.iter().find(|t| t["op"] == "GatedDeltaRule").expect("GatedDeltaRule in batch_decode_ops");
    assert_eq!(rule["calls"], 24, "{rule}");
    assert!(bench_json(&model, &["--gen-tokens", "2"])["batch_decode_tokens_per_s"].is_null());
}
