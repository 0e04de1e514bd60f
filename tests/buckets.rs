//! Inboxes, results and quarantine in a bucket of a real S3-compatible server (SeaweedFS,
//! tests/common/s3_server.rs), as docs/buckets.md describes: real documents uploaded while the
//! daemon runs (some as multipart uploads still in progress at a rescan) each end with exactly
//! one result object or one quarantine entry; the same bytes again are not run again, new bytes
//! under a known key are; a store stopped for 30 s mid-run loses and duplicates nothing; two
//! daemons on a PostgreSQL ledger share one bucket inbox.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::pg_cluster::Cluster;
use common::s3_server::{ACCESS_KEY, S3Server, SECRET_KEY, Tls};
use common::sandbox::{Daemon, QUICK_STAGES, Sandbox, assert_valid_result, metric, wait_for};
use object_store::path::Path as Key;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use serde_json::Value;
use sha2::{Digest, Sha256};

const BUCKET: &str = "deltadoc-docs";

/// The credentials every deltadoc process of these tests signs with, as an operator's
/// environment gives them.
const AWS_ENV: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)];

/// A sandbox whose pipeline `p` reads `s3://BUCKET/in/`, writes results to `results/` and
/// quarantines (moving) to `quarantine/p/` of the same bucket.
struct Setup {
    sb: Sandbox,
    s3: S3Server,
}

impl Setup {
    /// `None` when the server or the corpus is missing (and not required).
    fn new(config: &str) -> Option<Setup> {
        Self::with_stages(config, QUICK_STAGES)
    }

    /// [`Setup::new`] with other stages.
    fn with_stages(config: &str, stages: &str) -> Option<Setup> {
        common::corpus()?;
        let s3 = S3Server::start()?;
        s3.bucket(BUCKET);
        Some(Self::on(s3, "", config, stages))
    }

    /// The sandbox for server `s3`, with more `object_store` fields (`, name: value`), more
    /// configuration and these stages.
    fn on(s3: S3Server, object_store: &str, config: &str, stages: &str) -> Setup {
        let sb = Sandbox::new("", 1024);
        let cfg = sb.path("config/deltadoc.yaml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!("object_store: {{endpoint: {:?}, timeout: 5s{object_store}}}\n{config}", s3.endpoint()));
        std::fs::write(&cfg, text).unwrap();
        sb.write(
            "pipelines/p.yaml",
            &format!(
                "name: p
inboxes: [{{url: \"s3://{BUCKET}/in/\"}}]
output: s3://{BUCKET}/results/
quarantine: s3://{BUCKET}/quarantine/p/
quarantine_mode: move
context: {{max_tokens: 1024, overlap: 64}}
{stages}"
            ),
        );
        Setup { sb, s3 }
    }

    fn serve(&self, more: &[(&str, &str)]) -> Daemon {
        let env: Vec<(&str, &str)> = AWS_ENV.iter().chain(more).copied().collect();
        self.sb.serve_with(&env)
    }

    /// `deltadoc status --json`.
    fn status(&self) -> Value {
        let out = self.sb.run_with(&["status", "--json", "--recent", "1000"], &AWS_ENV);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The ledger's jobs by document: (id, state), in the order they were recorded.
    fn jobs(&self) -> Vec<(String, i64, String)> {
        let mut jobs: Vec<(String, i64, String)> = self.status()["recent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| {
                (j["rel_path"].as_str().unwrap().to_string(), j["id"].as_i64().unwrap(), j["state"].as_str().unwrap().into())
            })
            .collect();
        jobs.sort_by_key(|j| j.1);
        jobs
    }

    /// Every document of `names` has a job that ended.
    fn ended(&self, names: &[String]) -> bool {
        let jobs = self.jobs();
        names.iter().all(|n| jobs.iter().any(|(r, _, s)| r == n && ["done", "quarantined", "skipped"].contains(&s.as_str())))
    }

    /// Exactly one outcome per document of `names` (by its last job): a result object written
    /// under its job's id, or a quarantine copy with its error JSON and nothing left in the
    /// inbox, or (a skipped duplicate) neither; and no object in `results/` without a job.
    fn assert_exactly_once(&self, names: &[String]) {
        let results = self.s3.keys(BUCKET, "results");
        let quarantine = self.s3.keys(BUCKET, "quarantine");
        let inbox = self.s3.keys(BUCKET, "in");
        let last: HashMap<String, (i64, String)> = self.jobs().into_iter().map(|(r, id, s)| (r, (id, s))).collect();
        for n in names {
            let (id, state) = &last[n];
            let result = format!("results/{n}.json");
            let entry = format!("quarantine/p/{n}");
            let quarantined = quarantine.contains(&format!("{entry}.error.json"));
            match state.as_str() {
                "done" => {
                    assert!(
                        results.contains(&result) && !quarantined,
                        "{n}: done, but result {result} missing or quarantined too"
                    );
                    let r: Value = serde_json::from_slice(&self.s3.get(BUCKET, &result)).unwrap();
                    assert_valid_result(std::path::Path::new(&result), &r);
                    assert_eq!(r["job"]["id"].as_i64(), Some(*id), "{n}: the result of another job");
                    assert_eq!(r["source"]["path"].as_str(), Some(format!("s3://{BUCKET}/in/{n}").as_str()));
                }
                "quarantined" => {
                    assert!(quarantined && quarantine.contains(&entry), "{n}: quarantined without its copy and error JSON");
                    assert!(!results.contains(&result), "{n}: quarantined with a result");
                    assert!(!inbox.contains(&format!("in/{n}")), "{n}: moved to quarantine, yet still in the inbox");
                }
                "skipped" => assert!(!quarantined && !results.contains(&result), "{n}: a skipped duplicate with an outcome"),
                other => panic!("{n}: {other}"),
            }
        }
        for r in &results {
            let doc = r.strip_prefix("results/").and_then(|r| r.strip_suffix(".json")).unwrap();
            assert!(last.get(doc).is_some_and(|(_, s)| s == "done"), "{r}: a result object without a done job");
        }
    }
}

/// `count` real documents of the corpus (text, malformed and text PDFs, sorted by name): their
/// names and bytes.
fn documents(count: usize) -> Vec<(String, Vec<u8>)> {
    let mut docs: Vec<(String, Vec<u8>)> = ["text", "malformed", "pdf"]
        .iter()
        .flat_map(|d| std::fs::read_dir(common::corpus_path().join(d)).unwrap().flatten())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    docs.sort();
    // Mixed kinds: every n-th of the sorted list.
    let step = docs.len() / count;
    assert!(step >= 1, "{} documents in the corpus", docs.len());
    docs.into_iter().step_by(step).take(count).collect()
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits until the daemon has listed the inbox `n` more times.
fn rescans(d: &Daemon, n: usize) {
    let listed = |d: &Daemon| metric(&d.scrape(), "deltadoc_inbox_rescans_total", &[]).unwrap_or(0.0);
    let start = listed(d);
    wait_for("rescans", Duration::from_secs(60), || (listed(d) >= start + n as f64).then_some(()));
}

#[test]
fn forty_documents_uploaded_while_the_daemon_runs_end_once_each() {
    let Some(s) = Setup::new("") else { return };
    let docs = documents(40);
    let names: Vec<String> = docs.iter().map(|(n, _)| n.clone()).collect();
    let d = s.serve(&[]);
    let store = s.s3.store(BUCKET);

    // Three uploads stay in progress (one part sent, not completed) across rescans.
    let (multipart, single) = docs.split_at(3);
    let mut open: Vec<Box<dyn MultipartUpload>> = Vec::new();
    for (name, bytes) in multipart {
        let mut up = s.s3.block_on(store.put_multipart(&Key::from(format!("in/{name}")))).unwrap();
        s.s3.block_on(up.put_part(PutPayload::from(bytes.clone()))).unwrap();
        open.push(up);
    }
    for (i, (name, bytes)) in single.iter().enumerate() {
        s.s3.put(BUCKET, &format!("in/{name}"), bytes.clone());
        if i % 8 == 0 {
            std::thread::sleep(Duration::from_millis(700));
        }
    }
    rescans(&d, 2);
    let jobs = s.jobs();
    for (name, _) in multipart {
        assert!(!jobs.iter().any(|(r, _, _)| r == name), "{name}: taken while its upload was in progress");
    }
    for mut up in open {
        s.s3.block_on(up.complete()).unwrap();
    }
    wait_for("every document to end", Duration::from_secs(900), || s.ended(&names).then_some(()));
    s.assert_exactly_once(&names);
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 40, "one job per document: {jobs:?}");
    let states: Vec<&str> = jobs.iter().map(|j| j.2.as_str()).collect();
    assert!(states.contains(&"done") && states.contains(&"quarantined"), "mixed outcomes: {states:?}");

    // The same bytes again under the same key are the same object version: nothing new. Under
    // another key, a duplicate, skipped. New bytes under a known key: a new document.
    let (done_name, done_bytes) = docs.iter().find(|(n, _)| jobs.iter().any(|(r, _, st)| r == n && st == "done")).unwrap();
    s.s3.put(BUCKET, &format!("in/{done_name}"), done_bytes.clone());
    s.s3.put(BUCKET, &format!("in/again-{done_name}"), done_bytes.clone());
    let mut changed = done_bytes.clone();
    changed.extend_from_slice(b"\n\nAddendum: the parties agree to a second version of this document.\n");
    let changed_name = docs.iter().map(|(n, _)| n).find(|n| *n != done_name && n.ends_with(".md")).unwrap();
    s.s3.put(BUCKET, &format!("in/{changed_name}"), changed.clone());
    let again = format!("again-{done_name}");
    let all: Vec<String> = names.iter().cloned().chain([again.clone()]).collect();
    wait_for("the new uploads to end", Duration::from_secs(300), || {
        let jobs = s.jobs();
        let changed_jobs = jobs.iter().filter(|(r, _, st)| r == changed_name && st != "queued" && st != "running").count();
        (changed_jobs == 2 && s.ended(&all)).then_some(())
    });
    rescans(&d, 2);
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 42, "the same object again made no job; the duplicate and the new bytes one each: {jobs:?}");
    assert!(jobs.iter().any(|(r, _, st)| *r == again && st == "skipped"), "{again}: not skipped as a duplicate");
    s.assert_exactly_once(&all);
    let r: Value = serde_json::from_slice(&s.s3.get(BUCKET, &format!("results/{changed_name}.json"))).unwrap();
    assert_eq!(r["source"]["sha256"].as_str(), Some(sha256(&changed).as_str()), "the result is of the new bytes");
    assert_eq!(metric(&d.scrape(), "deltadoc_object_store_errors_total", &["op=\"put\""]), Some(0.0));
    d.stop();
}

#[test]
fn a_store_stopped_for_30_s_mid_run_loses_and_duplicates_nothing() {
    // Longer answers, so that the outage lands while documents are running.
    let stages = "stages:
  - {name: summary, kind: summarize, max_new_tokens: 48}
  - {name: parties, kind: prompt, instruction: \"List the parties.\", max_new_tokens: 32}
";
    let Some(mut s) = Setup::with_stages("", stages) else { return };
    let docs = documents(12);
    let names: Vec<String> = docs.iter().map(|(n, _)| n.clone()).collect();
    for (name, bytes) in &docs {
        s.s3.put(BUCKET, &format!("in/{name}"), bytes.clone());
    }
    let d = s.serve(&[]);
    wait_for("the first results", Duration::from_secs(300), || (s.s3.keys(BUCKET, "results").len() >= 2).then_some(()));
    s.s3.stop();
    let down = Instant::now();
    assert!(!s.ended(&names), "every document ended before the outage: make them longer");
    // Meanwhile the daemon says so: not ready, the inbox failing, errors counted, and
    // `deltadoc status` names the unreachable inbox.
    let (code, body) = wait_for("/readyz to fail", Duration::from_secs(30), || {
        let (code, body) = d.get("/readyz");
        (code == 503 && body.contains("inbox")).then_some((code, body))
    });
    assert_eq!(code, 503, "{body}");
    let status = s.status();
    let inbox = &status["inboxes"][0];
    assert_eq!(inbox["reachable"], Value::Bool(false), "{status}");
    while down.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
    }
    s.s3.restart();
    wait_for("every document to end", Duration::from_secs(900), || s.ended(&names).then_some(()));
    s.assert_exactly_once(&names);
    let jobs = s.jobs();
    assert_eq!(jobs.len(), names.len(), "one job per document: {jobs:?}");
    let m = d.scrape();
    let errors: f64 = bucket_ops().iter().map(|op| metric(&m, "deltadoc_object_store_errors_total", &[op]).unwrap_or(0.0)).sum();
    assert!(errors > 0.0, "the outage was counted:\n{m}");
    assert_eq!(d.get("/readyz").0, 200, "ready again");
    let log = d.log();
    assert!(log.contains("reachable again"), "the ingest saw the store back:\n{log}");
    assert!(log.contains("after waiting"), "the worker held a download or a result through the outage:\n{log}");
    d.stop();
}

#[test]
fn a_stores_notification_lists_the_bucket_before_the_next_rescan() {
    let Some(mut s) = Setup::new("") else { return };
    // No rescan within the test: only the start-up listing and notifications list the bucket.
    let d = s.serve(&[("DELTADOC_RESCAN_INTERVAL", "1h")]);
    s.s3.notify(&format!("http://{}/notify/s3", d.metrics_addr));
    let docs = documents(3);
    for (name, bytes) in &docs {
        s.s3.put(BUCKET, &format!("in/{name}"), bytes.clone());
    }
    let names: Vec<String> = docs.iter().map(|(n, _)| n.clone()).collect();
    wait_for("the notified documents to end", Duration::from_secs(300), || s.ended(&names).then_some(()));
    s.assert_exactly_once(&names);
    let m = d.scrape();
    assert_eq!(metric(&m, "deltadoc_inbox_rescans_total", &[]), Some(1.0), "only the start-up rescan ran");
    assert!(metric(&m, "deltadoc_watch_events_total", &["source=\"notification\""]).unwrap_or(0.0) >= 3.0, "{m}");
    // Something that is not a notification lists every bucket inbox, and is answered alike.
    let (code, _) = d.post("/notify/s3", "{}");
    assert_eq!(code, 204);
    d.stop();
}

fn bucket_ops() -> [&'static str; 5] {
    ["op=\"list\"", "op=\"get\"", "op=\"put\"", "op=\"head\"", "op=\"delete\""]
}

#[test]
fn two_daemons_on_one_bucket_and_a_postgresql_ledger_write_each_result_once() {
    let Some(cluster) = Cluster::start() else { return };
    let url = cluster.database("buckets");
    let config = format!("ledger: {url}\nledger_password_file: {:?}\nworker: {{lease: 3s}}\n", cluster.password_file());
    let Some(s) = Setup::new(&config) else { return };
    let docs = documents(20);
    let names: Vec<String> = docs.iter().map(|(n, _)| n.clone()).collect();
    let daemons: Vec<Daemon> = (0..2)
        .map(|n| {
            let state = s.sb.path(&format!("state-{n}"));
            s.serve(&[("DELTADOC_WORKER_NAME", &format!("d{n}")), ("DELTADOC_STATE_DIR", state.to_str().unwrap())])
        })
        .collect();
    for (name, bytes) in &docs {
        s.s3.put(BUCKET, &format!("in/{name}"), bytes.clone());
    }
    wait_for("every document to end", Duration::from_secs(900), || s.ended(&names).then_some(()));
    s.assert_exactly_once(&names);
    assert_eq!(s.jobs().len(), names.len(), "both daemons listed the bucket; one job per document");
    let workers = s.status()["workers"].as_array().unwrap().clone();
    let per_worker: Vec<u64> = workers.iter().map(|w| w["documents"].as_u64().unwrap()).collect();
    assert!(per_worker.len() == 2 && per_worker.iter().all(|&n| n > 0), "both daemons took documents: {per_worker:?}");
    for d in daemons {
        d.stop();
    }
}

#[test]
fn the_stores_certificate_is_verified_and_a_private_authority_is_taken_from_ca_file() {
    if common::corpus().is_none() {
        return;
    }
    if !common::certs::available() {
        assert!(std::env::var("DELTADOC_S3").as_deref() != Ok("required"), "openssl is required for certificates");
        eprintln!("skipped: no openssl to make the TLS certificates");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let ca = common::certs::authority(certs.path(), "ca");
    let (cert, key) = common::certs::localhost(certs.path(), "s3");
    let Some(s3) = S3Server::start_with(Some(Tls { cert, key, ca: ca.clone() })) else { return };
    s3.bucket(BUCKET);
    let nda = std::fs::read(common::corpus_path().join("contracts/commonpaper__Mutual-NDA.md")).unwrap();
    s3.put(BUCKET, "in/nda.md", nda);

    // Signed by an authority the system does not know: refused, and said.
    let s = Setup::on(s3, "", "", QUICK_STAGES);
    let status = s.status();
    let inbox = &status["inboxes"][0];
    assert_eq!(inbox["reachable"], Value::Bool(false), "{status}");
    assert!(inbox["detail"].as_str().unwrap().to_lowercase().contains("certificate"), "{status}");
    let out = s.sb.run_with(&["run", "--once"], &AWS_ENV);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.s3.keys(BUCKET, "results").is_empty(), "a result through an unverified connection");

    // With the authority in `ca_file`: verified, and the document runs.
    let s = Setup::on(s.s3, &format!(", ca_file: {ca:?}"), "", QUICK_STAGES);
    assert_eq!(s.status()["inboxes"][0]["reachable"], Value::Bool(true));
    let out = s.sb.run_with(&["run", "--once"], &AWS_ENV);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.s3.keys(BUCKET, "results"), ["results/nda.md.json"]);
}
