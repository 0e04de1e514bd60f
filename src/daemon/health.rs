//! Liveness and readiness: the worker heartbeat and the checks `/readyz` runs.
//!
//! Ready means the daemon can turn a dropped file into a result right now: the model is loaded,
//! the ledger takes writes, every inbox can be listed, the worker is not holding a write the
//! storage refuses (`daemon/storage.rs`), and when documents are queued the worker has shown
//! progress recently (a stuck prefill or a wedged extraction otherwise looks healthy).
//! The ledger and inbox checks touch disks and networks; [`super::http`] runs them off the
//! async runtime with a deadline, so a hung mount fails its check instead of the endpoint.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::bucket::Stores;
use crate::config::Location;
use crate::ledger::{Ledger, now_s, state};

/// State shared by the worker (which beats) and the HTTP endpoint (which checks).
#[derive(Debug)]
pub(crate) struct Health {
    model_loaded: AtomicBool,
    /// Unix milliseconds of the worker's last sign of progress.
    heartbeat_ms: AtomicU64,
    stall_after: Duration,
    /// What the worker cannot write now (`daemon/storage.rs`), for people.
    blocked: Mutex<Option<String>>,
}

/// One readiness check's verdict.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Check {
    /// What was checked (`model`, `ledger`, `inbox`, `worker`, `storage`).
    pub check: &'static str,
    /// Whether the check passed.
    pub ok: bool,
    /// Why it failed, or what was seen.
    pub detail: String,
}

/// The answer of `/readyz`.
#[derive(Debug, Serialize)]
pub(crate) struct Readiness {
    /// Every check passed.
    pub ready: bool,
    /// All checks, failed ones first.
    pub checks: Vec<Check>,
}

impl Readiness {
    /// The verdict over `checks`, failed ones first.
    pub fn of(mut checks: Vec<Check>) -> Self {
        checks.sort_by_key(|c| c.ok);
        Self { ready: checks.iter().all(|c| c.ok), checks }
    }
}

impl Health {
    /// Not ready until the model is loaded; a stall is `stall_after` without a heartbeat while
    /// work is queued.
    pub fn new(stall_after: Duration) -> Self {
        Self {
            model_loaded: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(now_ms()),
            stall_after,
            blocked: Mutex::default(),
        }
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

    /// Whether the model is loaded (from memory).
    pub fn model_check(&self) -> Check {
        let loaded = self.model_loaded.load(Ordering::SeqCst);
        Check { check: "model", ok: loaded, detail: if loaded { "loaded".into() } else { "the model is still loading".into() } }
    }

    /// The worker holds a write the storage refuses (`Some`, with what and why), or no longer.
    pub fn set_blocked(&self, what: Option<String>) {
        *self.blocked.lock().unwrap_or_else(|p| p.into_inner()) = what;
    }

    /// Whether the worker's last write went through (from memory).
    pub fn storage_check(&self) -> Check {
        match self.blocked.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(why) => Check { check: "storage", ok: false, detail: why },
            None => Check { check: "storage", ok: true, detail: "writes go through".into() },
        }
    }

    /// Whether the worker shows progress while `queued` documents wait (from memory).
    pub fn worker_check(&self, queued: u64) -> Check {
        let loaded = self.model_loaded.load(Ordering::SeqCst);
        let silent = self.silent_for();
        let stalled = loaded && queued > 0 && silent > self.stall_after.as_secs_f64();
        Check {
            check: "worker",
            ok: !stalled,
            detail: if stalled {
                format!("{queued} document(s) wait and the worker has shown no progress for {silent:.0} s")
            } else {
                format!("last progress {silent:.0} s ago, {queued} document(s) queued or running")
            },
        }
    }
}

/// The ledger takes a durable write now (a full disk or a read-only mount fails here before a
/// result is lost).
pub(crate) fn ledger_check(ledger: &mut dyn Ledger) -> Check {
    match ledger.probe_write(now_s()) {
        Ok(()) => Check { check: "ledger", ok: true, detail: "writable".into() },
        Err(e) => Check { check: "ledger", ok: false, detail: format!("{e:#}") },
    }
}

/// The documents queued or running, from the ledger's jobs per (pipeline, state).
pub(crate) fn queued_or_running(counts: &[(String, String, u64)]) -> u64 {
    counts.iter().filter(|(_, s, _)| s == state::QUEUED || s == state::RUNNING).map(|(_, _, n)| n).sum()
}

/// The inbox folder of `pipeline` can be listed.
pub(crate) fn inbox_check(pipeline: &str, inbox: &Location, stores: &Stores) -> Check {
    // A store's error names the bucket; a file system's does not name the folder.
    let listed = match inbox {
        Location::Folder(dir) => std::fs::read_dir(dir).map(drop).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display())),
        Location::Bucket(url) => stores.bucket(&url.bucket).and_then(|b| Ok(b.reachable(&url.prefix)?)),
    };
    match listed {
        Ok(()) => Check { check: "inbox", ok: true, detail: format!("{pipeline}: {inbox}") },
        Err(e) => Check { check: "inbox", ok: false, detail: format!("{pipeline}: {e:#}") },
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ledger::SqliteLedger;

    fn readiness(h: &Health, ledger: &mut dyn Ledger, inbox: &Path) -> Readiness {
        let l = ledger_check(ledger);
        let queued = queued_or_running(&ledger.counts().unwrap());
        let stores = Stores::new(&Default::default());
        let inbox = Location::Folder(inbox.to_path_buf());
        Readiness::of(vec![h.model_check(), l, inbox_check("p", &inbox, &stores), h.worker_check(queued)])
    }

    #[test]
    fn readiness_follows_model_inboxes_and_stalls() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = SqliteLedger::open(&dir.path().join("state")).unwrap();
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let h = Health::new(Duration::ZERO);
        let r = readiness(&h, &mut ledger, &inbox);
        assert!(!r.ready && r.checks[0].check == "model", "{r:?}");
        h.model_loaded();
        assert!(readiness(&h, &mut ledger, &inbox).ready);
        std::fs::remove_dir(&inbox).unwrap();
        let r = readiness(&h, &mut ledger, &inbox);
        assert!(!r.ready && r.checks[0].check == "inbox" && r.checks[0].detail.contains("inbox"), "{r:?}");
        std::fs::create_dir(&inbox).unwrap();
        assert!(readiness(&h, &mut ledger, &inbox).ready);
        // Queued work and no heartbeat within `stall_after` (zero here): stalled.
        let job = crate::ledger::NewJob {
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
        let r = readiness(&h, &mut ledger, &inbox);
        assert!(!r.ready && r.checks[0].check == "worker", "{r:?}");
        let patient = Health::new(Duration::from_secs(60));
        patient.model_loaded();
        assert!(readiness(&patient, &mut ledger, &inbox).ready);
    }
}
