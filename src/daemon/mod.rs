//! The daemon: an ingest thread ([`ingest`]) that finds stable files and records them in the
//! ledger, a worker ([`worker`]) that runs documents through their pipelines (one at a time, or
//! `worker.max_docs` in flight with their decode steps shared), the schedules deciding which
//! pipelines may run, the HTTP endpoint ([`http`]: metrics and probes), signals ([`signals`])
//! and reloads of the configuration between documents. What happens is reported through [`events`].
//!
//! Data flows one way: inbox → ledger → worker → result or quarantine. The ledger is the only
//! hand-over between the threads (and, with a PostgreSQL ledger, between the daemons of a
//! fleet), so a crash anywhere loses nothing: on restart running jobs are queued again, a dead
//! daemon's jobs go to the others when its lease runs out ([`heartbeat`]), and results are
//! written once, never duplicated.

mod crash_marker;
mod documents;
mod events;
mod health;
mod heartbeat;
mod http;
mod inbox;
mod ingest;
mod metrics;
mod model;
mod signals;
mod storage;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};

pub use signals::Signals;

use crate::config::Config;
use crate::extract::isolated::{Extraction, Isolation};
use crate::failure::Failure;
use crate::ledger::{self, WorkerId};
use crate::llm::TextModel;
use crate::output::DocResult;
use crate::pipeline::{self, Context};
use crate::progress::DocProgress;
use crate::schedule::{Scheduler, SystemClock};
use crate::stage::{Journal, Runner, Stop};
use crash_marker::CrashMarker;
use events::{ConfigReloadRefused, ConfigReloaded, InternalEvent, ModelLoaded};
use health::Health;
use heartbeat::{Heartbeat, Watch};
use metrics::Metrics;
use worker::{Exit, Worker};

/// How the worker loop ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Until SIGTERM/SIGINT.
    Serve,
    /// Until the inboxes' current content is processed (schedules ignored).
    Once,
}

/// Extraction in a child process under the configured limits.
fn isolation(cfg: &Config) -> Result<Extraction> {
    let l = &cfg.daemon.limits;
    Ok(Extraction::Isolated(Isolation {
        exe: std::env::current_exe().context("cannot find the deltadoc executable for the extraction process")?,
        timeout: l.extract_timeout.0,
        memory: l.extract_memory.0,
        max_pages: l.max_pages,
    }))
}

/// Runs the daemon (`serve`) or one pass (`run --once`).
pub fn run(cfg: Config, mode: Mode) -> Result<()> {
    let signals = signals::install();
    let metrics = Arc::new(Metrics::new()?);
    let state_dir = cfg.daemon.state_dir.clone();
    storage::check_folder(
        &state_dir,
        "state folder",
        "deltadoc keeps its ledger and crash marker there and cannot run without writing them",
        "state_dir",
    )?;
    if let Some(dir) = &cfg.daemon.resume_dir {
        storage::check_folder(
            dir,
            "resume folder",
            "prefill checkpoints and the journals of model calls go there",
            "resume_dir",
        )?;
    }
    // One client per bucket for the whole daemon: `object_store` takes effect at start.
    let stores = Arc::new(crate::bucket::Stores::new(&cfg.daemon.object_store));
    check_buckets(&cfg, &stores)?;
    let mut ledger = ledger::open(&cfg.daemon)?;
    let me = worker_id(&cfg);
    let worker_id = ledger.join(&me)?;
    tracing::info!("ledger {}: joined as worker {} ({}, pid {})", ledger.describe(), me.name, me.host, me.pid);
    let (marker, died_at) = CrashMarker::open(&state_dir, cfg.daemon.worker.max_docs)?;
    marker.arm();
    // With several documents in flight, nothing tells which one brought the process down.
    let died_at = match died_at.as_slice() {
        [one] => Some(one.clone()),
        [] => None,
        several => {
            tracing::warn!("{} documents were in flight when deltadoc last died; none is blamed, each runs again", several.len());
            None
        }
    };
    let blamed = died_at.as_ref().and_then(|p| Some((p.job, p.blame()?)));
    let recovery = ledger.recover(blamed.as_ref().map(|(j, k)| (*j, k.as_str())), cfg.daemon.limits.max_attempts)?;
    if recovery.requeued > 0 {
        tracing::warn!(
            "{} document(s) were running when deltadoc last stopped; queued again (an interrupted attempt does not count)",
            recovery.requeued
        );
    }
    prune_journals(cfg.daemon.resume_dir(), &mut *ledger)?;
    let watch = Arc::new(Watch::default());
    let beat = Heartbeat::start(ledger::open(&cfg.daemon)?, (worker_id, me), watch.clone(), metrics.clone())?;
    metrics.init_pipelines(&cfg.pipelines, &mut *ledger)?;
    let waiting: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let notified: Arc<ingest::Notified> = Arc::default();
    let health = Arc::new(Health::new(cfg.daemon.metrics.stall_after.0));
    let current = Arc::new(RwLock::new(Arc::new(cfg)));
    let cfg = current_cfg(&current);
    if cfg.daemon.metrics.enabled {
        let ledger = ledger::open(&cfg.daemon)?;
        let (notified, stores) = (notified.clone(), stores.clone());
        let probe = http::Probe::new(metrics.clone(), health.clone(), ledger, current.clone(), waiting.clone(), notified, stores);
        let addr = http::serve(&cfg.daemon.metrics.listen, Arc::new(probe))?;
        tracing::info!("metrics at http://{addr}/metrics, health at /livez and /readyz");
    }
    let t = Instant::now();
    let mut model = model::load(&cfg.daemon)?;
    let info = model.info().clone();
    ModelLoaded { info: &info, seconds: t.elapsed().as_secs_f64() }.emit(&metrics);
    log_memory_plan(&model, cfg.daemon.memory_budget.0);
    health.model_loaded();

    let ingest = IngestShared {
        model: info.name,
        metrics: metrics.clone(),
        waiting,
        done: Arc::default(),
        mode,
        signals,
        notified,
        stores: stores.clone(),
    };
    let mut thread = Some(ingest.start(cfg.clone())?);
    let places = documents::Places::new(&cfg.daemon, stores.clone());
    let shared = worker::Shared {
        extraction: isolation(&cfg)?,
        cfg,
        metrics: &metrics,
        health: &health,
        clock: &SystemClock,
        signals,
        marker: &marker,
        watch: &watch,
        places,
    };
    let mut worker = Worker { shared, ledger, scheduler: Scheduler::default(), processed: 0 };
    if let (Some((job, in_a_row)), Some(place)) = (recovery.crashed, &died_at) {
        worker.crashed(&job, place, in_a_row)?;
    }
    let r = loop {
        match worker.run(&mut model, mode, &ingest.done) {
            Ok(Exit::Reload) => {
                let Some(new) = reload(&worker.shared.cfg, &metrics, &stores) else { continue };
                // The old ingest thread stops at its next turn; files it saw but had not yet
                // recorded are found again by the new one's start-up scan.
                if thread.take().is_some_and(|t| t.stop_and_join().is_err()) {
                    break Err(anyhow!("the ingest thread panicked"));
                }
                let new = Arc::new(new);
                metrics.init_pipelines(&new.pipelines, &mut *worker.ledger)?;
                worker.shared.extraction = isolation(&new)?;
                worker.shared.cfg = new.clone();
                *current.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
                thread = Some(ingest.start(new.clone())?);
                let names: Vec<&str> = new.pipelines.iter().map(|p| p.name()).collect();
                ConfigReloaded { pipelines: &names }.emit(&metrics);
            }
            Ok(Exit::Done) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    signals.request_shutdown();
    let ing = match thread {
        Some(t) => t.handle.join().map_err(|_| anyhow!("the ingest thread panicked"))?,
        None => Ok(()),
    };
    beat.stop();
    // Only after a clean stop: a worker that stopped under a job leaves it leased, for its next
    // start (same name) or the other daemons (when the lease runs out) to take back.
    if r.is_ok() {
        worker.ledger.leave(worker_id)?;
    }
    r.and(ing)
}

/// Sets up the client of every bucket the pipelines name, so that settings and credentials the
/// client cannot use (an endpoint without a scheme, an unreadable `ca_file`, an AWS profile that
/// is missing or only has single sign-on) stop the start, not the first document.
fn check_buckets(cfg: &Config, stores: &crate::bucket::Stores) -> Result<()> {
    for p in &cfg.pipelines {
        for place in p.inboxes.iter().chain([&p.output, &p.quarantine]) {
            if let crate::config::Location::Bucket(url) = place {
                stores.bucket(&url.bucket).with_context(|| format!("{}: pipeline {:?}: {url}", p.file.display(), p.name()))?;
            }
        }
    }
    Ok(())
}

/// This daemon as a worker of the ledger: `worker.name` or the host name.
fn worker_id(cfg: &Config) -> WorkerId {
    let host = host_name();
    let name = cfg.daemon.worker.name.clone().unwrap_or_else(|| host.clone());
    WorkerId { name, host, pid: std::process::id(), lease_s: cfg.daemon.worker.lease.0.as_secs_f64() }
}

/// The machine's host name (`localhost` if it has none).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if ok && !h.is_empty() => h.to_string(),
        _ => "localhost".into(),
    }
}

/// Removes the journals (`stage/journal.rs`) of jobs that have ended or are gone: a job ended
/// by a daemon that stopped before it removed the journal, or removed from the ledger. In a
/// fleet's shared `resume_dir` the journals of jobs other daemons run stay: they are open.
fn prune_journals(resume_dir: &Path, ledger: &mut dyn ledger::Ledger) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(Journal::root(resume_dir)) else { return Ok(()) };
    for e in entries.flatten() {
        let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) else { continue };
        let open = ledger::state::OPEN;
        if !ledger.job(id)?.is_some_and(|j| open.contains(&j.state.as_str())) {
            Journal::of_job(resume_dir, id).clear();
        }
    }
    Ok(())
}

/// What every ingest thread of a daemon shares.
struct IngestShared {
    /// Identity of the loaded model (part of every job key).
    model: String,
    metrics: Arc<Metrics>,
    waiting: Arc<Mutex<HashMap<String, usize>>>,
    /// Set when the thread ends (`run --once` then finishes the queue and exits).
    done: Arc<AtomicBool>,
    mode: Mode,
    signals: &'static Signals,
    /// Buckets store notifications named (`POST /notify/s3`).
    notified: Arc<ingest::Notified>,
    /// The daemon's bucket clients.
    stores: Arc<crate::bucket::Stores>,
}

/// A running ingest thread.
struct IngestThread {
    handle: std::thread::JoinHandle<Result<()>>,
    stop: Arc<AtomicBool>,
}

impl IngestShared {
    /// Starts an ingest thread over the inboxes of `cfg`.
    fn start(&self, cfg: Arc<Config>) -> Result<IngestThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let (model, metrics, waiting, done) = (self.model.clone(), self.metrics.clone(), self.waiting.clone(), self.done.clone());
        let (mode, signals, stopped, notified) = (self.mode, self.signals, stop.clone(), self.notified.clone());
        let stores = self.stores.clone();
        let handle = std::thread::Builder::new().name("ingest".into()).spawn(move || {
            let ingest = ingest::Ingest {
                cfg: &cfg,
                model: &model,
                metrics: &metrics,
                waiting: &waiting,
                mode,
                signals,
                stop: &stopped,
                notified: &notified,
                stores: &stores,
            };
            let r = ingest.run();
            done.store(true, Ordering::SeqCst);
            r
        })?;
        Ok(IngestThread { handle, stop })
    }
}

impl IngestThread {
    /// Stops the thread at its next turn and waits for it; `Err` when it panicked.
    fn stop_and_join(self) -> std::thread::Result<Result<()>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join()
    }
}

fn current_cfg(c: &RwLock<Arc<Config>>) -> Arc<Config> {
    c.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Says what the memory budget allows the model.
fn log_memory_plan(model: &dyn TextModel, budget: u64) {
    let max = model.info().max_context;
    match model.max_context_within(budget, true) {
        Some(t) if t >= max => tracing::info!(
            "memory plan: a full {max}-token context needs {} MiB of the {} MiB budget",
            model.planned_bytes(t, true) >> 20,
            budget >> 20
        ),
        Some(t) => {
            tracing::warn!("memory_budget {} MiB caps model contexts at {t} tokens (documents are chunked to fit)", budget >> 20)
        }
        None => tracing::warn!(
            "memory_budget {} MiB is below what the model needs for any context; every document will fail",
            budget >> 20
        ),
    }
}

/// Re-reads the configuration file and the pipelines (SIGHUP). Settings that only take effect at
/// start (the loaded model, the open ledger, the bound listener) keep their values, with a
/// warning when the file changed them. `None` (reported) when the new files do not load.
fn reload(old: &Config, metrics: &Metrics, stores: &crate::bucket::Stores) -> Option<Config> {
    let mut new = match Config::load(old.file.as_deref()) {
        Ok(c) => c,
        Err(error) => {
            ConfigReloadRefused { error: &error }.emit(metrics);
            return None;
        }
    };
    let (o, n) = (&old.daemon, &mut new.daemon);
    let fixed = [
        ("model", o.model.path != n.model.path || o.model.prefill_chunk != n.model.prefill_chunk),
        ("threads", o.threads != n.threads),
        ("state_dir", o.state_dir != n.state_dir),
        ("resume_dir", o.resume_dir != n.resume_dir),
        ("ledger", o.ledger != n.ledger || o.ledger_password_file != n.ledger_password_file),
        (
            "worker",
            o.worker.name != n.worker.name
                || o.worker.lease.0 != n.worker.lease.0
                || o.worker.max_batch != n.worker.max_batch
                || o.worker.max_docs != n.worker.max_docs,
        ),
        ("metrics", o.metrics.listen != n.metrics.listen || o.metrics.enabled != n.metrics.enabled),
        ("object_store", o.object_store != n.object_store),
    ];
    for (field, changed) in fixed {
        if changed {
            tracing::warn!("reload: `{field}` changed; it takes effect at the next restart");
        }
    }
    n.model = o.model.clone();
    n.threads = o.threads;
    (n.state_dir, n.resume_dir) = (o.state_dir.clone(), o.resume_dir.clone());
    (n.ledger, n.ledger_password_file, n.worker) = (o.ledger.clone(), o.ledger_password_file.clone(), o.worker.clone());
    n.metrics = o.metrics.clone();
    n.object_store = o.object_store.clone();
    if let Err(error) = check_buckets(&new, stores) {
        ConfigReloadRefused { error: &error }.emit(metrics);
        return None;
    }
    Some(new)
}

/// Whether each inbox of `cfg` can be listed now, for `deltadoc status`: (pipeline, inbox,
/// listed, what was seen or why not).
pub(crate) fn check_inboxes(cfg: &Config) -> Vec<(String, String, bool, String)> {
    let stores = crate::bucket::Stores::new(&cfg.daemon.object_store);
    let mut out = Vec::new();
    for p in &cfg.pipelines {
        for inbox in &p.inboxes {
            let c = health::inbox_check(p.name(), inbox, &stores);
            out.push((p.name().to_string(), inbox.to_string(), c.ok, c.detail));
        }
    }
    out
}

/// `deltadoc process FILE --pipeline NAME`: one file, no ledger; the result JSON or the error.
pub fn process_one(cfg: &Config, pipeline: &str, file: &Path) -> Result<std::result::Result<DocResult, Failure>> {
    let p = cfg.pipeline(pipeline)?;
    let mut model = model::load(&cfg.daemon)?;
    let extraction = isolation(cfg)?;
    let show = DocProgress::new(file.display().to_string());
    let mut on_step = |s: &str| show.step(s);
    let signals = signals::install();
    let runner = Runner {
        model: &mut model,
        deadline: Instant::now() + cfg.daemon.limits.document_timeout.0,
        shutdown: signals.shutdown_flag(),
        abandoned: &AtomicBool::new(false),
        on_step: &mut on_step,
        on_prefill: &|n| show.prefilled(n),
        heartbeat: &|| (),
        on_child: &|_| (),
        journal: None,
    };
    let mut ctx =
        Context { pipeline: p, limits: worker::limits(cfg, worker::Share::whole(cfg)), extraction: &extraction, runner };
    let rel = Path::new(file.file_name().unwrap_or(file.as_os_str()));
    let r = match pipeline::process(&mut ctx, file, rel, None) {
        Ok(r) => Ok(r),
        Err(Stop::Failed(f)) => Err(f),
        Err(Stop::Interrupted) => anyhow::bail!("interrupted"),
    };
    show.finish(if r.is_ok() { "done" } else { "failed" });
    Ok(r)
}
