//! The importer refuses checkpoints that do not match their config, naming the tensor and the
//! expected shape.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use deltadoc::model::checkpoint::write_shard;
use deltadoc::model::graph::{KvCache, LinearAttn};
use deltadoc::model::quant::Precision;
use deltadoc::model::{self, ExportOptions};
use safetensors::SafeTensors;

const OPTS: ExportOptions =
    ExportOptions { precision: Precision::Fp32, quant_block: None, linear_attn: LinearAttn::Deltadoc, kv_cache: KvCache::F32 };

/// A copy of the dense4 checkpoint with its config and tensors edited.
fn edited(
    dir: &Path,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) {
    let src = fixture_dir("dense4").join("hf");
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut all = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        all.insert(name, (view.shape().to_vec(), data));
    }
    tensors(&mut all);
    write_shard(&dir.join("model.safetensors"), &all).unwrap();
}

fn import_err(dir: &Path) -> String {
    let out = dir.join("out");
    format!("{:#}", model::import(dir, &out, OPTS).unwrap_err())
}

#[test]
fn shape_mismatch_names_tensor_and_expected_shape() {
    let tmp = tempfile::tempdir().unwrap();
    edited(tmp.path(), |c| c["intermediate_size"] = 96.into(), |_| {});
    let e = import_err(tmp.path());
    assert!(e.contains("tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64], expected [96, 64]"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    edited(
        tmp.path(),
        |_| {},
        |t| {
            t.remove("model.layers.2.linear_attn.A_log");
        },
    );
    let e = import_err(tmp.path());
    assert!(e.contains("checkpoint has no tensor model.layers.2.linear_attn.A_log (expected shape [4])"), "{e}");
}

#[test]
fn unknown_tensor_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    edited(
        tmp.path(),
        |_| {},
        |t| {
            t.insert("model.layers.0.mlp.extra_proj.weight".into(), (vec![2, 2], vec![0.0; 4]));
        },
    );
    let e = import_err(tmp.path());
    assert!(e.contains("model.layers.0.mlp.extra_proj.weight") && e.contains("does not use"), "{e}");
}

#[test]
fn wrong_model_type_and_inconsistent_config_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    edited(tmp.path(), |c| c["model_type"] = "qwen3_next".into(), |_| {});
    assert!(import_err(tmp.path()).contains("is not a Qwen3.5 model"));
    let tmp = tempfile::tempdir().unwrap();
    edited(tmp.path(), |c| c["linear_num_value_heads"] = 3.into(), |_| {});
    let e = import_err(tmp.path());
    assert!(e.contains("linear_num_value_heads 3 is not a multiple of linear_num_key_heads 4"), "{e}");
}

#[test]
fn mtp_tensors_are_skipped_nested_keys_accepted_and_stray_vision_tensors_refused() {
    // A qwen3_5 (multimodal) layout: text under model.language_model., plus MTP tensors.
    let nested = |t: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>, vision: bool| {
        let old = std::mem::take(t);
        for (k, v) in old {
            t.insert(k.replacen("model.", "model.language_model.", 1), v);
        }
        if vision {
            t.insert("model.visual.patch_embed.proj.weight".into(), (vec![2], vec![0.0; 2]));
        }
        t.insert("mtp.fc.weight".into(), (vec![2], vec![0.0; 2]));
    };
    let wrap = |c: &mut serde_json::Value| {
        let text = c.clone();
        *c = serde_json::json!({"model_type": "qwen3_5", "text_config": text, "tie_word_embeddings": true});
    };
    let tmp = tempfile::tempdir().unwrap();
    edited(tmp.path(), wrap, |t| nested(t, false));
    let out = tmp.path().join("out");
    let m = model::import(tmp.path(), &out, OPTS).unwrap();
    assert_eq!(m.config.num_hidden_layers, 4);
    assert!(m.vision_config.is_none());
    deltadoc::model::ModelDir::open(&out).unwrap().verify().unwrap();
    // Vision weights without a vision_config cannot be built into a graph: refused by name.
    let tmp = tempfile::tempdir().unwrap();
    edited(tmp.path(), wrap, |t| nested(t, true));
    let e = import_err(tmp.path());
    assert!(e.contains("model.visual.* tensors but config.json has no vision_config"), "{e}");
}

#[test]
fn every_initializer_is_used_at_every_precision() {
    // An unused initialiser is dead weight on disk (and a sign the exporter lost track of a table).
    use prost::Message;
    for fx in ["dense4", "gqa8"] {
        for p in [Precision::Fp32, Precision::Fp16, Precision::Int8, Precision::Int4] {
            let dir = imported(fx, p);
            let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
            let m = deltadoc::onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap();
            let g = m.graph.unwrap();
            let used: std::collections::HashSet<&str> = g.node.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
            let unused: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).filter(|n| !used.contains(n)).collect();
            assert!(unused.is_empty(), "{fx}/{}: unused initialisers {unused:?}", p.name());
        }
    }
}

/// A checkpoint whose config asks for what the runtime does not implement is refused at import,
/// naming the key and its value (each key has its case in src/model/config.rs's tests).
#[test]
fn a_yarn_checkpoint_is_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    edited(
        tmp.path(),
        |c| {
            c["rope_parameters"] =
                serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144})
        },
        |_| {},
    );
    let e = import_err(tmp.path());
    assert!(e.contains("rope_parameters.rope_type = \"yarn\" is not implemented"), "{e}");
}

/// Truncated safetensors and tensors of a dtype the importer does not read are refused, naming
/// the file or the tensor.
#[test]
fn truncated_files_and_unreadable_dtypes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    edited(tmp.path(), |_| {}, |_| {});
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let e = import_err(tmp.path());
    assert!(e.contains("model.safetensors: not a safetensors file"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    edited(tmp.path(), |_| {}, |_| {});
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let parsed = SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.2.linear_attn.A_log";
    let wide: Vec<u8> = parsed.tensor(name).unwrap().data().chunks_exact(4).flat_map(|c| [c, c].concat()).collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        parsed.tensors().into_iter().filter(|(n, _)| n != name).collect();
    let shape = parsed.tensor(name).unwrap().shape().to_vec();
    views.push((name.into(), safetensors::tensor::TensorView::new(safetensors::Dtype::F64, shape, &wide).unwrap()));
    safetensors::serialize_to_file(views, None, &st).unwrap();
    let e = import_err(tmp.path());
    assert!(e.contains(&format!("tensor {name} has dtype F64; only F32, BF16 and F16 are supported")), "{e}");
}
