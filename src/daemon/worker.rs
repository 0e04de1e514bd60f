//! The worker: claims the next job the schedules allow, runs its document through the pipeline,
//! writes the result, or retries with doubling backoff, or quarantines. It talks to the ledger
//! only through [`Ledger`], and reads time from a [`Clock`], so tests drive it with a fake one.
//!
//! Every ledger write about a job carries the job's [`Lease`](crate::ledger::Lease), and before it writes a result or
//! quarantines a document the worker asks the ledger whether the lease is still its own: a
//! worker that was paused or cut off past its lease, while another daemon took the job over,
//! writes nothing (`ledger/mod.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use jiff::Timestamp;

use super::Mode;
use super::crash_marker::{CrashMarker, Place};
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
use crate::ledger::{Job, Ledger, state};
use crate::llm::TextModel;
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

/// Runs jobs one at a time.
pub(crate) struct Worker<'a> {
    /// Configuration (replaced on reload, between documents).
    pub cfg: Arc<Config>,
    /// Its own ledger connection.
    pub ledger: Box<dyn Ledger>,
    pub metrics: &'a Metrics,
    /// Heartbeat for readiness.
    pub health: &'a Health,
    /// How documents' text is extracted.
    pub extraction: Extraction,
    /// Which scheduled pipelines are in their window.
    pub scheduler: Scheduler,
    /// Time for schedules, backoff and queue order.
    pub clock: &'a dyn Clock,
    pub signals: &'a Signals,
    /// Where the running job is, for the next start if this process dies under it.
    pub marker: &'a CrashMarker,
    /// The running job, for the heartbeat, which says when another worker took it over.
    pub watch: &'a Watch,
    /// Documents run since the last start or reload.
    pub processed: usize,
    /// Where documents are read and results written (folders and buckets).
    pub places: Places,
}

fn unix_s(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

impl<'a> Worker<'a> {
    /// Runs jobs until shutdown, a reload, or (once) until the inboxes are done.
    pub fn run(&mut self, model: &mut dyn TextModel, mode: Mode, ingest_done: &AtomicBool) -> Result<Exit> {
        self.processed = 0;
        let mut idle_logged = false;
        loop {
            match self.tick(model, mode, ingest_done, &mut idle_logged)? {
                Tick::Worked => idle_logged = false,
                Tick::Idle(d) => std::thread::sleep(d),
                Tick::Exit(e) => return Ok(e),
            }
        }
    }

    /// One turn: signals, schedules, then the next job if one may run.
    pub fn tick(
        &mut self,
        model: &mut dyn TextModel,
        mode: Mode,
        ingest_done: &AtomicBool,
        idle_logged: &mut bool,
    ) -> Result<Tick> {
        self.health.beat();
        if self.signals.shutdown_requested() {
            tracing::info!("shutting down: {} document(s) processed since the last start or reload", self.processed);
            return Ok(Tick::Exit(Exit::Done));
        }
        if self.signals.take_reload() {
            if mode == Mode::Serve {
                tracing::info!("SIGHUP: reloading the configuration and pipelines");
                return Ok(Tick::Exit(Exit::Reload));
            }
            tracing::warn!("SIGHUP ignored: `run --once` keeps the configuration it started with");
        }
        let now = self.clock.now();
        if mode == Mode::Serve {
            let (folder, place) = self.ledger_place();
            let (storage, cfg, scheduler, ledger) = (self.storage(), &self.cfg, &mut self.scheduler, &mut self.ledger);
            let events =
                storage.hold(folder, &place, || scheduler.tick(now, &mut **ledger, &cfg.pipelines)).map_err(Held::into_error)?;
            for ev in events {
                ev.emit(self.metrics);
            }
        }
        let cfg = self.cfg.clone();
        let open: Vec<&str> =
            cfg.pipelines.iter().filter(|p| mode == Mode::Once || self.scheduler.open(p)).map(|p| p.name()).collect();
        if let Some(job) = self.record(|l| l.claim(&open, unix_s(now)))? {
            self.processed += 1;
            self.run_job(model, job)?;
            return Ok(Tick::Worked);
        }
        if mode == Mode::Serve || !ingest_done.load(Ordering::SeqCst) {
            return Ok(Tick::Idle(Duration::from_millis(250)));
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
            tracing::info!("done: {} document(s) processed", self.processed);
            return Ok(Tick::Exit(Exit::Done));
        }
        if !std::mem::replace(idle_logged, true) {
            tracing::info!("{waiting} document(s) wait for a retry (limits.retry_backoff)");
        }
        Ok(Tick::Idle(Duration::from_millis(500)))
    }

    fn run_job(&mut self, model: &mut dyn TextModel, job: Job) -> Result<()> {
        let cfg = self.cfg.clone();
        let lease = job.lease();
        let Ok(p) = cfg.pipeline(&job.pipeline) else {
            tracing::warn!("job {}: pipeline {:?} is no longer configured; left queued", job.id, job.pipeline);
            self.record(|l| l.release(lease))?;
            return Ok(());
        };
        let now = unix_s(self.clock.now());
        DocumentStarted { pipeline: p.name(), waited_s: now - job.queued_at }.emit(self.metrics);
        let show = DocProgress::new(format!("job {} {}", job.id, job.rel_path.display()));
        let started = Instant::now();
        let marker = self.marker;
        marker.start(job.id);
        self.watch.running(Some(lease));
        let journal = Journal::of_job(cfg.daemon.resume_dir(), job.id);
        let fetched = self.fetch(&job);
        let result = fetched.map(|doc| {
            let ledger = &mut self.ledger;
            let metrics = self.metrics;
            let mut on_step = |s: &str| {
                StepStarted { step: s, progress: &show }.emit(metrics);
                marker.step(s);
                let _ = ledger.set_stage(lease, s);
            };
            let health = self.health;
            let runner = Runner {
                model,
                deadline: Instant::now() + cfg.daemon.limits.document_timeout.0,
                shutdown: self.signals.shutdown_flag(),
                abandoned: &self.watch.lost,
                on_step: &mut on_step,
                on_prefill: &|n| Prefilled { tokens: n, progress: &show }.emit(metrics),
                heartbeat: &|| {
                    health.beat();
                    marker.beat();
                },
                on_child: &|waiting| marker.waiting(waiting),
                journal: Some(&journal),
            };
            let mut ctx = Context { pipeline: p, limits: limits(&cfg), extraction: &self.extraction, runner };
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
        let lost = self.watch.lost.load(Ordering::SeqCst);
        self.watch.running(None);
        if lost || (result.is_ok() && !self.record(|l| l.holds(lease))?) {
            let outcome = self.lost(&job, "result");
            AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.metrics);
            self.places.done(&job);
            marker.clear();
            return Ok(());
        }
        let storage = self.storage();
        let places = &self.places;
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
                let now = unix_s(self.clock.now());
                if !wrote || !self.record(|l| l.done(lease, &out, now))? {
                    let outcome = self.lost(&job, "result");
                    AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.metrics);
                    self.places.done(&job);
                    marker.clear();
                    return Ok(());
                }
                journal.clear();
                let outcome = Outcome::Done { result: &r, output: &out };
                AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.metrics);
            }
            Err(Stop::Interrupted) => {
                self.record(|l| l.release(lease))?;
                AttemptEnded { pipeline: name, seconds, outcome: Outcome::Interrupted, progress }.emit(self.metrics);
            }
            Err(Stop::Failed(f)) => {
                let outcome = self.fail(p, &job, doc.as_ref(), &f)?;
                // A retry keeps the calls that went through; a quarantined job needs them no more.
                if matches!(outcome, Outcome::Quarantined { .. }) {
                    journal.clear();
                }
                AttemptEnded { pipeline: name, seconds, outcome, progress }.emit(self.metrics);
            }
        }
        self.places.done(&job);
        marker.clear();
        Ok(())
    }

    /// The job's document where the pipeline can read it: the file, or the object downloaded.
    /// A store that cannot be reached is waited for like a full disk (`daemon/storage.rs`).
    fn fetch(&self, job: &Job) -> Result<Document, Stop> {
        self.marker.step("fetch");
        match self.storage().hold(Folder::Inbox, &job.source, || self.places.fetch(job)) {
            Ok(Ok(doc)) => Ok(doc),
            Ok(Err(f)) => Err(Stop::Failed(f)),
            Err(Held::Drained(_)) => Err(Stop::Interrupted),
            Err(Held::Failed(e)) => Err(Stop::Failed(Failure::new(Reason::Io, "detect", format!("{e:#}")))),
        }
    }

    /// How this worker holds writes the storage refuses.
    fn storage(&self) -> Storage<'a> {
        Storage { metrics: self.metrics, health: self.health, signals: self.signals }
    }

    /// Where the ledger lives, for a held write: the state folder, or the database.
    fn ledger_place(&self) -> (Folder, PathBuf) {
        match self.ledger.folder() {
            Some(dir) => (Folder::State, dir.to_path_buf()),
            None => (Folder::Ledger, PathBuf::from(self.ledger.describe())),
        }
    }

    /// A ledger write, held while the state folder refuses it or the ledger database cannot be
    /// reached (`daemon/storage.rs`). A drain during the wait ends the daemon with the error: the
    /// next start recovers the job.
    fn record<T>(&mut self, mut write: impl FnMut(&mut dyn Ledger) -> Result<T>) -> Result<T> {
        let (folder, place) = self.ledger_place();
        let storage = self.storage();
        let ledger = &mut self.ledger;
        storage.hold(folder, &place, || write(&mut **ledger)).map_err(Held::into_error)
    }

    /// Quarantines a job the daemon died under at the same place too many times in a row
    /// (`Ledger::recover`), without another attempt.
    pub fn crashed(&mut self, job: &Job, place: &Place, in_a_row: u32) -> Result<()> {
        let cfg = self.cfg.clone();
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
                DocumentCrashedDaemon { pipeline: p.name(), source: &job.source, failure: &f }.emit(self.metrics);
            }
            // Its pipeline is gone: nowhere to quarantine it, so it waits like its other jobs.
            Err(_) => self.record(|l| l.release(job.lease()))?,
        }
        Ok(())
    }

    /// A failed attempt: retried after a backoff that doubles with each attempt while attempts
    /// are left and the reason is transient, otherwise quarantined.
    fn fail<'f>(&mut self, p: &Pipeline, job: &Job, doc: Option<&Document>, f: &'f Failure) -> Result<Outcome<'f>> {
        let limits = self.cfg.daemon.limits.clone();
        let now = unix_s(self.clock.now());
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
        let (storage, places) = (self.storage(), &self.places);
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
        LeaseLost { job: job.id, document: &job.rel_path, withheld }.emit(self.metrics);
        let ended = self.ledger.job(job.id).ok().flatten().is_some_and(|j| !state::OPEN.contains(&j.state.as_str()));
        if ended {
            Journal::of_job(self.cfg.daemon.resume_dir(), job.id).clear();
        }
        Outcome::Lost
    }
}

/// A document's limits under the configuration.
pub(crate) fn limits(cfg: &Config) -> DocLimits {
    let l = &cfg.daemon.limits;
    DocLimits {
        max_file_bytes: l.max_file_bytes.0,
        memory_budget: cfg.daemon.memory_budget.0,
        max_batch: cfg.daemon.worker.max_batch,
    }
}
