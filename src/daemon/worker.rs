//! The worker: claims the next job the schedules allow, runs its document through the pipeline,
//! writes the result, or retries with doubling backoff, or quarantines. It talks to the ledger
//! only through [`Ledger`], and reads time from a [`Clock`], so tests drive it with a fake one.
//!
//! With `worker.max_docs` 1 it runs one document at a time, the model on its own thread. With
//! more, each document in flight runs on a thread of its own (a slot, with its own ledger
//! connection and crash-marker record) and the model on another, which decodes the requests of
//! every document together (`llm/host.rs`); the worker's thread claims a job whenever a slot is
//! free, in the ledger's order, and gives each document an equal share of the memory budget
//! beyond what they share (the weights, and one prefill's activations: prefills take turns).
//!
//! Every ledger write about a job carries the job's [`Lease`](crate::ledger::Lease), and before it writes a result or
//! quarantines a document the worker asks the ledger whether the lease is still its own: a
//! worker that was paused or cut off past its lease, while another daemon took the job over,
//! writes nothing (`ledger/mod.rs`).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use jiff::Timestamp;

use super::Mode;
use super::crash_marker::{self, CrashMarker, Place};
use super::documents::{Document, Places};
use super::events::{
    AttemptEnded, DocumentCrashedDaemon, DocumentStarted, InternalEvent, LeaseLost, Outcome, Prefilled, StepStarted,
};
use super::health::Health;
use super::heartbeat::Watch;
use super::metrics::Metrics;
use super::signals::Signals;
use super::storage::{Folder, Held, Storage};
use crate::config::{Config, Pipeline, QuarantineMode};
use crate::extract::isolated::Extraction;
use crate::failure::{Failure, Reason};
use crate::ledger::{self, Job, Ledger, state};
use crate::llm::{TextModel, host};
use crate::output::{self, ErrorReport, JobRef};
use crate::pipeline::{self, Context, DocLimits};
use crate::progress::DocProgress;
use crate::schedule::{Clock, Scheduler};
use crate::stage::{Journal, Runner, Stop};

/// Why [`Worker::run`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Shutdown, or (once) the inboxes are done.
    Done,
    /// SIGHUP: reload, then run again.
    Reload,
}

/// What one [`Worker::tick`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Tick {
    /// Ran a document.
    Worked,
    /// Nothing to run now; look again after this long.
    Idle(Duration),
    /// Stop running.
    Exit(Exit),
}

/// What the worker's turn comes to.
enum Turn {
    /// A job to run.
    Claimed(Box<Job>),
    /// Nothing to run now; look again after this long.
    Idle(Duration),
    /// Stop running.
    Exit(Exit),
}

/// What every job of the worker shares, whichever thread runs it.
pub(crate) struct Shared<'a> {
    /// Configuration (replaced on reload, between documents).
    pub cfg: Arc<Config>,
    pub metrics: &'a Metrics,
    /// Heartbeat for readiness.
    pub health: &'a Health,
    /// How documents' text is extracted.
    pub extraction: Extraction,
    /// Time for schedules, backoff and queue order.
    pub clock: &'a dyn Clock,
    pub signals: &'a Signals,
    /// Where the running jobs are, for the next start if this process dies under them.
    pub marker: &'a CrashMarker,
    /// The running jobs, for the heartbeat, which says when another worker took one over.
    pub watch: &'a Watch,
    /// Where documents are read and results written (folders and buckets).
    pub places: Places,
}

/// Runs jobs: one at a time, or several in flight (`worker.max_docs`).
pub(crate) struct Worker<'a> {
    pub shared: Shared<'a>,
    /// Its own ledger connection (claims, and the job it runs itself).
    pub ledger: Box<dyn Ledger>,
    /// Which scheduled pipelines are in their window.
    pub scheduler: Scheduler,
    /// Documents run since the last start or reload.
    pub processed: usize,
}

/// One job's run: what the worker shares, a ledger connection, and the crash-marker record of
/// the slot that runs it.
struct Attempt<'w, 'a> {
    shared: &'w Shared<'a>,
    ledger: &'w mut dyn Ledger,
    marker: crash_marker::Slot<'w>,
    /// The part of `memory_budget` the document's plan may use.
    memory: Share,
}

fn unix_s(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

impl<'a> Worker<'a> {
    /// Runs jobs until shutdown, a reload, or (once) until the inboxes are done.
    pub fn run(&mut self, model: &mut (dyn TextModel + Send), mode: Mode, ingest_done: &AtomicBool) -> Result<Exit> {
        self.processed = 0;
        let docs = self.shared.cfg.daemon.worker.max_docs;
        if docs > 1 {
            return self.run_in_flight(model, mode, ingest_done, docs);
        }
        let mut idle_logged = false;
        loop {
            match self.tick(model, mode, ingest_done, &mut idle_logged)? {
                // The turn that claimed the job said so to `idle_logged` already.
                Tick::Worked => {}
                Tick::Idle(d) => std::thread::sleep(d),
                Tick::Exit(e) => return Ok(e),
            }
        }
    }

    /// One turn: signals, schedules, then the next job if one may run, run here.
    pub fn tick(
        &mut self,
        model: &mut dyn TextModel,
        mode: Mode,
        ingest_done: &AtomicBool,
        idle_logged: &mut bool,
    ) -> Result<Tick> {
        match self.turns().turn(mode, ingest_done, idle_logged, false, true)? {
            Turn::Claimed(job) => {
                let (marker, memory) = (self.shared.marker.slot(0), Share::whole(&self.shared.cfg));
                Attempt { shared: &self.shared, ledger: &mut *self.ledger, marker, memory }.run_job(model, *job)?;
                Ok(Tick::Worked)
            }
            Turn::Idle(d) => Ok(Tick::Idle(d)),
            Turn::Exit(e) => Ok(Tick::Exit(e)),
        }
    }

    /// Up to `docs` documents at once, each on a thread of its own, the model serving them all
    /// from another. Ends like [`Self::run`], once the documents in flight have ended; a
    /// document's thread that fails (its ledger is gone) stops the others as a shutdown does.
    fn run_in_flight(
        &mut self,
        model: &mut (dyn TextModel + Send),
        mode: Mode,
        ingest_done: &AtomicBool,
        docs: usize,
    ) -> Result<Exit> {
        let cfg = self.shared.cfg.clone();
        let memory = Share::of(model, cfg.daemon.memory_budget.0, docs);
        let mut free = Vec::with_capacity(docs);
        for slot in (0..docs).rev() {
            free.push((slot, ledger::open(&cfg.daemon)?));
        }
        let (ended, endings) = channel();
        let Worker { shared, ledger, scheduler, processed } = self;
        let shared = &*shared;
        let mut turns = Turns { shared, ledger: &mut **ledger, scheduler, processed };
        let failed = || shared.signals.request_shutdown();
        host::serve(model, cfg.daemon.worker.max_batch, docs, &failed, |hosted| {
            std::thread::scope(|s| {
                let mut running = 0;
                let mut idle_logged = false;
                let mut ending: Option<Result<Exit>> = None;
                let mut wait = Duration::ZERO;
                loop {
                    // Slots whose document ended take the next.
                    while let Ok((slot, ledger, r)) = endings.recv_timeout(wait) {
                        running -= 1;
                        free.push((slot, ledger));
                        if let Err(e) = r {
                            shared.signals.request_shutdown();
                            ending.get_or_insert(Err(e));
                        }
                        wait = Duration::ZERO;
                    }
                    if ending.is_some() {
                        if running == 0 {
                            return ending.take().expect("checked");
                        }
                        wait = Duration::from_millis(250);
                        continue;
                    }
                    wait = match turns.turn(mode, ingest_done, &mut idle_logged, running > 0, !free.is_empty()) {
                        Ok(Turn::Claimed(job)) => {
                            let (slot, mut ledger) = free.pop().expect("a job is claimed only into a free slot");
                            let (ended, mut model, id) = (ended.clone(), hosted(), job.id);
                            running += 1;
                            s.spawn(move || {
                                let marker = shared.marker.slot(slot);
                                let mut attempt = Attempt { shared, ledger: &mut *ledger, marker, memory };
                                // A panic ends the daemon as it would with one document at a time,
                                // after the other documents in flight.
                                let r = catch_unwind(AssertUnwindSafe(|| attempt.run_job(&mut model, *job)));
                                let r = r.unwrap_or_else(|_| Err(anyhow!("the thread of job {id} panicked")));
                                let _ = ended.send((slot, ledger, r));
                            });
                            Duration::ZERO
                        }
                        // Waits until then, or until a document ends.
                        Ok(Turn::Idle(d)) => d,
                        Ok(Turn::Exit(e)) => {
                            ending = Some(Ok(e));
                            Duration::ZERO
                        }
                        Err(e) => {
                            shared.signals.request_shutdown();
                            ending = Some(Err(e));
                            Duration::ZERO
                        }
                    };
                }
            })
        })?
    }

    /// The worker's turns, on its own connection.
    fn turns(&mut self) -> Turns<'_, 'a> {
        Turns { shared: &self.shared, ledger: &mut *self.ledger, scheduler: &mut self.scheduler, processed: &mut self.processed }
    }

    /// Quarantines a job the daemon died under at the same place too many times in a row
    /// (`Ledger::recover`), without another attempt.
    pub fn crashed(&mut self, job: &Job, place: &Place, in_a_row: u32) -> Result<()> {
        let (marker, memory) = (self.shared.marker.slot(0), Share::whole(&self.shared.cfg));
        Attempt { shared: &self.shared, ledger: &mut *self.ledger, marker, memory }.crashed(job, place, in_a_row)
    }
}

/// What a turn of the worker uses: what jobs share, the worker's own ledger connection, its
/// schedules and its count.
struct Turns<'w, 'a> {
    shared: &'w Shared<'a>,
    ledger: &'w mut dyn Ledger,
    scheduler: &'w mut Scheduler,
    processed: &'w mut usize,
}

impl Turns<'_, '_> {
    /// Signals, schedules, then the next job if one may run and a slot is free (`room`). `busy`:
    /// jobs are in flight, so `run --once` is not done whatever the queue says.
    fn turn(&mut self, mode: Mode, ingest_done: &AtomicBool, idle_logged: &mut bool, busy: bool, room: bool) -> Result<Turn> {
        self.shared.health.beat();
        if self.shared.signals.shutdown_requested() {
            tracing::info!("shutting down: {} document(s) processed since the last start or reload", *self.processed);
            return Ok(Turn::Exit(Exit::Done));
        }
        if self.shared.signals.take_reload() {
            if mode == Mode::Serve {
                tracing::info!("SIGHUP: reloading the configuration and pipelines");
                return Ok(Turn::Exit(Exit::Reload));
            }
            tracing::warn!("SIGHUP ignored: `run --once` keeps the configuration it started with");
        }
        let now = self.shared.clock.now();
        if mode == Mode::Serve {
            let (folder, place) = ledger_place(&*self.ledger);
            let (storage, cfg, scheduler, ledger) =
                (self.shared.storage(), &self.shared.cfg, &mut *self.scheduler, &mut *self.ledger);
            let events =
                storage.hold(folder, &place, || scheduler.tick(now, &mut *ledger, &cfg.pipelines)).map_err(Held::into_error)?;
            for ev in events {
                ev.emit(self.shared.metrics);
            }
        }
        if !room {
            return Ok(Turn::Idle(Duration::from_millis(250)));
        }
        let cfg = self.shared.cfg.clone();
        let open: Vec<&str> =
            cfg.pipelines.iter().filter(|p| mode == Mode::Once || self.scheduler.open(p)).map(|p| p.name()).collect();
        if let Some(job) = self.record(|l| l.claim(&open, unix_s(now)))? {
            *self.processed += 1;
            *idle_logged = false;
            return Ok(Turn::Claimed(Box::new(job)));
        }
        if mode == Mode::Serve || busy || !ingest_done.load(Ordering::SeqCst) {
            return Ok(Turn::Idle(Duration::from_millis(250)));
        }
        // Once, and the inboxes are recorded: done unless failed documents wait for a retry.
        let waiting: u64 = self
            .ledger
            .counts()?
            .into_iter()
            .filter(|(_, s, _)| s == state::RETRY_WAIT || s == state::QUEUED)
            .map(|(_, _, n)| n)
            .sum();
        if waiting == 0 {
            tracing::info!("done: {} document(s) processed", *self.processed);
            return Ok(Turn::Exit(Exit::Done));
        }
        if !std::mem::replace(idle_logged, true) {
            tracing::info!("{waiting} document(s) wait for a retry (limits.retry_backoff)");
        }
        Ok(Turn::Idle(Duration::from_millis(500)))
    }

    /// A held ledger write on the worker's own connection ([`held`]).
    fn record<T>(&mut self, write: impl FnMut(&mut dyn Ledger) -> Result<T>) -> Result<T> {
        held(self.shared, &mut *self.ledger, write)
    }
}

/// The part of `memory_budget` one document's memory plan may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Share {
    /// Bytes.
    pub bytes: u64,
    /// Documents in flight it is one share of.
    pub documents: usize,
}

impl Share {
    /// The whole budget, for one document at a time.
    pub fn whole(cfg: &Config) -> Self {
        Self { bytes: cfg.daemon.memory_budget.0, documents: 1 }
    }

    /// One of `documents` in flight: what they share once (the weights, one prefill's
    /// activations, as prefills take turns: the plan of a one-token context), and the rest of
    /// `budget` in equal parts.
    fn of(model: &dyn TextModel, budget: u64, documents: usize) -> Self {
        let shared = model.planned_bytes(1, false).min(budget);
        Self { bytes: shared + (budget - shared) / documents.max(1) as u64, documents }
    }
}

impl<'a> Shared<'a> {
    /// How this worker holds writes the storage refuses.
    fn storage(&self) -> Storage<'a> {
        Storage { metrics: self.metrics, health: self.health, signals: self.signals }
    }
}

/// Where a ledger lives, for a held write: the state folder, or the database.
fn ledger_place(ledger: &dyn Ledger) -> (Folder, PathBuf) {
    match ledger.folder() {
        Some(dir) => (Folder::State, dir.to_path_buf()),
        None => (Folder::Ledger, PathBuf::from(ledger.describe())),
    }
}

/// A ledger write, held while the state folder refuses it or the ledger database cannot be
/// reached (`daemon/storage.rs`). A drain during the wait ends the daemon with the error: the
/// next start recovers the job.
fn held<T>(shared: &Shared, ledger: &mut dyn Ledger, mut write: impl FnMut(&mut dyn Ledger) -> Result<T>) -> Result<T> {
    let (folder, place) = ledger_place(ledger);
    shared.storage().hold(folder, &place, || write(ledger)).map_err(Held::into_error)
}

impl Attempt<'_, '_> {
    fn run_job(&mut self, model: &mut dyn TextModel, job: Job) -> Result<()> {
        let cfg = self.shared.cfg.clone();
        let lease = job.lease();
        let Ok(p) = cfg.pipeline(&job.pipeline) else {
            tracing::warn!("job {}: pipeline {:?} is no longer configured; left queued", job.id, job.pipeline);
            self.record(|l| l.release(lease))?;
            return Ok(());
        };
        let now = unix_s(self.shared.clock.now());
        DocumentStarted { pipeline: p.name(), waited_s: now - job.queued_at }.emit(self.shared.metrics);
        let show = DocProgress::new(format!("job {} {}", job.id, job.rel_path.display()));
        let started = Instant::now();
        let marker = self.marker;
        marker.start(job.id);
        let lost_lease = self.shared.watch.start(lease);
        let journal = Journal::of_job(cfg.daemon.resume_dir(), job.id);
        let fetched = self.fetch(&job);
        let result = fetched.map(|doc| {
            let ledger = &mut *self.ledger;
            let metrics = self.shared.metrics;
            let mut on_step = |s: &str| {
                StepStarted { step: s, progress: &show }.emit(metrics);
                marker.step(s);
                let _ = ledger.set_stage(lease, s);
            };
            let health = self.shared.health;
            let runner = Runner {
                model,
                deadline: Instant::now() + cfg.daemon.limits.document_timeout.0,
                shutdown: self.shared.signals.shutdown_flag(),
                abandoned: &lost_lease,
                on_step: &mut on_step,
                on_prefill: &|n| Prefilled { tokens: n, progress: &show }.emit(metrics),
                heartbeat: &|| {
                    health.beat();
                    marker.beat();
                },
                on_child: &|waiting| marker.waiting(waiting),
                journal: Some(&journal),
            };
            let mut ctx = Context { pipeline: p, limits: limits(&cfg, self.memory), extraction: &self.shared.extraction, runner };
            let local = doc.local(&job);
            let processed = pipeline::process(&mut ctx, local, &job.rel_path, Some(&job.sha256));
            // A download is read under its local name; people know the document by its URL.
            let processed = match processed {
                Ok(mut r) => {
                    r.source.path = job.source.clone();
                    Ok(r)
                }
                Err(Stop::Failed(mut f)) if local != job.source => {
                    f.message = f.message.replace(&*local.to_string_lossy(), &job.source.to_string_lossy());
                    Err(Stop::Failed(f))
                }
                Err(e) => Err(e),
            };
            (processed, doc)
        });
        let (result, doc) = match result {
            Ok((r, doc)) => (r, Some(doc)),
            Err(stop) => (Err(stop), None),
        };
        let seconds = started.elapsed().as_secs_f64();
        let (name, progress) = (p.name(), &show);
        // Asked once the work is done, not before each write: the answer renews the lease for a
        // whole lease period, far longer than the write takes.
        let lost = lost_lease.load(Ordering::SeqCst);
        self.shared.watch.end(lease);
        if lost || (result.is_ok() && !self.record(|l| l.holds(lease))?) {
            let outcome = self.lost(&job, "result");
            AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.shared.metrics);
            self.shared.places.done(&job);
            marker.clear();
            return Ok(());
        }
        let storage = self.shared.storage();
        let places = &self.shared.places;
        let written = result.and_then(|mut r| {
            let out = p.output.join(&job.rel_path, ".json");
            marker.step("write");
            r.job = Some(JobRef { id: job.id, lease: lease.generation });
            let wrote =
                storage.hold(Folder::Output, &out, || places.write_result(&p.output, &job.rel_path, &r)).map_err(|held| {
                    match held {
                        Held::Drained(_) => Stop::Interrupted,
                        Held::Failed(e) => Stop::Failed(Failure::new(Reason::Io, "write", format!("{e:#}"))),
                    }
                })?;
            Ok((r, out, wrote))
        });
        match written {
            Ok((r, out, wrote)) => {
                let now = unix_s(self.shared.clock.now());
                if !wrote || !self.record(|l| l.done(lease, &out, now))? {
                    let outcome = self.lost(&job, "result");
                    AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.shared.metrics);
                    self.shared.places.done(&job);
                    marker.clear();
                    return Ok(());
                }
                journal.clear();
                let outcome = Outcome::Done { result: &r, output: &out };
                AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.shared.metrics);
            }
            Err(Stop::Interrupted) => {
                self.record(|l| l.release(lease))?;
                AttemptEnded { pipeline: name, seconds, outcome: Outcome::Interrupted, progress }.emit(self.shared.metrics);
            }
            Err(Stop::Failed(f)) => {
                let outcome = self.fail(p, &job, doc.as_ref(), &f)?;
                // A retry keeps the calls that went through; a quarantined job needs them no more.
                if matches!(outcome, Outcome::Quarantined { .. }) {
                    journal.clear();
                }
                AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.shared.metrics);
            }
        }
        self.shared.places.done(&job);
        marker.clear();
        Ok(())
    }

    /// The job's document where the pipeline can read it: the file, or the object downloaded.
    /// A store that cannot be reached is waited for like a full disk (`daemon/storage.rs`).
    fn fetch(&self, job: &Job) -> Result<Document, Stop> {
        self.marker.step("fetch");
        match self.shared.storage().hold(Folder::Inbox, &job.source, || self.shared.places.fetch(job)) {
            Ok(Ok(doc)) => Ok(doc),
            Ok(Err(f)) => Err(Stop::Failed(f)),
            Err(Held::Drained(_)) => Err(Stop::Interrupted),
            Err(Held::Failed(e)) => Err(Stop::Failed(Failure::new(Reason::Io, "detect", format!("{e:#}")))),
        }
    }

    /// A held ledger write on the attempt's connection ([`held`]).
    fn record<T>(&mut self, write: impl FnMut(&mut dyn Ledger) -> Result<T>) -> Result<T> {
        held(self.shared, &mut *self.ledger, write)
    }

    /// Quarantines a job the daemon died under at the same place too many times in a row
    /// (`Ledger::recover`), without another attempt.
    fn crashed(&mut self, job: &Job, place: &Place, in_a_row: u32) -> Result<()> {
        let cfg = self.shared.cfg.clone();
        let msg = format!(
            "{}: deltadoc stopped {in_a_row} times in a row while processing it, each time at the same place ({place}); \
             the document is taken to be what brings the process down",
            job.source.display()
        );
        let f = Failure::new(Reason::Crashed, place.step.clone(), msg);
        match cfg.pipeline(&job.pipeline) {
            Ok(p) => {
                if matches!(self.fail(p, job, None, &f)?, Outcome::Quarantined { .. }) {
                    Journal::of_job(&cfg.daemon.state_dir, job.id).clear();
                }
                DocumentCrashedDaemon { pipeline: p.name(), source: &job.source, failure: &f }.emit(self.shared.metrics);
            }
            // Its pipeline is gone: nowhere to quarantine it, so it waits like its other jobs.
            Err(_) => self.record(|l| l.release(job.lease()))?,
        }
        Ok(())
    }

    /// A failed attempt: retried after a backoff that doubles with each attempt while attempts
    /// are left and the reason is transient, otherwise quarantined.
    fn fail<'f>(&mut self, p: &Pipeline, job: &Job, doc: Option<&Document>, f: &'f Failure) -> Result<Outcome<'f>> {
        let limits = self.shared.cfg.daemon.limits.clone();
        let now = unix_s(self.shared.clock.now());
        let lease = job.lease();
        if !f.reason.is_permanent() && job.attempts < limits.max_attempts {
            let wait = limits.retry_backoff.0.as_secs_f64() * 2f64.powi(job.attempts as i32 - 1);
            if !self.record(|l| l.failed(lease, f, Some(now + wait), None, now))? {
                return Ok(self.lost(job, "retry"));
            }
            return Ok(Outcome::Retrying { failure: f, next: job.attempts + 1, max: limits.max_attempts, wait_s: wait });
        }
        if !self.record(|l| l.holds(lease))? {
            return Ok(self.lost(job, "quarantine entry"));
        }
        let report = ErrorReport {
            failure: f,
            attempts: job.attempts,
            pipeline: p.name(),
            source: &job.source,
            sha256: &job.sha256,
            quarantined_at: output::now_rfc3339(),
            deltadoc_version: env!("CARGO_PKG_VERSION"),
        };
        self.marker.step("quarantine");
        let move_it = p.spec.quarantine_mode == QuarantineMode::Move;
        let into = p.quarantine.join(&job.rel_path, "");
        let (storage, places) = (self.shared.storage(), &self.shared.places);
        let moved = match storage.hold(Folder::Quarantine, &into, || places.quarantine(job, doc, &p.quarantine, move_it, &report))
        {
            Ok(at) => Some(at),
            Err(Held::Drained(_)) => {
                // Nothing is lost: the next start runs the document again and quarantines it then.
                self.record(|l| l.release(lease))?;
                return Ok(Outcome::Interrupted);
            }
            Err(Held::Failed(e)) => {
                tracing::error!("{}: cannot quarantine: {e:#}", job.source.display());
                None
            }
        };
        let source = if move_it { moved.as_deref() } else { None };
        if !self.record(|l| l.failed(lease, f, None, source, now))? {
            return Ok(self.lost(job, "failure"));
        }
        Ok(Outcome::Quarantined { failure: f })
    }

    /// The job went to another worker while this one ran it: `withheld` is not written. The
    /// job's journal stays for the worker that holds it now, unless the job has ended meanwhile:
    /// then the entries this attempt wrote after its successor removed the journal go.
    fn lost<'f>(&mut self, job: &Job, withheld: &str) -> Outcome<'f> {
        LeaseLost { job: job.id, document: &job.rel_path, withheld }.emit(self.shared.metrics);
        let ended = self.ledger.job(job.id).ok().flatten().is_some_and(|j| !state::OPEN.contains(&j.state.as_str()));
        if ended {
            Journal::of_job(self.shared.cfg.daemon.resume_dir(), job.id).clear();
        }
        Outcome::Lost
    }
}

/// A document's limits under the configuration, its memory plan within `memory`.
pub(crate) fn limits(cfg: &Config, memory: Share) -> DocLimits {
    let l = &cfg.daemon.limits;
    DocLimits {
        max_file_bytes: l.max_file_bytes.0,
        memory_budget: memory.bytes,
        documents: memory.documents,
        max_batch: cfg.daemon.worker.max_batch,
    }
}

#[cfg(test)]
mod tests {
    use super::Share;
    use crate::llm::fake::{Answer, FakeModel};

    #[test]
    fn documents_in_flight_share_the_budget_beyond_what_they_share_once() {
        // The fake plans a kilobyte per token of context: 1 KiB shared.
        let model = FakeModel::new(8192, |_| Answer::Text(String::new()));
        assert_eq!(Share::of(&model, 1 << 20, 4), Share { bytes: 1024 + ((1 << 20) - 1024) / 4, documents: 4 });
        assert_eq!(Share::of(&model, 1 << 20, 1).bytes, 1 << 20);
        assert_eq!(Share::of(&model, 512, 2).bytes, 512, "a budget below the shared part is all shared");
    }
}
