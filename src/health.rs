//! Liveness and readiness: what `/livez` and `/readyz` answer, and the worker heartbeat they
//! read.
//!
//! Ready means the daemon can turn a dropped file into a result right now: the model is loaded,
//! the ledger takes writes, every inbox can be listed, and when documents are queued the worker
//! has shown progress recently (a stuck prefill or a wedged extraction otherwise looks healthy).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::store::{Ledger, now_s, state};

/// State shared by the worker (which beats) and the HTTP endpoint (which checks).
#[derive(Debug)]
pub struct Health {
    model_loaded: AtomicBool,
    /// Unix milliseconds of the worker's last sign of progress.
    heartbeat_ms: AtomicU64,
    stall_after: Duration,
}

/// One readiness check's verdict.
#[derive(Debug, Serialize)]
pub struct Check {
    /// What was checked (`model`, `ledger`, `inbox`, `worker`).
    pub check: &'static str,
    /// Passed.
    pub ok: bool,
    /// Why it failed, or what was seen.
    pub detail: String,
}

/// The answer of `/readyz`.
#[derive(Debug, Serialize)]
pub struct Readiness {
    /// Every check passed.
    pub ready: bool,
    /// All checks, failed ones first.
    pub checks: Vec<Check>,
}

impl Health {
    /// Not ready until the model is loaded; a stall is `stall_after` without a heartbeat while
    /// work is queued.
    pub fn new(stall_after: Duration) -> Self {
        Self { model_loaded: AtomicBool::new(false), heartbeat_ms: AtomicU64::new(now_ms()), stall_after }
    }

    /// The model is loaded and the worker starts.
    pub fn model_loaded(&self) {
        self.model_loaded.store(true, Ordering::SeqCst);
        self.beat();
    }

    /// The worker made progress (polled the queue, finished a step, prefilled a chunk, made a
    /// token).
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Seconds since the last heartbeat.
    pub fn silent_for(&self) -> f64 {
        now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)) as f64 / 1000.0
    }

    /// Runs every check. `ledger` is probed with a real write; `inboxes` are listed.
    pub fn check(&self, ledger: &mut dyn Ledger, inboxes: &[(String, PathBuf)]) -> Readiness {
        let mut checks = Vec::new();
        let loaded = self.model_loaded.load(Ordering::SeqCst);
        checks.push(Check {
            check: "model",
            ok: loaded,
            detail: if loaded { "loaded".into() } else { "the model is still loading".into() },
        });
        checks.push(match ledger.probe_write(now_s()) {
            Ok(()) => Check { check: "ledger", ok: true, detail: "writable".into() },
            Err(e) => Check { check: "ledger", ok: false, detail: format!("{e:#}") },
        });
        for (pipeline, dir) in inboxes {
            checks.push(match std::fs::read_dir(dir) {
                Ok(_) => Check { check: "inbox", ok: true, detail: format!("{pipeline}: {}", dir.display()) },
                Err(e) => Check { check: "inbox", ok: false, detail: format!("{pipeline}: {}: {e}", dir.display()) },
            });
        }
        let queued: u64 = ledger
            .counts()
            .map(|c| c.iter().filter(|(_, s, _)| s == state::QUEUED || s == state::RUNNING).map(|(_, _, n)| n).sum())
            .unwrap_or(0);
        let silent = self.silent_for();
        let stalled = loaded && queued > 0 && silent > self.stall_after.as_secs_f64();
        checks.push(Check {
            check: "worker",
            ok: !stalled,
            detail: if stalled {
                format!("{queued} document(s) wait and the worker has shown no progress for {silent:.0} s")
            } else {
                format!("last progress {silent:.0} s ago, {queued} document(s) queued or running")
            },
        });
        checks.sort_by_key(|c| c.ok);
        Readiness { ready: checks.iter().all(|c| c.ok), checks }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteLedger;

    #[test]
    fn readiness_follows_model_inboxes_and_stalls() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = SqliteLedger::open(&dir.path().join("state")).unwrap();
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let inboxes = vec![("p".to_string(), inbox.clone())];
        let h = Health::new(Duration::ZERO);
        let r = h.check(&mut ledger, &inboxes);
        assert!(!r.ready && r.checks[0].check == "model", "{r:?}");
        h.model_loaded();
        assert!(h.check(&mut ledger, &inboxes).ready);
        std::fs::remove_dir(&inbox).unwrap();
        let r = h.check(&mut ledger, &inboxes);
        assert!(!r.ready && r.checks[0].check == "inbox" && r.checks[0].detail.contains("inbox"), "{r:?}");
        std::fs::create_dir(&inbox).unwrap();
        assert!(h.check(&mut ledger, &inboxes).ready);
        // Queued work and no heartbeat within `stall_after` (zero here): stalled.
        let job = crate::store::NewJob {
            key: "k",
            pipeline: "p",
            priority: 0,
            inbox: &inbox,
            rel_path: std::path::Path::new("a.pdf"),
            sha256: "s",
            size: 1,
            reprocess_duplicates: false,
        };
        ledger.discover(&job).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let r = h.check(&mut ledger, &inboxes);
        assert!(!r.ready && r.checks[0].check == "worker", "{r:?}");
        let patient = Health::new(Duration::from_secs(60));
        patient.model_loaded();
        assert!(patient.check(&mut ledger, &inboxes).ready);
    }
}
