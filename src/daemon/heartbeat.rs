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

/// The job the worker runs, shared with the heartbeat, which sets [`Watch::lost`] when another
/// worker took it over.
#[derive(Default)]
pub(crate) struct Watch {
    current: Mutex<Option<Lease>>,
    /// The running job is no longer this worker's: abandon it.
    pub lost: AtomicBool,
}

impl Watch {
    /// The worker starts `lease`'s job, or (`None`) ended its job.
    pub fn running(&self, lease: Option<Lease>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *current = lease;
        self.lost.store(false, Ordering::SeqCst);
    }

    /// Asks the ledger whether the running job is still this worker's.
    fn check(&self, ledger: &mut dyn Ledger) -> Result<()> {
        let Some(lease) = *self.current.lock().unwrap_or_else(|p| p.into_inner()) else { return Ok(()) };
        let held = ledger.holds(lease)?;
        // Only if the worker still runs that job: it may have ended it meanwhile.
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if !held && *current == Some(lease) {
            self.lost.store(true, Ordering::SeqCst);
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
