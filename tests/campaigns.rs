//! The crash campaign (tests/crash_campaign.py): real documents through `deltadoc serve` while
//! it is killed at random moments, then run to completion, with 0 lost, duplicated or partial
//! results, an intact ledger, and no document quarantined because of the kills. The short
//! version runs with the tests; the full one (100 kills, 60 documents) with `--ignored`.

mod common;

use common::sandbox::tiny_model;

fn campaign(kills: u32, documents: u32) {
    let Some(corpus) = common::corpus() else { return };
    let out = std::process::Command::new("python3")
        .arg(common::root().join("tests/crash_campaign.py"))
        .args(["--deltadoc", env!("CARGO_BIN_EXE_deltadoc")])
        .arg("--model")
        .arg(tiny_model())
        .args(["--kills", &kills.to_string(), "--documents", &documents.to_string()])
        .env("DELTADOC_CORPUS", corpus)
        .output()
        .expect("python3 runs the campaign");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the campaign found lost, duplicated or partial results, or outcomes changed by kills");
    let report: serde_json::Value = serde_json::from_str(&text[text.find("\n{").expect("the JSON report")..]).unwrap();
    assert_eq!(report["exactly_one"], documents, "{report}");
    let stops: u64 = report["stops"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(stops, kills as u64);
}

#[test]
fn crash_campaign_short() {
    campaign(15, 15);
}

#[test]
#[ignore = "about 15 minutes: the full campaign, 100 kills over 60 documents"]
fn crash_campaign_full() {
    campaign(100, 60);
}
