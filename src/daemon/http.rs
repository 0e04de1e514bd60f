//! The HTTP endpoint: `GET /metrics`, `/livez` and `/readyz`, and `POST /notify/s3` (store
//! notifications, `daemon/ingest.rs`), on a thread of its own.
//!
//! `/livez` answers from memory, whatever the disks do: a daemon busy with a six-hour prefill
//! is alive, and restarting it would only lose the prefill. `/readyz` and `/metrics` need the
//! ledger and the inboxes, which live on disks and network mounts that can hang; those checks
//! run on blocking threads with a deadline ([`PROBE_TIMEOUT`]), a check that does not answer in
//! time fails with that reason, and a check still hanging from an earlier probe is not started
//! again, so a hung mount costs one thread, not one per probe.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::events::{FleetSampled, InternalEvent, ProcessSampled, QueueSampled, SchedulesSampled};
use super::health::{self, Check, Health, Readiness};
use super::ingest::Notified;
use super::metrics::Metrics;
use crate::bucket::Stores;
use crate::config::{Config, Location};
use crate::ledger::{Ledger, WorkerState};
use crate::util::ProcessMemory;

/// How long `/readyz` and `/metrics` wait for a check that touches a disk.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoint reads.
pub(crate) struct Probe {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// A ledger connection of the endpoint's own.
    pub ledger: Arc<Mutex<Box<dyn Ledger>>>,
    /// The configuration in force (replaced on reload).
    pub config: Arc<RwLock<Arc<Config>>>,
    /// Files waiting for a stable size, per pipeline (from the ingest thread).
    pub waiting: Arc<Mutex<HashMap<String, usize>>>,
    /// Checks still running, by name, and since when.
    running: Mutex<HashMap<String, Instant>>,
    /// The bucket inboxes' stores (`object_store` takes effect at start).
    stores: Arc<Stores>,
    /// Where store notifications go, for the ingest thread.
    notified: Arc<Notified>,
}

/// What the ledger said, for readiness and the queue gauges.
struct LedgerView {
    check: Check,
    counts: Vec<(String, String, u64)>,
    oldest: Vec<(String, f64)>,
    workers: Vec<WorkerState>,
}

impl Probe {
    /// A probe over these parts.
    pub fn new(
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        ledger: Box<dyn Ledger>,
        config: Arc<RwLock<Arc<Config>>>,
        waiting: Arc<Mutex<HashMap<String, usize>>>,
        notified: Arc<Notified>,
        stores: Arc<Stores>,
    ) -> Self {
        let ledger = Arc::new(Mutex::new(ledger));
        Self { metrics, health, ledger, config, waiting, running: Mutex::default(), stores, notified }
    }

    /// Runs `check` on a blocking thread unless one named `name` still runs; waits at most
    /// [`PROBE_TIMEOUT`]. `Err` says why there is no answer.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        name: String,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(since) = running.get(&name) {
                return Err(format!("no answer for {:.0} s (a hung mount or a locked file?)", since.elapsed().as_secs_f64()));
            }
            running.insert(name.clone(), Instant::now());
        }
        let this = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let r = check();
            this.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            r
        });
        match tokio::time::timeout(PROBE_TIMEOUT, task).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(format!("the check failed: {e}")),
            Err(_) => Err(format!("no answer within {} s (a hung mount or a locked file?)", PROBE_TIMEOUT.as_secs())),
        }
    }

    async fn ledger_view(self: &Arc<Self>) -> Option<LedgerView> {
        let ledger = self.ledger.clone();
        let r = self
            .blocking("ledger".into(), move || {
                let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
                let check = health::ledger_check(&mut **l);
                let (counts, oldest, workers) =
                    (l.counts().unwrap_or_default(), l.oldest_queued().unwrap_or_default(), l.workers().unwrap_or_default());
                LedgerView { check, counts, oldest, workers }
            })
            .await;
        match r {
            Ok(v) => Some(v),
            Err(why) => {
                tracing::warn!("readiness: ledger: {why}");
                None
            }
        }
    }

    /// Every readiness check; the ledger's view when it answered.
    async fn readiness(self: &Arc<Self>) -> (Readiness, Option<LedgerView>) {
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut checks = vec![self.health.model_check(), self.health.storage_check()];
        let view = self.ledger_view().await;
        match &view {
            Some(v) => checks.extend([v.check.clone(), self.health.worker_check(health::queued_or_running(&v.counts))]),
            None => checks.push(Check { check: "ledger", ok: false, detail: "no answer in time".into() }),
        }
        let inboxes: HashSet<(String, Location)> =
            cfg.pipelines.iter().flat_map(|p| p.inboxes.iter().map(|i| (p.name().to_string(), i.clone()))).collect();
        let mut inboxes: Vec<_> = inboxes.into_iter().collect();
        inboxes.sort();
        for (pipeline, inbox) in inboxes {
            let (p, i, stores) = (pipeline.clone(), inbox.clone(), self.stores.clone());
            let check = self.blocking(format!("inbox {inbox}"), move || health::inbox_check(&p, &i, &stores)).await;
            checks.push(check.unwrap_or_else(|why| Check {
                check: "inbox",
                ok: false,
                detail: format!("{pipeline}: {inbox}: {why}"),
            }));
        }
        let r = Readiness::of(checks);
        ProcessSampled { ready: r.ready, heartbeat_age_s: self.health.silent_for(), memory: ProcessMemory::read() }
            .emit(&self.metrics);
        (r, view)
    }

    /// The exposition, after reading the queue and the schedules from the ledger.
    async fn scrape(self: &Arc<Self>) -> String {
        let (_, view) = self.readiness().await;
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(v) = view {
            let names: Vec<String> = cfg.pipelines.iter().map(|p| p.name().to_string()).collect();
            let waiting = self.waiting.lock().map(|w| w.clone()).unwrap_or_default();
            FleetSampled { workers: Some(&v.workers), ledger_ok: v.check.ok }.emit(&self.metrics);
            QueueSampled { pipelines: &names, counts: v.counts, oldest: v.oldest, waiting: &waiting }.emit(&self.metrics);
        } else {
            FleetSampled { workers: None, ledger_ok: false }.emit(&self.metrics);
        }
        // Another daemon of the fleet may have started or ended the last run.
        let ledger = self.ledger.clone();
        let schedules = self
            .blocking("schedules".into(), move || {
                SchedulesSampled::read(&cfg.pipelines, &mut **ledger.lock().unwrap_or_else(|p| p.into_inner()))
            })
            .await;
        match schedules {
            Ok(Ok(s)) => s.emit(&self.metrics),
            // The gauges keep their last values; the readiness check names the ledger's trouble.
            Ok(Err(e)) => tracing::debug!("metrics: schedules not read from the ledger: {e:#}"),
            Err(why) => tracing::debug!("metrics: schedules not read from the ledger: {why}"),
        }
        self.metrics.render()
    }
}

/// Serves the endpoint on `addr` from a thread of its own; returns the bound address.
pub(crate) fn serve(addr: &str, probe: Arc<Probe>) -> Result<SocketAddr> {
    use axum::http::{StatusCode, header::CONTENT_TYPE};
    use axum::routing::{get, post};

    let addr: SocketAddr =
        addr.parse().with_context(|| format!("metrics.listen {addr:?} is not an address like 127.0.0.1:9464"))?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("metrics: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let scrape = probe.clone();
    let notified = probe.notified.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], scrape.scrape().await) }),
        )
        .route("/livez", get(|| async { ([(CONTENT_TYPE, "application/json")], "{\"status\":\"alive\"}\n") }))
        // A store's event notification (MinIO or S3 event records, a SeaweedFS filer webhook):
        // the bucket it names is listed now instead of at the next rescan.
        .route(
            "/notify/s3",
            post(move |body: axum::body::Bytes| async move {
                let buckets = crate::bucket::notified_buckets(&body);
                tracing::debug!("store notification for {buckets:?}");
                notified.add(buckets);
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                let (r, _) = probe.readiness().await;
                let code = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (code, [(CONTENT_TYPE, "application/json")], serde_json::to_string_pretty(&r).unwrap_or_default() + "\n")
            }),
        );
    std::thread::Builder::new().name("http".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("metrics endpoint cannot start: {e}");
                return;
            }
        };
        rt.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    if let Err(e) = axum::serve(l, app).await {
                        tracing::error!("metrics endpoint stopped: {e}");
                    }
                }
                Err(e) => tracing::error!("metrics endpoint cannot start: {e}"),
            }
        });
    })?;
    Ok(bound)
}
