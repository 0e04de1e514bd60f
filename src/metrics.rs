//! Prometheus metrics (`deltadoc_` prefix, units in names, bounded labels only: pipeline, stage,
//! outcome, reason, state; never paths) and the HTTP endpoint that serves them with the health
//! probes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::health::Readiness;
use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets for durations from 10 ms to 4 h: a 262K-token prefill alone takes minutes to hours on
/// a CPU, and latency histograms that stop at a minute misreport every long document.
pub const DURATION_BUCKETS: [f64; 20] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 10800.0,
    14400.0,
];

/// Buckets for document sizes in prompt tokens: powers of two up to the 262,144-token context.
const TOKEN_BUCKETS: [f64; 10] = [256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0, 131072.0, 262144.0];

/// Buckets for counts (pages per document, documents per scheduled run).
const COUNT_BUCKETS: [f64; 11] = [0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 500.0, 1000.0, 5000.0];

/// Resident memory of this process, from /proc (0 where unavailable).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessMemory {
    /// Resident now (VmRSS).
    pub resident_bytes: u64,
    /// Peak resident since start (VmHWM).
    pub peak_bytes: u64,
}

impl ProcessMemory {
    /// Reads /proc/self/status.
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        Self { resident_bytes: kib("VmRSS:"), peak_bytes: kib("VmHWM:") }
    }
}

/// Every series the daemon exports.
pub struct Metrics {
    /// The registry rendered at `/metrics`.
    pub registry: Registry,
    /// Documents by pipeline and outcome (`ok`, `failed`, `quarantined`, `skipped_duplicate`).
    pub documents: IntCounterVec,
    /// Failed attempts by pipeline, reason and stage.
    pub failures: IntCounterVec,
    /// Pages by how their text was obtained (`text`, `ocr`).
    pub pages: IntCounterVec,
    /// Prompt tokens by pipeline.
    pub prompt_tokens: IntCounterVec,
    /// Prompt tokens actually prefilled (prefix reuse saves the rest).
    pub prefilled_tokens: IntCounterVec,
    /// Generated tokens by pipeline.
    pub generation_tokens: IntCounterVec,
    /// Retries scheduled.
    pub retries: IntCounterVec,
    /// Model calls whose input had to be cut (normally 0).
    pub context_truncations: IntCounter,
    /// Files noticed, by source (`inotify`, `rescan`).
    pub watch_events: IntCounterVec,
    /// Files a periodic rescan found that no event reported (watcher health).
    pub rescan_found: IntCounter,
    /// Seconds per step.
    pub stage_duration: HistogramVec,
    /// Seconds per document, all steps.
    pub document_duration: HistogramVec,
    /// Seconds from queued to started.
    pub queue_wait: HistogramVec,
    /// Seconds to the first generated token per model call.
    pub ttft: HistogramVec,
    /// Jobs per pipeline and state (`waiting_stable`, `queued`, `running`, `retry_wait`, …).
    pub queue_depth: IntGaugeVec,
    /// Age of the oldest queued job per pipeline.
    pub oldest_queued_age: GaugeVec,
    /// 1 for pipelines that run on a schedule (their backlog waits for the window by design).
    pub pipeline_scheduled: IntGaugeVec,
    /// Documents being processed.
    pub inflight: IntGauge,
    /// 1 when the model is loaded.
    pub model_loaded: IntGaugeVec,
    /// Seconds the model took to load.
    pub model_load_seconds: Gauge,
    /// KV cache + DeltaNet state bytes of the last model call.
    pub kv_state_bytes: IntGauge,
    /// Last schedule run start (Unix seconds).
    pub last_run_start: GaugeVec,
    /// Last schedule run end (Unix seconds).
    pub last_run_end: GaugeVec,
    /// 1 when the last schedule run quarantined nothing.
    pub last_run_success: IntGaugeVec,
    /// Documents of the last schedule run.
    pub last_run_documents: IntGaugeVec,
    /// End of the last schedule run that quarantined nothing (or when the schedule was first
    /// seen, so a schedule that never succeeded still ages).
    pub last_success: GaugeVec,
    /// Schedule runs that outlasted their window.
    pub schedule_overruns: IntCounterVec,
    /// Seconds of a scheduled run, start to end.
    pub schedule_run_duration: HistogramVec,
    /// Documents per scheduled run.
    pub schedule_run_documents: HistogramVec,
    /// Pages per document.
    pub document_pages: HistogramVec,
    /// Prompt tokens per document.
    pub document_prompt_tokens: HistogramVec,
    /// Seconds spent prefilling.
    pub prefill_seconds: CounterVec,
    /// Seconds spent generating.
    pub decode_seconds: CounterVec,
    /// Resident memory now.
    pub resident_memory: IntGauge,
    /// Peak resident memory.
    pub peak_resident_memory: IntGauge,
    /// 1 when `/readyz` would answer 200.
    pub ready: IntGauge,
    /// Seconds since the worker last showed progress.
    pub worker_heartbeat_age: Gauge,
    /// SIGHUP reloads by outcome (`ok`, `failed`).
    pub config_reloads: IntCounterVec,
    /// Constant 1 with version and model labels.
    pub build_info: IntGaugeVec,
}

/// Registers a freshly made collector and hands it back.
fn registered<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: prometheus::Result<C>) -> Result<C> {
    let c = c?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    registered(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    registered(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn fgauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec> {
    registered(r, GaugeVec::new(Opts::new(name, help), labels))
}

fn fcounter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<CounterVec> {
    registered(r, CounterVec::new(Opts::new(name, help), labels))
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<HistogramVec> {
    histogram_with(r, name, help, labels, &DURATION_BUCKETS)
}

fn histogram_with(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> Result<HistogramVec> {
    registered(r, HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels))
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Result<Self> {
        let r = Registry::new();
        let single_counter = |name: &str, help: &str| registered(&r, IntCounter::new(name, help));
        let single_gauge = |name: &str, help: &str| registered(&r, Gauge::new(name, help));
        let int_gauge = |name: &str, help: &str| registered(&r, IntGauge::new(name, help));
        Ok(Self {
            documents: counter(&r, "deltadoc_documents_total", "Documents by pipeline and outcome.", &["pipeline", "outcome"])?,
            failures: counter(
                &r,
                "deltadoc_failures_total",
                "Failed document attempts by pipeline, reason and stage.",
                &["pipeline", "reason", "stage"],
            )?,
            pages: counter(&r, "deltadoc_pages_total", "Pages processed, by how their text was obtained.", &["kind"])?,
            prompt_tokens: counter(&r, "deltadoc_prompt_tokens_total", "Prompt tokens of model calls.", &["pipeline"])?,
            prefilled_tokens: counter(
                &r,
                "deltadoc_prefilled_tokens_total",
                "Prompt tokens actually prefilled (the rest came from a reused document prefix).",
                &["pipeline"],
            )?,
            generation_tokens: counter(&r, "deltadoc_generation_tokens_total", "Generated tokens.", &["pipeline"])?,
            retries: counter(&r, "deltadoc_retries_total", "Failed attempts scheduled for another try.", &["pipeline"])?,
            context_truncations: single_counter(
                "deltadoc_context_truncations_total",
                "Model inputs that had to be cut to fit the context (normally 0).",
            )?,
            watch_events: counter(&r, "deltadoc_watch_events_total", "Files noticed, by source.", &["source"])?,
            rescan_found: single_counter(
                "deltadoc_rescan_found_total",
                "Files found by a periodic rescan that no filesystem event reported (the watcher misses events).",
            )?,
            stage_duration: histogram(
                &r,
                "deltadoc_stage_duration_seconds",
                "Seconds per document step.",
                &["pipeline", "stage"],
            )?,
            document_duration: histogram(
                &r,
                "deltadoc_document_duration_seconds",
                "Seconds per document attempt, all steps.",
                &["pipeline"],
            )?,
            queue_wait: histogram(&r, "deltadoc_queue_wait_seconds", "Seconds from queued to started.", &["pipeline"])?,
            ttft: histogram(
                &r,
                "deltadoc_time_to_first_token_seconds",
                "Seconds from a model call to its first generated token.",
                &["pipeline"],
            )?,
            queue_depth: gauge_vec(&r, "deltadoc_queue_depth", "Documents per pipeline and state.", &["pipeline", "state"])?,
            oldest_queued_age: fgauge_vec(
                &r,
                "deltadoc_oldest_queued_age_seconds",
                "Age of the oldest document waiting to run (0 when none waits).",
                &["pipeline"],
            )?,
            pipeline_scheduled: gauge_vec(
                &r,
                "deltadoc_pipeline_scheduled",
                "1 when the pipeline runs in a schedule window (documents wait for it), 0 when it runs on arrival.",
                &["pipeline"],
            )?,
            inflight: int_gauge("deltadoc_inflight_documents", "Documents being processed now.")?,
            model_loaded: gauge_vec(&r, "deltadoc_model_loaded", "1 when the model is loaded.", &["model"])?,
            model_load_seconds: single_gauge("deltadoc_model_load_seconds", "Seconds the model took to load.")?,
            kv_state_bytes: int_gauge("deltadoc_kv_state_bytes", "KV cache plus DeltaNet state bytes of the last model call.")?,
            last_run_start: fgauge_vec(
                &r,
                "deltadoc_last_run_start_timestamp_seconds",
                "Start of the last schedule run.",
                &["pipeline"],
            )?,
            last_run_end: fgauge_vec(
                &r,
                "deltadoc_last_run_end_timestamp_seconds",
                "End of the last schedule run.",
                &["pipeline"],
            )?,
            last_run_success: gauge_vec(
                &r,
                "deltadoc_last_run_success",
                "1 when the last schedule run quarantined no document.",
                &["pipeline"],
            )?,
            last_run_documents: gauge_vec(
                &r,
                "deltadoc_last_run_documents",
                "Documents of the last schedule run.",
                &["pipeline"],
            )?,
            last_success: fgauge_vec(
                &r,
                "deltadoc_last_success_timestamp_seconds",
                "End of the last scheduled run that quarantined nothing; until the first one, when the schedule was first seen.",
                &["pipeline"],
            )?,
            schedule_overruns: counter(
                &r,
                "deltadoc_schedule_overruns_total",
                "Schedule runs that outlasted their window.",
                &["pipeline"],
            )?,
            schedule_run_duration: histogram(
                &r,
                "deltadoc_schedule_run_duration_seconds",
                "Seconds from the start of a scheduled run to its end.",
                &["pipeline"],
            )?,
            schedule_run_documents: histogram_with(
                &r,
                "deltadoc_schedule_run_documents",
                "Documents per scheduled run.",
                &["pipeline"],
                &COUNT_BUCKETS,
            )?,
            document_pages: histogram_with(&r, "deltadoc_document_pages", "Pages per document.", &["pipeline"], &COUNT_BUCKETS)?,
            document_prompt_tokens: histogram_with(
                &r,
                "deltadoc_document_prompt_tokens",
                "Tokens of a document's text as the model sees it.",
                &["pipeline"],
                &TOKEN_BUCKETS,
            )?,
            prefill_seconds: fcounter(
                &r,
                "deltadoc_prefill_seconds_total",
                "Seconds spent prefilling prompts (rate of deltadoc_prefilled_tokens_total over this is prefill tokens/s).",
                &["pipeline"],
            )?,
            decode_seconds: fcounter(
                &r,
                "deltadoc_decode_seconds_total",
                "Seconds spent generating (rate of deltadoc_generation_tokens_total over this is decode tokens/s).",
                &["pipeline"],
            )?,
            resident_memory: int_gauge("deltadoc_process_resident_memory_bytes", "Resident memory of the daemon now.")?,
            peak_resident_memory: int_gauge(
                "deltadoc_process_peak_resident_memory_bytes",
                "Peak resident memory of the daemon since it started.",
            )?,
            ready: int_gauge(
                "deltadoc_ready",
                "1 when /readyz answers 200 (model loaded, ledger writable, inboxes reachable, worker not stalled).",
            )?,
            worker_heartbeat_age: single_gauge(
                "deltadoc_worker_heartbeat_age_seconds",
                "Seconds since the worker last showed progress (a queue poll, a step, a prefill chunk).",
            )?,
            config_reloads: counter(
                &r,
                "deltadoc_config_reloads_total",
                "Configuration reloads on SIGHUP, by outcome.",
                &["outcome"],
            )?,
            build_info: gauge_vec(
                &r,
                "deltadoc_build_info",
                "Constant 1, labelled with the version and model.",
                &["version", "model"],
            )?,
            registry: r,
        })
    }

    /// Creates the series of every pipeline at zero, so that a `rate()` or an alert sees 0
    /// rather than nothing before the first event, and restores the schedule timestamps from the
    /// ledger so a restart does not reset them.
    pub fn init_pipelines(&self, pipelines: &[crate::config::Pipeline], ledger: &mut dyn crate::store::Ledger) -> Result<()> {
        for p in pipelines {
            let n = p.name();
            self.pipeline_scheduled.with_label_values(&[n]).set(p.spec.schedule.is_some() as i64);
            for outcome in ["ok", "failed", "quarantined", "skipped_duplicate"] {
                self.documents.with_label_values(&[n, outcome]);
            }
            for c in [&self.prompt_tokens, &self.prefilled_tokens, &self.generation_tokens, &self.retries] {
                c.with_label_values(&[n]);
            }
            for c in [&self.prefill_seconds, &self.decode_seconds] {
                c.with_label_values(&[n]);
            }
            if p.spec.schedule.is_some() {
                self.schedule_overruns.with_label_values(&[n]);
                let since = match ledger.last_success(n)? {
                    Some(t) => t,
                    None => ledger.first_seen(n, crate::store::now_s())?,
                };
                self.last_success.with_label_values(&[n]).set(since);
                if let Some(run) = ledger.last_run(n)? {
                    self.last_run_start.with_label_values(&[n]).set(run.started_at);
                    if let (Some(end), Some(ok)) = (run.ended_at, run.ok) {
                        self.last_run_end.with_label_values(&[n]).set(end);
                        self.last_run_success.with_label_values(&[n]).set(ok as i64);
                        self.last_run_documents.with_label_values(&[n]).set(run.documents as i64);
                    }
                }
            }
        }
        for kind in ["text", "ocr"] {
            self.pages.with_label_values(&[kind]);
        }
        for source in ["inotify", "rescan"] {
            self.watch_events.with_label_values(&[source]);
        }
        for outcome in ["ok", "failed"] {
            self.config_reloads.with_label_values(&[outcome]);
        }
        Ok(())
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `GET /metrics`, `GET /livez` and `GET /readyz` on `addr` from a thread of its own.
/// `check` runs before every scrape and readiness probe: it reads the queue gauges from the
/// ledger and decides readiness. Returns the bound address.
pub fn serve(addr: &str, metrics: Arc<Metrics>, check: Arc<dyn Fn() -> Readiness + Send + Sync>) -> Result<SocketAddr> {
    use axum::http::{StatusCode, header::CONTENT_TYPE};
    use axum::routing::get;

    let addr: SocketAddr =
        addr.parse().with_context(|| format!("metrics.listen {addr:?} is not an address like 127.0.0.1:9464"))?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("metrics: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let scrape_check = check.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move {
                scrape_check();
                ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render())
            }),
        )
        // Alive as long as this thread answers: restarting a daemon that is busy with a
        // six-hour prefill would only lose the prefill.
        .route("/livez", get(|| async { ([(CONTENT_TYPE, "application/json")], "{\"status\":\"alive\"}\n") }))
        .route(
            "/readyz",
            get(move || async move {
                let r = check();
                let code = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (code, [(CONTENT_TYPE, "application/json")], serde_json::to_string_pretty(&r).unwrap_or_default() + "\n")
            }),
        );
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
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
