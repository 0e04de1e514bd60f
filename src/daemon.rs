//! The daemon: an ingest thread (watcher, rescans, stability, hashing, ledger) feeding a worker
//! that runs one document at a time through its pipeline (the model uses every core), the
//! scheduler deciding which pipelines may run, the metrics and health endpoint, and SIGHUP
//! reloads of the pipelines between documents.
//!
//! Data flows one way: inbox → ledger → worker → result or quarantine. The ledger is the only
//! hand-over, so a crash anywhere loses nothing: on restart running jobs are queued again and
//! results are overwritten in place, never duplicated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::config::{Config, Pipeline, QuarantineMode};
use crate::extract::isolated::Isolation;
use crate::failure::{Failure, Reason};
use crate::health::{Health, Readiness};
use crate::ingest::{self, Candidate, Filters, Seen, Stability};
use crate::metrics::Metrics;
use crate::output::{self, DocResult, ErrorReport};
use crate::pipeline::llm::{OrtModel, TextModel};
use crate::pipeline::{self, Context, Stop};
use crate::progress::DocProgress;
use crate::schedule::{Clock, Event, Scheduler, SystemClock};
use crate::store::{Discovery, Job, Ledger, NewJob, SqliteLedger, now_s, state};

/// Set by SIGTERM/SIGINT: finish or put back the running document and exit.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if SHUTDOWN.swap(true, Ordering::SeqCst) {
        // Second signal: the operator wants out now; the ledger still recovers the job.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Set by SIGHUP: re-read the configuration and pipelines after the running document.
pub static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    RELOAD.store(true, Ordering::SeqCst);
}

/// Installs the SIGTERM/SIGINT handlers that request a drain, and the SIGHUP handler that
/// requests a reload.
pub fn install_signal_handlers() {
    // SAFETY: the handlers only touch atomics and call _exit.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGHUP, on_hangup as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
}

/// A synthesised (random-weight) model folder written in an older layout: safe to rebuild, unlike
/// imported weights, which are never touched.
fn stale_demo_model(path: &std::path::Path) -> bool {
    crate::model::Manifest::read(path).is_ok_and(|m| m.source.starts_with("synth:") && m.format != crate::model::FORMAT_VERSION)
}

/// Loads the configured model, synthesising the demo model first when configured to.
pub fn load_model(cfg: &Config) -> Result<OrtModel> {
    let d = &cfg.daemon;
    let path = &d.model.path;
    if d.model.synth_if_missing.is_some() && stale_demo_model(path) {
        tracing::info!("{}: demo model from an older deltadoc; building it again", path.display());
        std::fs::remove_dir_all(path).with_context(|| format!("{}: cannot remove the old demo model", path.display()))?;
    }
    if !path.join("manifest.json").is_file() {
        match &d.model.synth_if_missing {
            Some(shape) => {
                let shape: crate::model::config::Shape = clap::ValueEnum::from_str(shape, true)
                    .map_err(|_| anyhow::anyhow!("model.synth_if_missing: unknown shape {shape:?}"))?;
                tracing::info!(
                    "model folder {} is missing: building random weights of the {} shape there (demo model; results say so)",
                    path.display(),
                    shape.name()
                );
                let mut synth = crate::model::synth::Synth::new(0);
                let text = shape.config();
                crate::model::export(
                    &text,
                    Some(&crate::model::vision::VisionConfig::of_shape(shape, text.hidden_size)),
                    &mut synth,
                    crate::model::ExportOptions {
                        precision: crate::model::quant::Precision::Fp32,
                        quant_block: None,
                        linear_attn: crate::model::graph::LinearAttn::Deltadoc,
                        kv_cache: crate::model::graph::KvCache::F16,
                    },
                    path,
                    format!("synth:{}:seed=0", shape.name()),
                )?;
            }
            None => anyhow::bail!(
                "model.path {}: no model folder there (import real weights with `deltadoc model import`, see README)",
                path.display()
            ),
        }
    }
    let dir = crate::model::ModelDir::open(path)?;
    let mut opts = crate::runtime::SessionOptions::default();
    if d.threads > 0 {
        opts.threads = d.threads;
    }
    let mut m = OrtModel::open(&dir, &opts)?;
    m.checkpoint_dir = Some(d.state_dir.join("checkpoints"));
    Ok(m)
}

/// Extraction isolation settings from the configuration.
pub fn isolation(cfg: &Config) -> Result<Isolation> {
    let l = &cfg.daemon.limits;
    Ok(Isolation {
        exe: std::env::current_exe().context("cannot find the deltadoc executable for the extraction process")?,
        timeout: l.extract_timeout.0,
        memory: l.extract_memory.0,
        max_pages: l.max_pages,
    })
}

/// How the worker loop ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Until SIGTERM/SIGINT.
    Serve,
    /// Until the inboxes' current content is processed (schedules ignored).
    Once,
}

/// Runs the daemon (`serve`) or one pass (`run --once`).
pub fn run(cfg: Config, mode: Mode) -> Result<()> {
    install_signal_handlers();
    let metrics = Arc::new(Metrics::new()?);
    let state_dir = cfg.daemon.state_dir.clone();
    let mut ledger = SqliteLedger::open(&state_dir)?;
    let recovered = ledger.recover()?;
    if recovered > 0 {
        tracing::warn!("{recovered} document(s) were running when deltadoc last stopped; queued again");
    }
    metrics.init_pipelines(&cfg.pipelines, &mut ledger)?;
    let waiting: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let health = Arc::new(Health::new(cfg.daemon.metrics.stall_after.0));
    let current = Arc::new(RwLock::new(Arc::new(cfg)));
    if current_cfg(&current).daemon.metrics.enabled {
        let probe_ledger = Mutex::new(SqliteLedger::open(&state_dir)?);
        let (m, w, h, c) = (metrics.clone(), waiting.clone(), health.clone(), current.clone());
        let check = Arc::new(move || -> Readiness {
            let cfg = current_cfg(&c);
            let mut l = probe_ledger.lock().unwrap_or_else(|p| p.into_inner());
            let names: Vec<String> = cfg.pipelines.iter().map(|p| p.name().to_string()).collect();
            refresh_queue_gauges(&m, &mut *l, &names, &w.lock().map(|w| w.clone()).unwrap_or_default());
            let inboxes: Vec<(String, PathBuf)> =
                cfg.pipelines.iter().flat_map(|p| p.inboxes.iter().map(|i| (p.name().to_string(), i.clone()))).collect();
            let r = h.check(&mut *l, &inboxes);
            m.ready.set(r.ready as i64);
            m.worker_heartbeat_age.set(h.silent_for());
            let mem = crate::metrics::ProcessMemory::read();
            m.resident_memory.set(mem.resident_bytes as i64);
            m.peak_resident_memory.set(mem.peak_bytes as i64);
            r
        });
        let addr = crate::metrics::serve(&current_cfg(&current).daemon.metrics.listen, metrics.clone(), check)?;
        tracing::info!("metrics at http://{addr}/metrics, health at /livez and /readyz");
    }
    let cfg = current_cfg(&current);
    let t = Instant::now();
    let mut model = load_model(&cfg)?;
    let info = model.info().clone();
    metrics.model_load_seconds.set(t.elapsed().as_secs_f64());
    metrics.model_loaded.with_label_values(&[&info.name]).set(1);
    metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &info.name]).set(1);
    let budget = cfg.daemon.memory_budget.0;
    match model.max_context_within(budget, true) {
        Some(t) if t >= info.max_context => tracing::info!(
            "memory plan: a full {}-token context needs {} MiB of the {} MiB budget",
            info.max_context,
            model.plan(t, true).total_bytes >> 20,
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
    if info.random_weights {
        tracing::warn!("model {} has random weights: results are placeholders (see README: real weights)", info.source);
    }
    health.model_loaded();

    let ingest_done = Arc::new(AtomicBool::new(false));
    let spawn_ingest = |cfg: Arc<Config>, stop: Arc<AtomicBool>| {
        let (metrics, waiting, done) = (metrics.clone(), waiting.clone(), ingest_done.clone());
        let model_name = info.name.clone();
        std::thread::Builder::new().name("ingest".into()).spawn(move || {
            let r = ingest_loop(&cfg, &model_name, &metrics, &waiting, mode, &stop);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let mut stop_ingest = Arc::new(AtomicBool::new(false));
    let mut ingest = Some(spawn_ingest(cfg.clone(), stop_ingest.clone())?);
    let mut worker = Worker {
        iso: isolation(&cfg)?,
        cfg,
        ledger,
        metrics: &metrics,
        health: &health,
        scheduler: Scheduler::default(),
        clock: &SystemClock,
    };
    let r = loop {
        match worker.run(&mut model, mode, &ingest_done) {
            Ok(Exit::Reload) => {
                let Some(new) = reload(&worker.cfg) else {
                    metrics.config_reloads.with_label_values(&["failed"]).inc();
                    continue;
                };
                // The old ingest thread stops at its next turn; files it saw but had not yet
                // recorded are found again by the new one's start-up scan.
                stop_ingest.store(true, Ordering::SeqCst);
                if ingest.take().is_some_and(|t| t.join().is_err()) {
                    break Err(anyhow::anyhow!("the ingest thread panicked"));
                }
                let new = Arc::new(new);
                metrics.init_pipelines(&new.pipelines, &mut worker.ledger)?;
                worker.iso = isolation(&new)?;
                worker.cfg = new.clone();
                *current.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
                stop_ingest = Arc::new(AtomicBool::new(false));
                ingest = Some(spawn_ingest(new.clone(), stop_ingest.clone())?);
                metrics.config_reloads.with_label_values(&["ok"]).inc();
                let names: Vec<&str> = new.pipelines.iter().map(|p| p.name()).collect();
                tracing::info!("configuration reloaded: pipelines {}", names.join(", "));
            }
            Ok(Exit::Done) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    SHUTDOWN.store(true, Ordering::SeqCst);
    let ing = match ingest {
        Some(t) => t.join().map_err(|_| anyhow::anyhow!("the ingest thread panicked"))?,
        None => Ok(()),
    };
    r.and(ing)
}

fn current_cfg(c: &RwLock<Arc<Config>>) -> Arc<Config> {
    c.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Re-reads the configuration file and the pipelines (SIGHUP). Settings that only take effect at
/// start (the loaded model, the open ledger, the bound listener) keep their values, with a
/// warning when the file changed them. `None` (logged) when the new files do not load.
fn reload(old: &Config) -> Option<Config> {
    let mut new = match Config::load(old.file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e:#}");
            return None;
        }
    };
    let (o, n) = (&old.daemon, &mut new.daemon);
    let fixed = [
        ("model", o.model.path != n.model.path),
        ("threads", o.threads != n.threads),
        ("state_dir", o.state_dir != n.state_dir),
        ("metrics", o.metrics.listen != n.metrics.listen || o.metrics.enabled != n.metrics.enabled),
    ];
    for (field, changed) in fixed {
        if changed {
            tracing::warn!("reload: `{field}` changed; it takes effect at the next restart");
        }
    }
    n.model = o.model.clone();
    n.threads = o.threads;
    n.state_dir = o.state_dir.clone();
    n.metrics = o.metrics.clone();
    Some(new)
}

/// Sets the queue gauges from the ledger and the in-memory stability tracker.
fn refresh_queue_gauges(m: &Metrics, l: &mut dyn Ledger, pipelines: &[String], waiting: &HashMap<usize, usize>) {
    for (i, p) in pipelines.iter().enumerate() {
        for s in state::ALL {
            m.queue_depth.with_label_values(&[p, s]).set(0);
        }
        m.queue_depth.with_label_values(&[p, "waiting_stable"]).set(*waiting.get(&i).unwrap_or(&0) as i64);
        m.oldest_queued_age.with_label_values(&[p]).set(0.0);
    }
    if let Ok(counts) = l.counts() {
        for (p, s, n) in counts {
            m.queue_depth.with_label_values(&[&p, &s]).set(n as i64);
        }
    }
    for (p, t) in l.oldest_queued().unwrap_or_default() {
        m.oldest_queued_age.with_label_values(&[&p]).set((now_s() - t).max(0.0));
    }
}

/// Watches the inboxes and records stable files in the ledger until shutdown (or, once, until
/// everything present at start is recorded, or until `stop` for a reload).
fn ingest_loop(
    cfg: &Config,
    model: &str,
    metrics: &Metrics,
    waiting: &Mutex<HashMap<usize, usize>>,
    mode: Mode,
    stop: &AtomicBool,
) -> Result<()> {
    let d = &cfg.daemon;
    let mut ledger = SqliteLedger::open(&d.state_dir)?;
    let inboxes = ingest::inboxes(&cfg.pipelines)?;
    let filters = Filters::new(&d.ingest.ignore)?;
    let mut stability = Stability::new(d.ingest.stable_window.0);
    let (tx, rx) = mpsc::channel();
    // Kept alive for the loop's lifetime: dropping it stops the events.
    let watcher = if mode == Mode::Serve && !d.ingest.poll_only {
        let roots: Vec<(PathBuf, bool)> = inboxes.iter().map(|i| (i.root.clone(), i.recursive)).collect();
        match ingest::watch(&roots, tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("{e}; relying on rescans every {:?}", d.ingest.rescan_interval.0);
                None
            }
        }
    } else {
        None
    };
    let watching = watcher.is_some();
    let mut last_scan: Option<Instant> = None;
    let mut refused_seen: std::collections::HashSet<String> = Default::default();
    let mut missing_inbox: std::collections::HashSet<PathBuf> = Default::default();
    loop {
        if SHUTDOWN.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Events first, so a file an event reported is not later counted as a rescan find.
        while let Ok(path) = rx.recv_timeout(Duration::from_millis(if last_scan.is_some() { 200 } else { 0 })) {
            for inbox in &inboxes {
                if let Ok(Some(c)) = filters.admit(inbox, &path)
                    && stability.observe(c, Instant::now())
                {
                    metrics.watch_events.with_label_values(&[Seen::Event.name()]).inc();
                }
            }
        }
        let scan_due = last_scan.is_none_or(|t| t.elapsed() >= d.ingest.rescan_interval.0);
        if scan_due {
            let initial = last_scan.is_none();
            last_scan = Some(Instant::now());
            let mut found = Vec::new();
            let mut refused = Vec::new();
            for inbox in &inboxes {
                match filters.scan(inbox, &mut found, &mut refused) {
                    Ok(()) => {
                        if missing_inbox.remove(&inbox.root) {
                            tracing::info!("inbox {} is reachable again", inbox.root.display());
                        }
                    }
                    Err(e) => {
                        if missing_inbox.insert(inbox.root.clone()) {
                            tracing::warn!("{e:#}");
                        }
                    }
                }
            }
            for why in refused {
                if refused_seen.insert(why.clone()) {
                    tracing::warn!("{why}");
                }
            }
            for c in found {
                if stability.observe(c, Instant::now()) {
                    metrics.watch_events.with_label_values(&[Seen::Scan.name()]).inc();
                    if watching && !initial {
                        metrics.rescan_found.inc();
                    }
                }
            }
        }
        for (c, (size, mtime)) in stability.take_ready(Instant::now()) {
            if let Err(e) = record(cfg, &mut ledger, model, metrics, &c, size, mtime) {
                tracing::warn!("{}: {e:#}", c.path().display());
                stability.forget(&c);
            }
        }
        let w = stability.waiting();
        let pending: usize = w.values().sum();
        if let Ok(mut g) = waiting.lock() {
            *g = w;
        }
        if mode == Mode::Once {
            if pending == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Hashes a stable file and records it in the ledger.
fn record(
    cfg: &Config,
    ledger: &mut dyn Ledger,
    model: &str,
    metrics: &Metrics,
    c: &Candidate,
    size: u64,
    mtime: i64,
) -> Result<()> {
    let p = &cfg.pipelines[c.pipeline];
    let path = c.path();
    let sha = match ledger.cached_hash(p.name(), &path, size, mtime)? {
        Some(s) => s,
        None => {
            let s = pipeline::sha256_file(&path).context("cannot read")?;
            ledger.remember_hash(p.name(), &path, size, mtime, &s)?;
            s
        }
    };
    let key = ingest::job_key(&sha, p.name(), p.spec.version, model);
    let job = NewJob {
        key: &key,
        pipeline: p.name(),
        priority: p.spec.priority,
        inbox: &c.inbox,
        rel_path: &c.rel,
        sha256: &sha,
        size,
        reprocess_duplicates: p.spec.duplicates == crate::config::DuplicatePolicy::Reprocess,
    };
    match ledger.discover(&job)? {
        Discovery::Queued(id) => tracing::info!("{}: queued as job {id} ({})", path.display(), p.name()),
        Discovery::Known => {}
        Discovery::Duplicate { of } => {
            metrics.documents.with_label_values(&[p.name(), "skipped_duplicate"]).inc();
            tracing::info!("{}: same content as job {of}; skipped (duplicates: skip)", path.display());
        }
    }
    Ok(())
}

/// Why [`Worker::run`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    /// Shutdown, or (once) the inboxes are done.
    Done,
    /// SIGHUP: reload, then run again.
    Reload,
}

/// Runs jobs one at a time.
struct Worker<'a> {
    /// Configuration (replaced on reload, between documents).
    cfg: Arc<Config>,
    /// Its own ledger connection.
    ledger: SqliteLedger,
    /// Metrics.
    metrics: &'a Metrics,
    /// Heartbeat for readiness.
    health: &'a Health,
    /// Extraction isolation.
    iso: Isolation,
    /// Schedule state.
    scheduler: Scheduler,
    /// Time source of the scheduler.
    clock: &'a dyn Clock,
}

impl Worker<'_> {
    fn run(&mut self, model: &mut dyn TextModel, mode: Mode, ingest_done: &AtomicBool) -> Result<Exit> {
        let mut processed = 0usize;
        let mut idle_logged = false;
        loop {
            self.health.beat();
            if SHUTDOWN.load(Ordering::Relaxed) {
                tracing::info!("shutting down: {processed} document(s) processed since the last start or reload");
                return Ok(Exit::Done);
            }
            if RELOAD.swap(false, Ordering::SeqCst) {
                if mode == Mode::Serve {
                    tracing::info!("SIGHUP: reloading the configuration and pipelines");
                    return Ok(Exit::Reload);
                }
                tracing::warn!("SIGHUP ignored: `run --once` keeps the configuration it started with");
            }
            if mode == Mode::Serve {
                for ev in self.scheduler.tick(self.clock.now(), &mut self.ledger, &self.cfg.pipelines)? {
                    self.report(ev);
                }
            }
            let open: Vec<&str> =
                self.cfg.pipelines.iter().filter(|p| mode == Mode::Once || self.scheduler.open(p)).map(|p| p.name()).collect();
            let now = now_s();
            match self.ledger.claim(&open, now)? {
                Some(job) => {
                    idle_logged = false;
                    processed += 1;
                    self.run_job(model, job)?;
                }
                None if mode == Mode::Once && ingest_done.load(Ordering::SeqCst) => {
                    // Done unless failed documents wait for a retry.
                    let waiting: u64 = self
                        .ledger
                        .counts()?
                        .into_iter()
                        .filter(|(_, s, _)| s == state::RETRY_WAIT || s == state::QUEUED)
                        .map(|(_, _, n)| n)
                        .sum();
                    if waiting == 0 {
                        tracing::info!("done: {processed} document(s) processed");
                        return Ok(Exit::Done);
                    }
                    if !idle_logged {
                        tracing::info!("{waiting} document(s) wait for a retry (limits.retry_backoff)");
                        idle_logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                None => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    fn report(&self, ev: Event) {
        match ev {
            Event::Started { pipeline, planned, catch_up } => {
                let m = &self.metrics;
                m.last_run_start.with_label_values(&[&pipeline]).set(now_s());
                if catch_up {
                    tracing::warn!("{pipeline}: the run planned for {planned} was missed; running it now");
                } else {
                    tracing::info!("{pipeline}: scheduled run started (planned {planned})");
                }
            }
            Event::Overrun { pipeline } => {
                self.metrics.schedule_overruns.with_label_values(&[&pipeline]).inc();
                tracing::warn!("{pipeline}: the scheduled run is past its window and still has documents");
            }
            Event::Ended { pipeline, documents, ok, overran, started } => {
                let m = &self.metrics;
                m.last_run_end.with_label_values(&[&pipeline]).set(now_s());
                m.schedule_run_duration.with_label_values(&[&pipeline]).observe((now_s() - started).max(0.0));
                m.schedule_run_documents.with_label_values(&[&pipeline]).observe(documents as f64);
                m.last_run_success.with_label_values(&[&pipeline]).set(ok as i64);
                m.last_run_documents.with_label_values(&[&pipeline]).set(documents as i64);
                if ok {
                    m.last_success.with_label_values(&[&pipeline]).set(now_s());
                }
                tracing::info!(
                    "{pipeline}: scheduled run ended after {:.0} s: {documents} document(s), {}{}",
                    now_s() - started,
                    if ok { "none quarantined" } else { "some quarantined" },
                    if overran { ", past its window" } else { "" }
                );
            }
        }
    }

    fn run_job(&mut self, model: &mut dyn TextModel, job: Job) -> Result<()> {
        let cfg = self.cfg.clone();
        let Ok(p) = cfg.pipeline(&job.pipeline) else {
            tracing::warn!("job {}: pipeline {:?} is no longer configured; left queued", job.id, job.pipeline);
            self.ledger.release(job.id)?;
            return Ok(());
        };
        let m = self.metrics;
        m.queue_wait.with_label_values(&[p.name()]).observe((now_s() - job.queued_at).max(0.0));
        m.inflight.inc();
        let show = DocProgress::new(format!("job {} {}", job.id, job.rel_path.display()));
        let started = Instant::now();
        let result = {
            let ledger = &mut self.ledger;
            let mut on_step = |s: &str| {
                show.step(s);
                let _ = ledger.set_stage(job.id, s);
            };
            let on_prefill = |n: usize| show.prefilled(n);
            let health = self.health;
            let heartbeat = || health.beat();
            let mut ctx = context(&cfg, p, model, &self.iso, &mut on_step, &on_prefill, &heartbeat);
            pipeline::process(&mut ctx, &job.source, &job.rel_path, Some(&job.sha256))
        };
        m.inflight.dec();
        m.document_duration.with_label_values(&[p.name()]).observe(started.elapsed().as_secs_f64());
        let result = result.and_then(|r| {
            let out = output::result_path(&p.output, &job.rel_path);
            output::write_result(&out, &r).map_err(|e| Stop::Failed(Failure::new(Reason::Io, "write", format!("{e:#}"))))?;
            Ok((r, out))
        });
        match result {
            Ok((r, out)) => {
                self.ledger.done(job.id, &out, now_s())?;
                record_result_metrics(m, p.name(), &r);
                self.scheduler.record(p.name(), true);
                show.finish(&format!("done → {}", out.display()));
            }
            Err(Stop::Interrupted) => {
                self.ledger.release(job.id)?;
                show.finish("interrupted; queued again");
            }
            Err(Stop::Failed(f)) => self.fail(p, &job, f, &show)?,
        }
        Ok(())
    }

    fn fail(&mut self, p: &Pipeline, job: &Job, f: Failure, show: &DocProgress) -> Result<()> {
        let m = self.metrics;
        let cfg = self.cfg.clone();
        let limits = &cfg.daemon.limits;
        m.failures.with_label_values(&[p.name(), f.reason.name(), &f.stage]).inc();
        if !f.reason.is_permanent() && job.attempts < limits.max_attempts {
            let wait = limits.retry_backoff.0.as_secs_f64() * 2f64.powi(job.attempts as i32 - 1);
            self.ledger.failed(job.id, &f, Some(now_s() + wait), None, now_s())?;
            m.retries.with_label_values(&[p.name()]).inc();
            m.documents.with_label_values(&[p.name(), "failed"]).inc();
            show.finish(&format!(
                "failed ({}: {}); retry {} of {} in {wait:.0} s",
                f.reason.name(),
                f.message,
                job.attempts + 1,
                limits.max_attempts
            ));
            return Ok(());
        }
        let report = ErrorReport {
            failure: &f,
            attempts: job.attempts,
            pipeline: p.name(),
            source: &job.source,
            sha256: &job.sha256,
            quarantined_at: output::now_rfc3339(),
            deltadoc_version: env!("CARGO_PKG_VERSION"),
        };
        let moved = output::quarantine(
            &job.source,
            &p.quarantine,
            &job.rel_path,
            p.spec.quarantine_mode == QuarantineMode::Move,
            &report,
        );
        let now_at = match &moved {
            Ok(dest) => Some(dest.as_path()),
            Err(e) => {
                tracing::error!("{}: cannot quarantine: {e:#}", job.source.display());
                None
            }
        };
        let source = if p.spec.quarantine_mode == QuarantineMode::Move { now_at } else { None };
        self.ledger.failed(job.id, &f, None, source, now_s())?;
        m.documents.with_label_values(&[p.name(), "quarantined"]).inc();
        self.scheduler.record(p.name(), false);
        show.finish(&format!("quarantined ({}: {})", f.reason.name(), f.message));
        Ok(())
    }
}

fn record_result_metrics(m: &Metrics, pipeline: &str, r: &DocResult) {
    m.documents.with_label_values(&[pipeline, "ok"]).inc();
    for (stage, secs) in &r.timings {
        if stage != "total" {
            m.stage_duration.with_label_values(&[pipeline, stage]).observe(*secs);
        }
    }
    for page in &r.pages {
        let kind = if page.method == crate::extract::Method::Ocr { "ocr" } else { "text" };
        m.pages.with_label_values(&[kind]).inc();
    }
    m.prompt_tokens.with_label_values(&[pipeline]).inc_by(r.tokens.prompt as u64);
    m.prefilled_tokens.with_label_values(&[pipeline]).inc_by(r.tokens.prefilled as u64);
    m.generation_tokens.with_label_values(&[pipeline]).inc_by(r.tokens.generated as u64);
    m.document_pages.with_label_values(&[pipeline]).observe(r.pages.len() as f64);
    m.document_prompt_tokens.with_label_values(&[pipeline]).observe(r.document_tokens as f64);
    let stages = r.stages.values();
    m.prefill_seconds.with_label_values(&[pipeline]).inc_by(stages.clone().map(|s| s.prefill_s).sum());
    m.decode_seconds.with_label_values(&[pipeline]).inc_by(stages.clone().map(|s| s.decode_s).sum());
    if let Some(b) = stages.map(|s| s.state_bytes).max().filter(|&b| b > 0) {
        m.kv_state_bytes.set(b as i64);
    }
    if r.truncated {
        m.context_truncations.inc();
    }
    for s in r.stages.values() {
        if let Some(t) = s.ttft_s {
            m.ttft.with_label_values(&[pipeline]).observe(t);
        }
    }
}

/// The context of one document attempt under the configured limits, its deadline counted from
/// now.
fn context<'a>(
    cfg: &Config,
    pipeline: &'a Pipeline,
    model: &'a mut dyn TextModel,
    iso: &'a Isolation,
    on_step: &'a mut dyn FnMut(&str),
    on_prefill: &'a dyn Fn(usize),
    heartbeat: &'a dyn Fn(),
) -> Context<'a> {
    let l = &cfg.daemon.limits;
    Context {
        pipeline,
        model,
        isolation: Some(iso),
        max_file_bytes: l.max_file_bytes.0,
        max_pages: l.max_pages,
        memory_budget: cfg.daemon.memory_budget.0,
        deadline: Instant::now() + l.document_timeout.0,
        shutdown: &SHUTDOWN,
        on_step,
        on_prefill,
        heartbeat,
    }
}

/// `deltadoc process FILE --pipeline NAME`: one file, no ledger; the result JSON or the error.
pub fn process_one(cfg: &Config, pipeline: &str, file: &Path) -> Result<std::result::Result<DocResult, Failure>> {
    let p = cfg.pipeline(pipeline)?;
    let mut model = load_model(cfg)?;
    let iso = isolation(cfg)?;
    let show = DocProgress::new(file.display().to_string());
    let mut on_step = |s: &str| show.step(s);
    let on_prefill = |n: usize| show.prefilled(n);
    install_signal_handlers();
    let mut ctx = context(cfg, p, &mut model, &iso, &mut on_step, &on_prefill, &|| ());
    let rel = PathBuf::from(file.file_name().unwrap_or(file.as_os_str()));
    let r = match pipeline::process(&mut ctx, file, &rel, None) {
        Ok(r) => Ok(r),
        Err(Stop::Failed(f)) => Err(f),
        Err(Stop::Interrupted) => anyhow::bail!("interrupted"),
    };
    show.finish(if r.is_ok() { "done" } else { "failed" });
    Ok(r)
}
