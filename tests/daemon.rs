//! The real daemon on temporary folders: partial writes, duplicates, files the watcher cannot
//! see, kill -9 recovery, hostile files, metrics that match what happened, and results that
//! match the published schema.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sandbox::{Sandbox, assert_valid_result, metric, wait_for};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn corpus_file(rel: &str) -> Vec<u8> {
    std::fs::read(common::corpus_path().join(rel)).unwrap()
}

fn count_state(status: &Value, state: &str) -> u64 {
    status["counts"].as_array().unwrap().iter().filter(|c| c["state"] == state).map(|c| c["jobs"].as_u64().unwrap()).sum()
}

#[test]
fn serve_takes_slow_copies_once_skips_duplicates_and_rescans_what_the_watcher_missed() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = Sandbox::new("", 8192);
    let d = sb.serve();
    let nda = corpus_file("contracts/commonpaper__Mutual-NDA.md");

    // A scanner writing page by page: pauses shorter than the stability window.
    {
        let mut f = std::fs::File::create(sb.path("inbox/nda.md")).unwrap();
        for part in nda.chunks(nda.len() / 6 + 1) {
            f.write_all(part).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let (_, r) = wait_for("the NDA result", Duration::from_secs(120), || {
        sb.results().into_iter().find(|(p, _)| p == Path::new("nda.md.json"))
    });
    assert_eq!(r["source"]["size"].as_u64().unwrap(), nda.len() as u64, "processed the whole file, not a prefix");
    assert_eq!(r["source"]["sha256"], deltadoc::util::hex(&Sha256::digest(&nda)).as_str());
    assert!(r["pages"][0]["text"].as_str().unwrap().contains("Mutual Non-Disclosure Agreement"));

    // The same bytes under another name: recorded as a duplicate, no second result.
    std::fs::write(sb.path("inbox/copy of nda.md"), &nda).unwrap();
    wait_for("the duplicate to be recorded", Duration::from_secs(60), || {
        (count_state(&sb.status(), "skipped") == 1).then_some(())
    });

    // A folder moved into the inbox: inotify reports the folder, not the files inside it, so
    // only the periodic rescan can find them.
    std::fs::create_dir_all(sb.path("staging/batch")).unwrap();
    std::fs::write(sb.path("staging/batch/terms.html"), corpus_file("contracts/mozilla__en__firefox_cloud_services_tos.html"))
        .unwrap();
    std::fs::rename(sb.path("staging/batch"), sb.path("inbox/batch")).unwrap();
    wait_for("the moved folder's file", Duration::from_secs(120), || {
        sb.results().into_iter().find(|(p, _)| p == Path::new("batch/terms.html.json"))
    });

    let results = sb.results();
    assert_eq!(results.len(), 2, "{:?}", results.iter().map(|r| &r.0).collect::<Vec<_>>());
    for (p, v) in &results {
        assert_valid_result(p, v);
        assert_eq!(v["model"]["random_weights"], true);
    }
    let m = d.scrape();
    assert_eq!(metric(&m, "deltadoc_documents_total", &["outcome=\"ok\"", "pipeline=\"p\""]), Some(2.0), "{m}");
    assert_eq!(metric(&m, "deltadoc_documents_total", &["outcome=\"skipped_duplicate\""]), Some(1.0));
    assert!(metric(&m, "deltadoc_rescan_found_total", &[]).unwrap() >= 1.0, "rescan finds counted:\n{m}");
    assert!(metric(&m, "deltadoc_watch_events_total", &["source=\"inotify\""]).unwrap() >= 1.0);
    assert_eq!(metric(&m, "deltadoc_queue_depth", &["state=\"done\""]), Some(2.0));
    assert_eq!(metric(&m, "deltadoc_context_truncations_total", &[]), Some(0.0));
    assert_eq!(metric(&m, "deltadoc_model_loaded", &[]), Some(1.0));
    let generated = metric(&m, "deltadoc_generation_tokens_total", &[]).unwrap();
    let in_results: u64 = results.iter().map(|(_, v)| v["tokens"]["generated"].as_u64().unwrap()).sum();
    assert_eq!(generated, in_results as f64, "token counter matches the results");
    assert!(metric(&m, "deltadoc_stage_duration_seconds_count", &["stage=\"summary\""]).unwrap() >= 2.0);
    // Bounded labels only: no file names or paths in any series.
    for l in m.lines().filter(|l| !l.starts_with('#')) {
        assert!(!l.contains('/') && !l.contains(".md"), "path in a label: {l}");
    }
    for family in m.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap()) {
        assert!(m.contains(&format!("# HELP {family} ")), "{family} has no HELP");
    }
    d.stop();
}

/// Whether `job` runs `stage`: alone, or among the stages whose calls decode together (the
/// ledger's stage column names them all, `summary+parties`).
fn running_stage(job: &Value, stage: &str) -> bool {
    job["state"] == "running" && job["stage"].as_str().is_some_and(|s| s.split('+').any(|s| s == stage))
}

#[test]
fn kill_9_during_a_stage_then_restart_gives_exactly_one_result() {
    let Some(_corpus) = common::corpus() else { return };
    // A long contract in small contexts: many model calls, time enough to kill mid-stage.
    let sb = Sandbox::new("", 2048);
    std::fs::write(
        sb.path("inbox/ceres.txt"),
        corpus_file("contracts/CERES,INC_01_25_2012-EX-10.20-Collaboration Agreement.txt"),
    )
    .unwrap();
    let mut d = sb.serve();
    wait_for("a model stage to run", Duration::from_secs(120), || {
        let s = sb.status();
        s["recent"].as_array().unwrap().iter().any(|j| running_stage(j, "summary")).then_some(())
    });
    // Calls that completed are kept for the next attempt (src/stage/journal.rs).
    let journal = sb.path(&format!("state/journal/{}", sb.status()["recent"][0]["id"]));
    let kept = wait_for("model calls kept in the job's journal", Duration::from_secs(120), || {
        // Finished entries only: one being written is a temporary file beside them, which the
        // kill can leave unfinished (src/output.rs, `replace_atomically`).
        let n = std::fs::read_dir(&journal)
            .map_or(0, |d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count());
        (n >= 3).then_some(n)
    });
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let s = sb.status();
    assert_eq!(s["recent"][0]["state"], "running", "the ledger shows the interrupted job");
    assert!(sb.results().is_empty());

    let d = sb.serve();
    d.wait_log("were running when deltadoc last stopped", Duration::from_secs(30));
    let (_, r) = wait_for("the result after restart", Duration::from_secs(600), || sb.results().into_iter().next());
    let reused = d.log().lines().filter(|l| l.contains("from the job's journal")).count();
    assert!(reused >= kept, "{kept} calls were kept, {reused} taken from the journal");
    // The result is written first, then the job is recorded done, then its journal goes.
    wait_for("the journal to go with the job", Duration::from_secs(10), || (!journal.exists()).then_some(()));
    let s = sb.status();
    let job = &s["recent"][0];
    // The kill interrupted the first attempt; it does not count as a failed one.
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64(), job["interruptions"].as_u64()),
        (Some("done"), Some(1), Some(1))
    );
    assert_eq!(sb.results().len(), 1);
    assert_valid_result(Path::new("ceres.txt.json"), &r);
    let chunks = r["chunks"].as_array().unwrap();
    assert!(chunks.len() > 10, "a long document is chunked: {}", chunks.len());
    // The chunks cover every token of the document in order.
    assert_eq!(chunks[0]["token_start"], 0);
    assert_eq!(chunks.last().unwrap()["token_end"], r["document_tokens"]);
    for w in chunks.windows(2) {
        assert!(w[1]["token_start"].as_u64() <= w[0]["token_end"].as_u64());
        assert!(w[1]["token_start"].as_u64() > w[0]["token_start"].as_u64());
    }
    assert_eq!(r["truncated"], false);
    assert!(!r["stages"]["summary"]["parts"].as_array().unwrap().is_empty(), "map-reduce parts kept");
    let leftovers: Vec<_> = std::fs::read_dir(sb.path("out/p"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temp files left in the output folder");
    d.stop();
}

/// The crash rule (src/daemon/crash_marker.rs): a daemon that crashes under a document at the
/// same place `max_attempts` times in a row has found a document that brings it down, and
/// quarantines it as `crashed` at the next start; kills and crashes at different places are
/// interruptions, never counted. The crashes are SIGSEGVs, which the daemon's handler marks in
/// the crash marker; the marker's place is then set to one place before each restart, as a
/// document that crashes the process at the same model step would leave it.
#[test]
fn a_document_the_daemon_dies_under_at_the_same_place_is_quarantined_as_crashed() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = Sandbox::new("", 2048);
    let cfg = std::fs::read_to_string(sb.path("config/deltadoc.yaml")).unwrap();
    sb.write("config/deltadoc.yaml", &cfg.replace("max_attempts: 1", "max_attempts: 3"));
    std::fs::write(
        sb.path("inbox/ceres.txt"),
        corpus_file("contracts/CERES,INC_01_25_2012-EX-10.20-Collaboration Agreement.txt"),
    )
    .unwrap();
    let running = || sb.status()["recent"].as_array().unwrap().iter().any(|j| running_stage(j, "summary"));
    for death in 1..=3 {
        let mut d = sb.serve();
        if death == 1 {
            wait_for("the document to run", Duration::from_secs(120), || running().then_some(()));
        } else {
            d.wait_log("queued again", Duration::from_secs(60));
            wait_for("the document to run again", Duration::from_secs(120), || running().then_some(()));
        }
        d.signal(libc::SIGSEGV);
        d.child.wait().unwrap();
        let marker = std::fs::read(sb.path("state/running")).unwrap();
        assert_eq!(marker[254], b'C', "the fatal-signal handler marked the crash: {:?}", String::from_utf8_lossy(&marker));
        let job = sb.status()["recent"][0]["id"].as_i64().unwrap();
        let record = format!("{job} 42 - summary");
        std::fs::write(sb.path("state/running"), format!("{record:<254}C\n")).unwrap();
    }
    let d = sb.serve();
    let (_, e) = wait_for("the quarantine entry", Duration::from_secs(60), || {
        common::sandbox::json_files(&sb.path("quarantine/p")).into_iter().next()
    });
    assert_eq!((e["reason"].as_str(), e["stage"].as_str()), (Some("crashed"), Some("summary")), "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("ceres.txt") && msg.contains("3 times in a row") && msg.contains("summary after 42 model steps"),
        "{msg}"
    );
    let job = &sb.status()["recent"][0];
    assert_eq!((job["state"].as_str(), job["interruptions"].as_u64()), (Some("quarantined"), Some(2)), "{job}");
    assert!(sb.results().is_empty());
    d.stop();
}

#[test]
fn every_malformed_file_ends_as_a_result_or_in_quarantine_with_a_reason() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = Sandbox::new("", 4096);
    let names = sb.fill_inbox("malformed");
    let t = std::time::Instant::now();
    sb.run_once();
    let results = sb.results();
    let quarantined = common::sandbox::json_files(&sb.path("quarantine/p"));
    let mut report = Vec::new();
    for n in &names {
        let ok = results.iter().find(|(p, _)| p == Path::new(&format!("{n}.json")));
        let err = quarantined.iter().find(|(p, _)| p == Path::new(&format!("{n}.error.json")));
        match (ok, err) {
            (Some((p, v)), None) => {
                assert_valid_result(p, v);
                report.push(format!("{n}: result ({} pages)", v["pages"].as_array().unwrap().len()));
            }
            (None, Some((_, e))) => {
                let reason = e["reason"].as_str().unwrap();
                assert!(!e["message"].as_str().unwrap().is_empty());
                assert!(e["message"].as_str().unwrap().contains(n.as_str()), "the error names the file: {e}");
                assert!(sb.path("quarantine/p").join(n).is_file(), "{n} copied to quarantine");
                report.push(format!("{n}: quarantined ({reason})"));
            }
            other => panic!("{n}: expected exactly one of result or quarantine, got {other:?}"),
        }
    }
    eprintln!("malformed corpus in {:.1}s:\n{}", t.elapsed().as_secs_f64(), report.join("\n"));
}

#[test]
fn process_prints_the_result_or_the_error_json() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = Sandbox::new("", 8192);
    let good = common::corpus_path().join("contracts/NELNETINC_04_08_2020-EX-1-JOINT FILING AGREEMENT.PDF");
    let out = sb.run(&["process", good.to_str().unwrap(), "--pipeline", "p"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_valid_result(&good, &v);
    assert!(v["pages"][0]["text"].as_str().unwrap().contains("jointly prepare and file"));

    let bad = common::corpus_path().join("malformed/ocrmypdf__invalid.pdf");
    let out = sb.run(&["process", bad.to_str().unwrap(), "--pipeline", "p"]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"]["reason"].is_string() && v["error"]["message"].as_str().unwrap().contains("ocrmypdf__invalid.pdf"), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("error: ") && last.contains("ocrmypdf__invalid.pdf"), "{stderr}");
}

/// The daemon's ocr stage reads page images with the vision tower: a JBIG2 scan (one page, cut
/// into bands by `tile_tokens`) and a TIFF photo, each transcribed and then summarised.
#[test]
fn the_ocr_stage_transcribes_scans_before_the_text_stages() {
    let Some(_corpus) = common::corpus() else { return };
    let stages = "stages:
  - {name: transcription, kind: ocr, max_new_tokens: 6, max_page_tokens: 256, tile_tokens: 128}
  - {name: summary, kind: summarize, max_new_tokens: 4}
";
    let sb = Sandbox::with_stages("", 8192, stages);
    for file in ["scanned/ocrmypdf__jbig2.pdf", "scanned/tesseract__phototest.tif"] {
        let path = common::corpus_path().join(file);
        let out = sb.run(&["process", path.to_str().unwrap(), "--pipeline", "p"]);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_valid_result(&path, &v);
        let t = &v["stages"]["transcription"];
        assert_eq!((t["kind"].as_str(), t["calls"].as_u64()), (Some("ocr"), Some(1)), "{file}: {t}");
        // Two or more bands of ≤ 128 image tokens for a page of up to 256, plus the template.
        let prompt = t["prompt_tokens"].as_u64().unwrap();
        assert!((150..=300).contains(&prompt) && t["generated_tokens"].as_u64().unwrap() > 0, "{file}: {t}");
        assert_eq!(v["pages"][0]["method"], "ocr", "{file}");
        assert_eq!(v["pages"][0]["text"], t["output"], "{file}: the page text is the transcription");
        assert!(!t["output"].as_str().unwrap().is_empty(), "{file}");
        assert!(v["stages"]["summary"]["output"].is_string(), "{file}: the text stages ran on the transcription");
    }
}

#[test]
fn config_check_names_file_line_and_field() {
    let sb = Sandbox::new("schedule: {cron: \"0 2 * * *\", timezone: Europe/Berlin, window: 4h}\n", 8192);
    let out = sb.run(&["config", "check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cron \"0 2 * * *\" Europe/Berlin"));

    sb.write("pipelines/p.yaml", "name: p\ninboxes: [{path: inbox}]\noutput: out/p\nschedule:\n  cron: \"0 2 * * *\"\n  timezone: Mars/Olympus\n  window: 1h\nstages: [{name: s, kind: summarize}]\n");
    let err = String::from_utf8_lossy(&sb.run(&["config", "check"]).stderr).into_owned();
    assert!(err.contains("p.yaml") && err.contains("line 6") && err.contains("Mars/Olympus"), "{err}");

    sb.write(
        "pipelines/p.yaml",
        "name: p\ninboxes: [{path: inbox}]\noutput: inbox/results\nstages: [{name: s, kind: summarize}]\n",
    );
    let err = String::from_utf8_lossy(&sb.run(&["config", "check"]).stderr).into_owned();
    assert!(err.contains("p.yaml:3") && err.contains("field `output`") && err.contains("overlaps inbox"), "{err}");

    sb.write("pipelines/p.yaml", "name: p\ninboxes: [{path: inbox}]\noutput: out\nstages:\n  - {name: s, kind: prompt}\n");
    let err = String::from_utf8_lossy(&sb.run(&["config", "check"]).stderr).into_owned();
    assert!(err.contains("p.yaml:5") && err.contains("stages[0].instruction"), "{err}");
}

#[test]
fn memory_budget_caps_the_context_or_refuses_naming_the_limit() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = Sandbox::new("", 262_144);
    let ceres = common::corpus_path().join("contracts/CERES,INC_01_25_2012-EX-10.20-Collaboration Agreement.txt");
    let run = |budget: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deltadoc"));
        c.args([
            "process",
            ceres.to_str().unwrap(),
            "--pipeline",
            "p",
            "--config",
            sb.path("config/deltadoc.yaml").to_str().unwrap(),
        ]);
        c.env("DELTADOC_LOG", "warn").env("DELTADOC_MEMORY_BUDGET", budget).output().unwrap()
    };
    // Far below the weights: refused before any model call, with the limit in the message.
    let out = run("64MiB");
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["reason"], "too_large", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("memory_budget 64 MiB"), "{v}");
    // Enough for some thousands of tokens (past the plan's 768 MiB runtime allowance and the
    // tiny model's 61 MiB of weights, 21 MiB for activations, cache and snapshot): the 262K
    // context is capped and the document chunked.
    let out = run("850MiB");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["chunks"].as_array().unwrap().len() > 1);
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("memory_budget 850 MiB caps the context"), "{warnings}");
    assert_valid_result(&ceres, &v);
}

/// The stages of the tests that compare decoding together with one call at a time: a greedy
/// summary, a sampled one (same seed, same text) and a schema-constrained extraction.
const THREE_STAGES: &str = "stages:
  - {name: summary, kind: summarize, max_new_tokens: 12}
  - {name: gist, kind: summarize, max_new_tokens: 10, temperature: 0.9, top_p: 0.95, seed: 11,
     instruction: In one sentence what this is.}
  - name: terms
    kind: extract
    instruction: Extract the parties, the effective date and the governing law.
    schema:
      type: object
      additionalProperties: false
      required: [parties, effective_date, governing_law]
      properties:
        parties: {type: array, maxItems: 2, items: {type: string, maxLength: 16}}
        effective_date: {type: [string, 'null'], maxLength: 10}
        governing_law: {type: [string, 'null'], maxLength: 16}
";

/// Every [`THREE_STAGES`] stage of result `b` says what it says in result `a`: the same text from
/// the same parts, calls, tokens and ends.
fn assert_same_stages(a: &Value, b: &Value, what: &str) {
    for stage in ["summary", "gist", "terms"] {
        let (a, b) = (&a["stages"][stage], &b["stages"][stage]);
        for field in ["parts", "output", "generated_tokens", "prompt_tokens", "calls", "stopped_by"] {
            assert_eq!(a[field], b[field], "{what}: {stage}.{field}");
        }
    }
}

/// A document's stage calls on all its parts, prefilled in turn and decoded together (here as a
/// batch of eight and one of four), give exactly what one call at a time gives: a greedy summary,
/// a sampled one (same seed, same text) and a schema-constrained extraction, part by part, and
/// the reduce calls after them.
#[test]
fn stage_calls_decoded_together_give_the_result_of_one_at_a_time() {
    let Some(_corpus) = common::corpus() else { return };
    // int8: a batch's logits are bit-identical to each sequence's alone (tests/batch.rs), which
    // sampling needs; with f32 weights they differ by about 1e-5 and top-p may order near-ties
    // differently.
    let sb = Sandbox::with_model(&common::sandbox::tiny_model_int8(), "", 1024, THREE_STAGES);
    let doc = common::corpus_path().join("contracts/commonpaper__Mutual-NDA.md");
    let run = |max_batch: &str| -> Value {
        let out =
            sb.run_with(&["process", doc.to_str().unwrap(), "--pipeline", "p"], &[("DELTADOC_WORKER_MAX_BATCH", max_batch)]);
        assert!(out.status.success(), "max_batch {max_batch}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (alone, together) = (run("1"), run("8"));
    let parts = together["chunks"].as_array().unwrap().len();
    assert_eq!(parts, 4, "four parts: twelve map calls, eight decoding at once and the others joining as they end");
    assert_same_stages(&alone, &together, "one document");
    for stage in ["summary", "gist", "terms"] {
        let t = &together["stages"][stage];
        assert!(t["generated_tokens"].as_u64().unwrap() > 0, "{stage}: {t}");
    }
    assert_eq!(alone["tokens"], together["tokens"], "the same prompt tokens prefilled, the prefix once a part");
    let out = sb.run_with(&["process", doc.to_str().unwrap(), "--pipeline", "p"], &[("DELTADOC_WORKER_MAX_BATCH", "0")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("field `worker.max_batch`: must be at least 1"), "{stderr}");
}

/// Documents in flight (`worker.max_docs`, src/llm/host.rs): three at once through `run --once`
/// give each document the result it gets alone, stage by stage (greedy, sampled and
/// schema-constrained calls, a PDF, a long text in parts), while they ran at the same time.
#[test]
fn documents_in_flight_give_the_results_of_one_at_a_time() {
    let Some(_corpus) = common::corpus() else { return };
    // int8: batched logits are bit-identical to each sequence's alone (see the test above).
    let sb = Sandbox::with_model(&common::sandbox::tiny_model_int8(), "", 1024, THREE_STAGES);
    let docs = [
        "contracts/commonpaper__Mutual-NDA.md",
        "contracts/MSCIINC_02_28_2008-EX-10.10-.PDF",
        "contracts/NELNETINC_04_08_2020-EX-1-JOINT FILING AGREEMENT.PDF",
        "text/uchardet__ru__utf-8.txt",
        "contracts/mozilla__en__firefox_cloud_services_tos.html",
    ];
    let run = |max_docs: &str| -> Vec<(PathBuf, Value)> {
        let _ = std::fs::remove_dir_all(sb.path("state"));
        let _ = std::fs::remove_dir_all(sb.path("out"));
        for d in docs {
            let name = Path::new(d).file_name().unwrap();
            std::fs::copy(common::corpus_path().join(d), sb.path("inbox").join(name)).unwrap();
        }
        let out = sb.run_with(&["run", "--once"], &[("DELTADOC_WORKER_MAX_DOCS", max_docs)]);
        assert!(out.status.success(), "max_docs {max_docs}: {}", String::from_utf8_lossy(&out.stderr));
        let results = sb.results();
        assert_eq!(results.len(), docs.len(), "max_docs {max_docs}: one result a document");
        results
    };
    // When each document ran: its result's time less its total.
    let spans = |results: &[(PathBuf, Value)]| -> Vec<(f64, f64)> {
        results
            .iter()
            .map(|(_, r)| {
                let end = r["processed_at"].as_str().unwrap().parse::<jiff::Timestamp>().unwrap().as_millisecond() as f64;
                (end - r["timings"]["total"].as_f64().unwrap() * 1000.0, end)
            })
            .collect()
    };
    let overlap = |spans: &[(f64, f64)]| -> f64 {
        let mut most = 0f64;
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                most = most.max(a.1.min(b.1) - a.0.max(b.0));
            }
        }
        most
    };
    let alone = run("1");
    let together = run("3");
    for ((name, a), (_, t)) in alone.iter().zip(&together) {
        assert_valid_result(name, t);
        assert_same_stages(a, t, &name.display().to_string());
        assert_eq!(a["tokens"], t["tokens"], "{}: the same tokens prefilled", name.display());
    }
    assert!(overlap(&spans(&alone)) < 50.0, "one at a time: {:?}", spans(&alone));
    assert!(overlap(&spans(&together)) > 500.0, "documents ran at the same time: {:?}", spans(&together));
    let status = sb.status();
    for job in status["recent"].as_array().unwrap() {
        assert_eq!((job["state"].as_str(), job["attempts"].as_u64()), (Some("done"), Some(1)), "{job}");
    }
}
