//! The worker's heartbeat: a thread with a ledger connection of its own that renews the worker's
//! leases every third of `worker.lease` while the worker computes (a prefill can take hours
//! without returning to the worker loop), and queues again the jobs of workers whose lease ran
//! out ([`Ledger::reap`]), so a dead machine's job goes to an idle daemon within the lease plus
//! one heartbeat. A paused process (SIGSTOP) stops its heartbeat too: that is what fencing is for
//! (`ledger/mod.rs`); once resumed, the heartbeat finds the worker's job taken over and tells
//! the worker ([`Watch`]), which abandons the attempt at its next model step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::events::{InternalEvent, LeaseTakenOver, LedgerReached};
use super::metrics::Metrics;
use crate::ledger::{Lease, Ledger, WorkerId};

/// The jobs the worker runs, shared with the heartbeat, which sets a job's flag when another
/// worker took it over.
#[derive(Default)]
pub(crate) struct Watch {
    running: Mutex<Vec<(Lease, Arc<AtomicBool>)>>,
}

impl Watch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Lease, Arc<AtomicBool>)>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker starts `lease`'s job; the flag returned is set when the job is no longer its
    /// own: abandon it.
    pub fn start(&self, lease: Lease) -> Arc<AtomicBool> {
        let lost = Arc::new(AtomicBool::new(false));
        self.lock().push((lease, lost.clone()));
        lost
    }

    /// The worker ended `lease`'s job.
    pub fn end(&self, lease: Lease) {
        self.lock().retain(|(l, _)| *l != lease);
    }

    /// Asks the ledger whether each running job is still this worker's.
    fn check(&self, ledger: &mut dyn Ledger) -> Result<()> {
        let running: Vec<Lease> = self.lock().iter().map(|(l, _)| *l).collect();
        for lease in running {
            let held = ledger.holds(lease)?;
            // Only if the worker still runs that job: it may have ended it meanwhile.
            if !held && let Some((_, lost)) = self.lock().iter().find(|(l, _)| *l == lease) {
                lost.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

/// The running heartbeat thread.
pub(crate) struct Heartbeat {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Heartbeat {
    /// Starts beating for `worker` (`me`) every third of its lease, watching the job in `watch`.
    pub fn start(
        mut ledger: Box<dyn Ledger>,
        (worker, me): (i64, WorkerId),
        watch: Arc<Watch>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let every = Duration::from_secs_f64(me.lease_s / 3.0);
        let handle = std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
            let shown = ledger.describe();
            let mut was_down = false;
            while !stopped.load(Ordering::SeqCst) {
                let started = Instant::now();
                let beat = ledger.heartbeat(worker, &me).and_then(|rejoined| {
                    if rejoined {
                        tracing::warn!(
                            "{shown}: the ledger had forgotten worker {} (silent for more than a day); registered again",
                            me.name
                        );
                    }
                    watch.check(&mut *ledger)
                });
                match beat.and_then(|()| ledger.reap()) {
                    Ok(takeovers) => {
                        LedgerReached { ledger: &shown, error: None, was_down }.emit(&metrics);
                        was_down = false;
                        for t in &takeovers {
                            LeaseTakenOver { takeover: t }.emit(&metrics);
                        }
                    }
                    Err(e) => {
                        LedgerReached { ledger: &shown, error: Some(&e), was_down }.emit(&metrics);
                        was_down = true;
                    }
                }
                // Short sleeps, so that a stop is not kept waiting a whole beat.
                while !stopped.load(Ordering::SeqCst) && started.elapsed() < every {
                    std::thread::sleep(Duration::from_millis(100).min(every));
                }
            }
        })?;
        Ok(Self { stop, handle })
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.join();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ledger::{NewJob, SqliteLedger};

    #[test]
    fn only_the_job_another_worker_took_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let me = |name: &str| WorkerId { name: name.into(), host: "h".into(), pid: 1, lease_s: 30.0 };
        let (mut a, mut b) = (SqliteLedger::open(dir.path()).unwrap(), SqliteLedger::open(dir.path()).unwrap());
        a.join(&me("a")).unwrap();
        b.join(&me("b")).unwrap();
        for key in ["k1", "k2"] {
            let rel = Path::new(key);
            let job = NewJob {
                key,
                pipeline: "p",
                priority: 0,
                inbox: Path::new("/in"),
                rel_path: rel,
                sha256: key,
                size: 1,
                reprocess_duplicates: false,
            };
            a.discover(&job).unwrap();
        }
        let (first, second) = (a.claim(&["p"], 1.0).unwrap().unwrap(), a.claim(&["p"], 1.0).unwrap().unwrap());
        let watch = Watch::default();
        let (lost_first, lost_second) = (watch.start(first.lease()), watch.start(second.lease()));
        // The first job goes back to the queue and to the other worker.
        a.release(first.lease()).unwrap();
        assert_eq!(b.claim(&["p"], 2.0).unwrap().unwrap().id, first.id);
        watch.check(&mut a).unwrap();
        assert!(lost_first.load(Ordering::SeqCst), "the job taken over is flagged");
        assert!(!lost_second.load(Ordering::SeqCst), "the other job is still this worker's");
        // A job the worker ended is no longer watched.
        watch.end(second.lease());
        a.release(second.lease()).unwrap();
        b.claim(&["p"], 3.0).unwrap().unwrap();
        watch.check(&mut a).unwrap();
        assert!(!lost_second.load(Ordering::SeqCst), "an ended job is not watched");
    }
}
