//! The `extract` stage with the contracts schema of pipelines/ on real contracts of the corpus,
//! through the daemon and the bundled random-weight model (the hardest test of the constraint:
//! its tokens are noise, so only the constraint makes the output valid). Long documents go
//! through the per-chunk extraction and the schema-aware merge.

mod common;

use std::path::Path;

use common::sandbox::{Sandbox, assert_valid_result, json_files};
use serde_json::Value;

fn contract_schema() -> Value {
    let text = std::fs::read_to_string(common::root().join("pipelines/schemas/contract.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A sandbox whose pipeline `p` has only the contracts `terms` stage (same schema file, same
/// instruction), with a context of `max_tokens`.
fn extract_sandbox(max_tokens: usize, stage_extra: &str) -> Sandbox {
    let schema = common::root().join("pipelines/schemas/contract.json");
    let stages = format!(
        "stages:
  - name: terms
    kind: extract
    schema: {schema:?}
    instruction: Extract the contract's terms.
{stage_extra}"
    );
    Sandbox::with_stages("", max_tokens, &stages)
}

/// Checks one result's `terms`: valid against the contract schema, the schema inline, parts and
/// provenance consistent with the chunks.
fn check_terms(name: &Path, r: &Value) {
    assert_valid_result(name, r);
    let terms = &r["stages"]["terms"];
    assert_eq!(terms["kind"], "extract");
    assert_eq!(terms["schema"], contract_schema(), "{}: the schema is inline", name.display());
    let validator = jsonschema::validator_for(&contract_schema()).unwrap();
    let errors: Vec<String> = validator.iter_errors(&terms["output"]).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{}: {errors:?}", name.display());
    let chunks = r["chunks"].as_array().unwrap();
    let parts = terms["parts"].as_array().map_or(1, Vec::len);
    assert_eq!(parts, chunks.len(), "{}: one extraction per chunk", name.display());
    assert_eq!(terms["calls"].as_u64().unwrap() as usize, chunks.len(), "no model call to merge");
    for (pointer, origin) in terms["provenance"].as_object().unwrap() {
        let v = terms["output"].pointer(pointer).unwrap_or_else(|| panic!("{}: provenance of missing {pointer}", name.display()));
        assert!(!v.is_null(), "{pointer}: provenance of a null");
        let c = &chunks[origin["chunk"].as_u64().unwrap() as usize];
        assert_eq!(origin["pages"], serde_json::json!([c["first_page"], c["last_page"]]), "{pointer}");
    }
    assert!(terms["mask_ms_per_token"].as_f64().unwrap() > 0.0);
}

#[test]
fn extraction_validates_and_long_contracts_merge_across_chunks() {
    let Some(_corpus) = common::corpus() else { return };
    // The schema's longest output (22.6K tokens) is reserved in every context, which leaves
    // about 24K tokens of contract per chunk here.
    let sb = extract_sandbox(49_152, "");
    let corpus = common::corpus_path().join("contracts");
    // A short one (one chunk) and a long one (about 80K tokens: several chunks, merged).
    for f in ["commonpaper__Mutual-NDA.md", "CERES,INC_01_25_2012-EX-10.20-Collaboration Agreement.txt"] {
        std::fs::copy(corpus.join(f), sb.path("inbox").join(f)).unwrap();
    }
    sb.run_once();
    let results = sb.results();
    assert_eq!(results.len(), 2);
    let mut max_chunks = 0;
    for (name, r) in &results {
        check_terms(name, r);
        max_chunks = max_chunks.max(r["chunks"].as_array().unwrap().len());
    }
    assert!(max_chunks > 1, "the long contract was merged from several chunks");
}

#[test]
fn thinking_keeps_the_reasoning_out_of_the_fields() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = extract_sandbox(49_152, "    thinking: true\n    think_budget: 24\n    keep_reasoning: true\n");
    std::fs::copy(common::corpus_path().join("contracts/commonpaper__Mutual-NDA.md"), sb.path("inbox/nda.md")).unwrap();
    sb.run_once();
    let (name, r) = &sb.results()[0];
    check_terms(name, r);
    let reasoning = r["stages"]["terms"]["reasoning"].as_array().unwrap();
    assert_eq!(reasoning.len(), 1, "one think block per call");
    assert!(!reasoning[0].as_str().unwrap().is_empty());
    assert!(!r["stages"]["terms"]["output"].to_string().contains("<think>"));
}

#[test]
fn a_schema_the_constraint_cannot_bound_or_enforce_fails_config_check() {
    let cases = [
        ("{type: object, properties: {a: {type: string}}, additionalProperties: false}", "/properties/a", "maxLength"),
        ("{type: object, properties: {a: {type: string, maxLength: 5}}}", "schema", "additionalProperties"),
        ("{type: array, maxItems: 3, uniqueItems: true, items: {type: boolean}}", "schema", "uniqueItems"),
        ("{type: number, minimum: 0, maximum: 10}", "schema", "multipleOf"),
    ];
    for (schema, at, why) in cases {
        let sb = Sandbox::new("", 8192);
        sb.write(
            "pipelines/p.yaml",
            &format!(
                "name: p\ninboxes: [{{path: inbox}}]\noutput: out/p\nstages:\n  - name: f\n    kind: extract\n    instruction: x\n    schema: {schema}\n"
            ),
        );
        let out = sb.run(&["config", "check"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{schema}: accepted");
        assert!(err.contains("p.yaml:8:") && err.contains("stages[0].schema"), "names file, line and field: {err}");
        assert!(err.contains(at) && err.contains(why), "{schema}: expected {at} / {why}: {err}");
    }
}

/// Every contract of the corpus through the repository's contracts schema, long ones chunked
/// (about 40K tokens of contract per chunk) and merged. About 10 minutes on 2 cores: `.ci/run`
/// runs it.
#[test]
#[ignore]
fn every_contract_of_the_corpus_extracts_terms_that_validate() {
    let Some(_corpus) = common::corpus() else { return };
    let sb = extract_sandbox(65_536, "");
    let names = sb.fill_inbox("contracts");
    let t = std::time::Instant::now();
    sb.run_once();
    let results = sb.results();
    let quarantined = json_files(&sb.path("quarantine/p"));
    let mut merged = 0;
    for n in &names {
        let found = results.iter().find(|(p, _)| p == Path::new(&format!("{n}.json")));
        match found {
            Some((p, r)) => {
                check_terms(p, r);
                merged += usize::from(r["chunks"].as_array().unwrap().len() > 1);
            }
            None => {
                // Only a document without extractable text may fail, and never for the schema.
                let e = quarantined.iter().find(|(p, _)| p == Path::new(&format!("{n}.error.json")));
                let (_, e) = e.unwrap_or_else(|| panic!("{n}: neither result nor quarantine"));
                assert_ne!(e["stage"], "terms", "{n}: the extraction failed: {e}");
            }
        }
    }
    eprintln!(
        "{} contracts in {:.0} s: {} results ({merged} merged from several chunks), {} quarantined",
        names.len(),
        t.elapsed().as_secs_f64(),
        results.len(),
        quarantined.len()
    );
    assert!(merged >= 3, "long contracts went through the merge");
}

/// `pipelines/contracts.yaml` reads a scanned contract (image pages only) through its own ocr
/// step instead of quarantining it: the pages are transcribed, then the summaries and the terms
/// run on the transcription.
#[test]
fn the_contracts_pipeline_transcribes_a_scanned_contract() {
    let Some(_corpus) = common::corpus() else { return };
    let pipeline = std::fs::read_to_string(common::root().join("pipelines/contracts.yaml")).unwrap();
    let schema = common::root().join("pipelines/schemas/contract.json");
    let stages = &pipeline[pipeline.find("\nstages:\n").expect("contracts.yaml has stages") + 1..];
    let stages = stages.replace("schema: schemas/contract.json", &format!("schema: {schema:?}"));
    let sb = Sandbox::with_stages("", 65536, &stages);
    // A page that is a JBIG2 image only, without a text layer.
    let scan = common::corpus_path().join("scanned/ocrmypdf__jbig2.pdf");
    let out = sb.run(&["process", scan.to_str().unwrap(), "--pipeline", "p"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &r["stages"]["transcription"];
    assert_eq!((t["kind"].as_str(), t["calls"].as_u64()), (Some("ocr"), Some(1)), "{t}");
    assert_eq!(r["pages"][0]["method"], "ocr", "{}", r["pages"]);
    assert!(!r["pages"][0]["text"].as_str().unwrap().is_empty(), "the page's text is its transcription");
    for stage in ["summary", "summary_detailed"] {
        assert!(r["stages"][stage]["calls"].as_u64().unwrap() >= 1, "{stage} ran on the transcription");
    }
    check_terms(&scan, &r);
}
