//! Prometheus metrics (`deltadoc_` prefix, units in names, bounded labels only: pipeline, stage,
//! outcome, reason, state; never paths) and the HTTP endpoint that serves them.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Buckets for durations from 10 ms to 4 h: a 262K-token prefill alone takes minutes to hours on
/// a CPU, and latency histograms that stop at a minute misreport every long document.
pub const DURATION_BUCKETS: [f64; 20] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 10800.0,
    14400.0,
];

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
    /// Age of the oldest queued job.
    pub oldest_queued_age: Gauge,
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
    /// Schedule runs that outlasted their window.
    pub schedule_overruns: IntCounterVec,
    /// Constant 1 with version and model labels.
    pub build_info: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn fgauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Result<Self> {
        let r = Registry::new();
        let single_counter = |name: &str, help: &str| -> Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let single_gauge = |name: &str, help: &str| -> Result<Gauge> {
            let g = Gauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let int_gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
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
            oldest_queued_age: single_gauge("deltadoc_oldest_queued_age_seconds", "Age of the oldest document waiting to run.")?,
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
            schedule_overruns: counter(
                &r,
                "deltadoc_schedule_overruns_total",
                "Schedule runs that outlasted their window.",
                &["pipeline"],
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

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `GET /metrics` on `addr` from a thread of its own; `refresh` runs before every scrape
/// (to read queue gauges from the ledger). Returns the bound address.
pub fn serve(addr: &str, metrics: Arc<Metrics>, refresh: Arc<dyn Fn() + Send + Sync>) -> Result<SocketAddr> {
    let addr: SocketAddr =
        addr.parse().with_context(|| format!("metrics.listen {addr:?} is not an address like 127.0.0.1:9464"))?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("metrics: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("metrics endpoint cannot start: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let m = metrics.clone();
                    let refresh = refresh.clone();
                    async move {
                        refresh();
                        ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render())
                    }
                }),
            );
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
