//! Three daemons on one PostgreSQL ledger (a throwaway cluster, tests/common/pg_cluster.rs) and
//! one shared inbox of real documents, as docs/fleet.md describes: every document ends with
//! exactly one result or quarantine entry, through SIGKILLs of random daemons and a restart of
//! the database; a dead daemon's job is taken over within its lease plus one heartbeat; a paused
//! daemon whose job was finished elsewhere writes nothing when it resumes.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::pg_cluster::Cluster;
use common::sandbox::{Daemon, QUICK_STAGES, Sandbox, metric, wait_for};
use serde_json::Value;

/// The daemons' lease: short, so takeovers happen within the test (heartbeat every second).
const LEASE_S: f64 = 3.0;

struct Fleet {
    sb: Sandbox,
    cluster: Cluster,
    db: String,
}

impl Fleet {
    /// A sandbox whose daemons share database `db` of a fresh cluster, or `None` when PostgreSQL
    /// or the corpus is missing (and not required).
    fn new(db: &str, stages: &str) -> Option<Fleet> {
        Self::with_context(db, stages, 1024)
    }

    /// [`Fleet::new`] with contexts of `max_tokens`.
    fn with_context(db: &str, stages: &str, max_tokens: usize) -> Option<Fleet> {
        common::corpus()?;
        let cluster = Cluster::start()?;
        let url = cluster.database(db);
        let sb = Sandbox::with_stages("", max_tokens, stages);
        let cfg = sb.path("config/deltadoc.yaml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        // Each daemon has its own state folder (`daemon`) and all share one resume folder, as
        // on a shared volume.
        text.push_str(&format!(
            "ledger: {url}\nledger_password_file: {:?}\nworker: {{lease: {LEASE_S}s}}\nresume_dir: {:?}\n",
            cluster.password_file(),
            sb.path("shared")
        ));
        std::fs::write(&cfg, text).unwrap();
        Some(Fleet { sb, cluster, db: db.into() })
    }

    /// Who runs document `rel` in a stage now: (worker, lease generation, job id).
    fn running(&self, rel: &str) -> Option<(String, i64, i64)> {
        let mut c = self.cluster.client(&self.db);
        c.query_opt(
            "SELECT w.name, j.lease_gen, j.id FROM jobs j JOIN workers w ON w.id = j.lease_owner
             WHERE j.rel_path = $1 AND j.state = 'running' AND j.stage IS NOT NULL",
            &[&rel],
        )
        .unwrap()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
    }

    /// Daemon `n` of the fleet: its own name and state folder.
    fn daemon(&self, n: usize) -> Daemon {
        let state = self.sb.path(&format!("state-{n}"));
        self.sb.serve_with(&[("DELTADOC_WORKER_NAME", &format!("d{n}")), ("DELTADOC_STATE_DIR", state.to_str().unwrap())])
    }

    /// Fills the inbox with the corpus' text files, malformed files and text PDFs (62 real
    /// documents of every kind the extractors read); their names.
    fn fill(&self) -> Vec<String> {
        let names: Vec<String> = ["text", "malformed", "pdf"].iter().flat_map(|d| self.sb.fill_inbox(d)).collect();
        assert!(names.len() >= 60, "{} documents", names.len());
        names
    }

    /// The ledger's jobs by document: (id, state, lease generation).
    fn jobs(&self) -> HashMap<String, (i64, String, i64)> {
        let mut c = self.cluster.client(&self.db);
        c.query("SELECT rel_path, id, state, lease_gen FROM jobs", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect()
    }

    /// Every document of `names` is in the ledger and has ended.
    fn ended(&self, names: &[String]) -> bool {
        let jobs = self.jobs();
        names.iter().all(|n| jobs.get(n).is_some_and(|(_, s, _)| ["done", "quarantined", "skipped"].contains(&s.as_str())))
    }

    /// Exactly one outcome per document: a result of its job's last lease, or a quarantine
    /// entry, or (a duplicate of another) neither; no temporary files left.
    fn assert_exactly_once(&self, names: &[String]) {
        let jobs = self.jobs();
        for n in names {
            let (id, state, lease) = &jobs[n];
            let result = self.sb.path(&format!("out/p/{n}.json"));
            let quarantined = self.sb.path(&format!("quarantine/p/{n}.error.json")).exists();
            match state.as_str() {
                "done" => {
                    let r: Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
                    assert_eq!((r["job"]["id"].as_i64(), r["job"]["lease"].as_i64()), (Some(*id), Some(*lease)), "{n}");
                    assert!(!quarantined, "{n}: a result and a quarantine entry");
                }
                "quarantined" => assert!(quarantined && !result.exists(), "{n}: quarantined without its entry, or with a result"),
                "skipped" => assert!(!quarantined && !result.exists(), "{n}: a skipped duplicate with an outcome"),
                other => panic!("{n}: {other}"),
            }
        }
        let leftovers: Vec<PathBuf> = ["out/p", "quarantine/p"]
            .iter()
            .flat_map(|d| std::fs::read_dir(self.sb.path(d)).into_iter().flatten().flatten())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        let results = common::sandbox::json_files(&self.sb.path("out/p")).len();
        let done = jobs.values().filter(|(_, s, _)| s == "done").count();
        assert_eq!(results, done, "one result file per done job");
    }
}

#[test]
fn three_daemons_share_one_inbox_and_end_every_document_once() {
    let Some(f) = Fleet::new("three", QUICK_STAGES) else { return };
    let names = f.fill();
    let daemons: Vec<Daemon> = (0..3).map(|n| f.daemon(n)).collect();
    wait_for("every document to end", Duration::from_secs(900), || f.ended(&names).then_some(()));
    f.assert_exactly_once(&names);

    // Every daemon worked, and all report the same fleet-wide queue (aggregated with max).
    let status = f.sb.status();
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{status}");
    let done = f.jobs().values().filter(|(_, s, _)| s == "done").count() as u64;
    let per_worker: Vec<u64> = workers.iter().map(|w| w["documents"].as_u64().unwrap()).collect();
    assert_eq!(per_worker.iter().sum::<u64>(), done, "{per_worker:?}");
    assert!(per_worker.iter().all(|&n| n > 0), "every daemon took documents: {per_worker:?}");
    for d in &daemons {
        let m = d.scrape();
        assert_eq!(metric(&m, "deltadoc_queue_depth", &["state=\"done\""]), Some(done as f64));
        assert_eq!(metric(&m, "deltadoc_fleet_workers", &["state=\"live\""]), Some(3.0));
        assert_eq!(metric(&m, "deltadoc_ledger_up", &[]), Some(1.0));
    }
    for d in daemons {
        d.stop();
    }
    assert!(f.sb.status()["workers"].as_array().unwrap().is_empty(), "stopped daemons leave the list");
}

/// A small xorshift: the kill order, reproducible from the seed it prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kills_of_random_daemons_and_a_database_restart_lose_and_duplicate_nothing() {
    // Longer answers, so that the kills land in the middle of documents.
    let stages = "stages:
  - {name: summary, kind: summarize, max_new_tokens: 64}
  - {name: parties, kind: prompt, instruction: \"List the parties.\", max_new_tokens: 48}
";
    let Some(f) = Fleet::new("kills", stages) else { return };
    let names = f.fill();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill order seed {seed}");
    let mut rng = Rng(seed);
    let mut daemons: Vec<Daemon> = (0..3).map(|n| f.daemon(n)).collect();
    let mut kills = 0;
    while kills < 20 {
        std::thread::sleep(Duration::from_millis(700 + rng.below(1500)));
        let n = rng.below(3) as usize;
        let d = &mut daemons[n];
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        kills += 1;
        if kills == 10 {
            // The database goes down and comes back while the other daemons work.
            f.cluster.pg_ctl("restart");
        }
        daemons[n] = f.daemon(n);
        assert!(!f.ended(&names) || kills >= 20, "the documents ended after only {kills} kills: make them longer");
    }
    wait_for("every document to end", Duration::from_secs(900), || f.ended(&names).then_some(()));
    f.assert_exactly_once(&names);
    let interrupted: i64 =
        f.cluster.client(&f.db).query_one("SELECT COALESCE(SUM(interruptions), 0) FROM jobs", &[]).unwrap().get(0);
    assert!(interrupted > 0, "the kills interrupted documents");
    for d in daemons {
        d.stop();
    }
}

#[test]
fn a_dead_daemons_job_is_taken_over_in_time_and_a_paused_one_writes_nothing() {
    let Some(f) = Fleet::new("fencing", QUICK_STAGES) else { return };
    // A long contract in small contexts: many model calls.
    let contract = common::corpus_path().join("contracts/CERES,INC_01_25_2012-EX-10.20-Collaboration Agreement.txt");
    std::fs::copy(contract, f.sb.path("inbox/ceres.txt")).unwrap();
    let running = |f: &Fleet| f.running("ceres.txt");

    // d0 takes the document, completes some model calls and is killed mid-run; d1, idle, has it
    // within the lease plus a heartbeat (with a second for a loaded machine).
    let mut d0 = f.daemon(0);
    let (.., job) = wait_for("d0 to run the contract", Duration::from_secs(120), || running(&f).filter(|(w, ..)| w == "d0"));
    let d1 = f.daemon(1);
    d1.wait_log("joined as worker d1", Duration::from_secs(120));
    let journal = f.sb.path(&format!("shared/journal/{job}"));
    let kept = wait_for("d0's model calls in the shared journal", Duration::from_secs(120), || {
        // Finished entries only: a writer's temporary file (`.<name>.<pid>-<nonce>.tmp`,
        // src/output.rs) becomes an entry at its rename, and the kill below may come first.
        let entries = std::fs::read_dir(&journal)
            .map(|d| d.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count());
        let n = entries.unwrap_or(0);
        (n >= 2).then_some(n)
    });
    d0.child.kill().unwrap();
    d0.child.wait().unwrap();
    let killed = Instant::now();
    wait_for("d1 to take the contract over", Duration::from_secs(30), || running(&f).filter(|(w, ..)| w == "d1"));
    let took = killed.elapsed().as_secs_f64();
    assert!(took <= LEASE_S + LEASE_S / 3.0 + 1.0, "taken over after {took:.1} s");
    d1.wait_log("its lease ran out and the job is queued again", Duration::from_secs(5));
    // d1 resumes: the calls d0 completed are answered from the shared journal, not computed.
    wait_for("d1 to take d0's calls from the journal", Duration::from_secs(60), || {
        let reused = d1.log().lines().filter(|l| l.contains("from the job's journal")).count();
        (reused >= kept).then_some(())
    });

    // d1 is paused (SIGSTOP) past its lease; d2 takes the job over and finishes it.
    let d2 = f.daemon(2);
    d2.wait_log("joined as worker d2", Duration::from_secs(120));
    d1.signal(libc::SIGSTOP);
    let (_, lease, _) =
        wait_for("d2 to take the contract over", Duration::from_secs(60), || running(&f).filter(|(w, ..)| w == "d2"));
    let result = f.sb.path("out/p/ceres.txt.json");
    wait_for("d2's result", Duration::from_secs(900), || result.exists().then_some(()));
    let written = std::fs::read(&result).unwrap();
    let r: Value = serde_json::from_slice(&written).unwrap();
    assert_eq!(r["job"]["lease"].as_i64(), Some(lease));

    // d1 resumes, finishes its stale attempt, and writes nothing.
    d1.signal(libc::SIGCONT);
    d1.wait_log("this worker lost its lease while it ran", Duration::from_secs(900));
    assert_eq!(std::fs::read(&result).unwrap(), written, "the result is d2's, untouched");
    // What d1 journalled after d2 ended the job goes with d1's stale attempt.
    wait_for("d1's stale journal entries to go", Duration::from_secs(10), || (!journal.exists()).then_some(()));
    assert_eq!(metric(&d1.scrape(), "deltadoc_leases_lost_total", &[]), Some(1.0));
    let names = vec!["ceres.txt".to_string()];
    f.assert_exactly_once(&names);
    let status = f.sb.status();
    let docs: HashMap<String, u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap().to_string(), w["documents"].as_u64().unwrap()))
        .collect();
    assert_eq!((docs.get("d1"), docs.get("d2")), (Some(&0), Some(&1)), "{status}");
    d1.stop();
    d2.stop();
}

#[test]
fn a_job_taken_over_resumes_the_dead_daemons_prefill_from_the_shared_checkpoint() {
    // Contexts of 64,000 tokens: the contract's first chunk is one prompt long enough to be
    // checkpointed every 16,384 tokens (src/llm/ort.rs) three times, seconds apart.
    let Some(f) = Fleet::with_context("checkpoint", QUICK_STAGES, 64_000) else { return };
    let contract = common::corpus_path().join("contracts/CERES,INC_01_25_2012-EX-10.20-Collaboration Agreement.txt");
    std::fs::copy(contract, f.sb.path("inbox/ceres.txt")).unwrap();
    let mut d0 = f.daemon(0);
    wait_for("d0 to run the contract", Duration::from_secs(120), || f.running("ceres.txt").filter(|(w, ..)| w == "d0"));
    let d1 = f.daemon(1);
    d1.wait_log("joined as worker d1", Duration::from_secs(120));
    // d0 dies after its first checkpoint, before its prefill ends.
    let checkpoints = f.sb.path("shared/checkpoints");
    let snapshot = || {
        let files = std::fs::read_dir(&checkpoints).ok()?;
        files.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "ddsnap"))
    };
    let saved = wait_for("d0's first prefill checkpoint", Duration::from_secs(300), snapshot);
    d0.child.kill().unwrap();
    d0.child.wait().unwrap();
    assert!(f.running("ceres.txt").is_some_and(|(w, ..)| w == "d0"), "killed mid-prefill, before the document ended");
    // d1 takes the job over and resumes the prefill where d0's checkpoint left it.
    let line = d1.wait_log("resuming prefill at token", Duration::from_secs(120));
    assert!(line.contains(&saved.display().to_string()), "{line}");
    let at: usize = line.split("resuming prefill at token ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap();
    assert!(at > 0 && at.is_multiple_of(16_384), "resumed at a checkpoint: {line}");
    d1.stop();
}
