//! Prometheus metrics (`deltadoc_` prefix, units in names, bounded labels only: pipeline, stage,
//! outcome, reason, state, kind, source, folder; never paths): every series the daemon exports, declared
//! once in the table below. [`super::events`] is the only place that updates them.

use anyhow::Result;
use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::events::{InternalEvent, SchedulesSampled};
use crate::config::Pipeline;
use crate::ledger::Ledger;

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

/// One series: its name, help text, labels, and for a histogram its buckets.
struct Series {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
}

impl Series {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self { name, help, labels, buckets: &[] }
    }

    const fn histogram(name: &'static str, help: &'static str, labels: &'static [&'static str], buckets: &'static [f64]) -> Self {
        Self { name, help, labels, buckets }
    }
}

const DOCUMENTS: Series = Series::new("deltadoc_documents_total", "Documents by pipeline and outcome.", &["pipeline", "outcome"]);
const FAILURES: Series = Series::new(
    "deltadoc_failures_total",
    "Failed document attempts by pipeline, reason and stage.",
    &["pipeline", "reason", "stage"],
);
const RETRIES: Series = Series::new("deltadoc_retries_total", "Failed attempts scheduled for another try.", &["pipeline"]);
const PAGES: Series = Series::new("deltadoc_pages_total", "Pages processed, by how their text was obtained.", &["kind"]);
const CONTEXT_TRUNCATIONS: Series =
    Series::new("deltadoc_context_truncations_total", "Model inputs that had to be cut to fit the context (normally 0).", &[]);
const STAGE_DURATION: Series =
    Series::histogram("deltadoc_stage_duration_seconds", "Seconds per document step.", &["pipeline", "stage"], &DURATION_BUCKETS);
const DOCUMENT_DURATION: Series = Series::histogram(
    "deltadoc_document_duration_seconds",
    "Seconds per document attempt, all steps.",
    &["pipeline"],
    &DURATION_BUCKETS,
);
const QUEUE_WAIT: Series =
    Series::histogram("deltadoc_queue_wait_seconds", "Seconds from queued to started.", &["pipeline"], &DURATION_BUCKETS);
const TTFT: Series = Series::histogram(
    "deltadoc_time_to_first_token_seconds",
    "Seconds from a model call to its first generated token.",
    &["pipeline"],
    &DURATION_BUCKETS,
);
const DOCUMENT_PAGES: Series = Series::histogram("deltadoc_document_pages", "Pages per document.", &["pipeline"], &COUNT_BUCKETS);
const DOCUMENT_PROMPT_TOKENS: Series = Series::histogram(
    "deltadoc_document_prompt_tokens",
    "Tokens of a document's text as the model sees it.",
    &["pipeline"],
    &TOKEN_BUCKETS,
);
const INFLIGHT: Series = Series::new("deltadoc_inflight_documents", "Documents being processed now.", &[]);
const PROMPT_TOKENS: Series = Series::new("deltadoc_prompt_tokens_total", "Prompt tokens of model calls.", &["pipeline"]);
const PREFILLED_TOKENS: Series = Series::new(
    "deltadoc_prefilled_tokens_total",
    "Prompt tokens actually prefilled (the rest came from a reused document prefix).",
    &["pipeline"],
);
const GENERATION_TOKENS: Series = Series::new("deltadoc_generation_tokens_total", "Generated tokens.", &["pipeline"]);
const PREFILL_SECONDS: Series = Series::new(
    "deltadoc_prefill_seconds_total",
    "Seconds spent prefilling prompts (rate of deltadoc_prefilled_tokens_total over this is prefill tokens/s).",
    &["pipeline"],
);
const DECODE_SECONDS: Series = Series::new(
    "deltadoc_decode_seconds_total",
    "Seconds spent generating (rate of deltadoc_generation_tokens_total over this is decode tokens/s).",
    &["pipeline"],
);
const KV_STATE_BYTES: Series =
    Series::new("deltadoc_kv_state_bytes", "KV cache plus DeltaNet state bytes of the last model call.", &[]);
const QUEUE_DEPTH: Series = Series::new("deltadoc_queue_depth", "Documents per pipeline and state.", &["pipeline", "state"]);
const OLDEST_QUEUED_AGE: Series = Series::new(
    "deltadoc_oldest_queued_age_seconds",
    "Age of the oldest document waiting to run (0 when none waits).",
    &["pipeline"],
);
const PIPELINE_SCHEDULED: Series = Series::new(
    "deltadoc_pipeline_scheduled",
    "1 when the pipeline runs in a schedule window (documents wait for it), 0 when it runs on arrival.",
    &["pipeline"],
);
const WATCH_EVENTS: Series = Series::new("deltadoc_watch_events_total", "Files noticed, by source.", &["source"]);
const FILES_RECORDED: Series = Series::new(
    "deltadoc_files_recorded_total",
    "Stable files this daemon recorded in the ledger: a new job, a duplicate of one, or already known (in a fleet, \
     mostly recorded by another daemon first).",
    &["result"],
);
const INBOX_RESCANS: Series = Series::new(
    "deltadoc_inbox_rescans_total",
    "Rounds of the periodic rescan: every folder inbox walked and every bucket inbox listed.",
    &[],
);
const RESCAN_FOUND: Series = Series::new(
    "deltadoc_rescan_found_total",
    "Files found by a periodic rescan that no filesystem event reported (the watcher misses events).",
    &[],
);
const LAST_RUN_START: Series =
    Series::new("deltadoc_last_run_start_timestamp_seconds", "Start of the last schedule run.", &["pipeline"]);
const LAST_RUN_END: Series =
    Series::new("deltadoc_last_run_end_timestamp_seconds", "End of the last schedule run.", &["pipeline"]);
const LAST_RUN_SUCCESS: Series =
    Series::new("deltadoc_last_run_success", "1 when the last schedule run quarantined no document.", &["pipeline"]);
const LAST_RUN_DOCUMENTS: Series =
    Series::new("deltadoc_last_run_documents", "Documents of the last schedule run.", &["pipeline"]);
const LAST_SUCCESS: Series = Series::new(
    "deltadoc_last_success_timestamp_seconds",
    "End of the last scheduled run that quarantined nothing; until the first one, when the schedule was first seen.",
    &["pipeline"],
);
const SCHEDULE_OVERRUNS: Series =
    Series::new("deltadoc_schedule_overruns_total", "Schedule runs that outlasted their window.", &["pipeline"]);
const SCHEDULE_RUN_DURATION: Series = Series::histogram(
    "deltadoc_schedule_run_duration_seconds",
    "Seconds from the start of a scheduled run to its end.",
    &["pipeline"],
    &DURATION_BUCKETS,
);
const SCHEDULE_RUN_DOCUMENTS: Series =
    Series::histogram("deltadoc_schedule_run_documents", "Documents per scheduled run.", &["pipeline"], &COUNT_BUCKETS);
const MODEL_LOADED: Series = Series::new("deltadoc_model_loaded", "1 when the model is loaded.", &["model"]);
const MODEL_LOAD_SECONDS: Series = Series::new("deltadoc_model_load_seconds", "Seconds the model took to load.", &[]);
const BUILD_INFO: Series =
    Series::new("deltadoc_build_info", "Constant 1, labelled with the version and model.", &["version", "model"]);
const RESIDENT_MEMORY: Series = Series::new("deltadoc_process_resident_memory_bytes", "Resident memory of the daemon now.", &[]);
const PEAK_RESIDENT_MEMORY: Series =
    Series::new("deltadoc_process_peak_resident_memory_bytes", "Peak resident memory of the daemon since it started.", &[]);
const READY: Series = Series::new(
    "deltadoc_ready",
    "1 when /readyz answers 200 (model loaded, ledger writable, inboxes reachable, worker not stalled).",
    &[],
);
const WORKER_HEARTBEAT_AGE: Series = Series::new(
    "deltadoc_worker_heartbeat_age_seconds",
    "Seconds since the worker last showed progress (a queue poll, a step, a prefill chunk).",
    &[],
);
const WRITES_BLOCKED: Series = Series::new(
    "deltadoc_writes_blocked",
    "1 while the worker holds a write that the folder's storage refuses (full, read-only, no permission).",
    &["folder"],
);
const OBJECT_STORE_ERRORS: Series = Series::new(
    "deltadoc_object_store_errors_total",
    "Requests to an object store (s3:// inboxes, outputs, quarantines) that failed after the client's own retries, by \
     operation.",
    &["op"],
);
const LEDGER_UP: Series = Series::new(
    "deltadoc_ledger_up",
    "1 when the ledger answered the last heartbeat or probe, 0 while it cannot be reached.",
    &[],
);
const FLEET_WORKERS: Series = Series::new(
    "deltadoc_fleet_workers",
    "Workers of the shared ledger by state (live, or stale: no heartbeat within their lease); every daemon reports \
     the whole fleet, so aggregate with max, not sum.",
    &["state"],
);
const LEASE_TAKEOVERS: Series = Series::new(
    "deltadoc_lease_takeovers_total",
    "Jobs this daemon queued again because the worker running them sent no heartbeat within its lease.",
    &[],
);
const LEASES_LOST: Series = Series::new(
    "deltadoc_leases_lost_total",
    "Jobs this daemon finished after another took them over (it wrote nothing): it was paused or cut off.",
    &[],
);
const CONFIG_RELOADS: Series =
    Series::new("deltadoc_config_reloads_total", "Configuration reloads on SIGHUP, by outcome.", &["outcome"]);

/// A collector type the table's series are made as.
trait Make: Sized {
    fn make(s: &Series) -> prometheus::Result<Self>;
}

macro_rules! make_labelled {
    ($($t:ty),*) => {$(
        impl Make for $t {
            fn make(s: &Series) -> prometheus::Result<Self> {
                <$t>::new(Opts::new(s.name, s.help), s.labels)
            }
        }
    )*};
}
make_labelled!(IntCounterVec, IntGaugeVec, GaugeVec, CounterVec);

macro_rules! make_single {
    ($($t:ty),*) => {$(
        impl Make for $t {
            fn make(s: &Series) -> prometheus::Result<Self> {
                <$t>::new(s.name, s.help)
            }
        }
    )*};
}
make_single!(IntCounter, IntGauge, Gauge);

impl Make for HistogramVec {
    fn make(s: &Series) -> prometheus::Result<Self> {
        HistogramVec::new(HistogramOpts::new(s.name, s.help).buckets(s.buckets.to_vec()), s.labels)
    }
}

/// Makes the series `s` and registers it.
fn register<C: Make + prometheus::core::Collector + Clone + 'static>(r: &Registry, s: &Series) -> Result<C> {
    let c = C::make(s)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Every series the daemon exports (the table above says what each is).
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) documents: IntCounterVec,
    pub(crate) failures: IntCounterVec,
    pub(crate) retries: IntCounterVec,
    pub(crate) pages: IntCounterVec,
    pub(crate) context_truncations: IntCounter,
    pub(crate) stage_duration: HistogramVec,
    pub(crate) document_duration: HistogramVec,
    pub(crate) queue_wait: HistogramVec,
    pub(crate) ttft: HistogramVec,
    pub(crate) document_pages: HistogramVec,
    pub(crate) document_prompt_tokens: HistogramVec,
    pub(crate) inflight: IntGauge,
    pub(crate) prompt_tokens: IntCounterVec,
    pub(crate) prefilled_tokens: IntCounterVec,
    pub(crate) generation_tokens: IntCounterVec,
    pub(crate) prefill_seconds: CounterVec,
    pub(crate) decode_seconds: CounterVec,
    pub(crate) kv_state_bytes: IntGauge,
    pub(crate) queue_depth: IntGaugeVec,
    pub(crate) oldest_queued_age: GaugeVec,
    pub(crate) pipeline_scheduled: IntGaugeVec,
    pub(crate) watch_events: IntCounterVec,
    pub(crate) rescan_found: IntCounter,
    pub(crate) inbox_rescans: IntCounter,
    pub(crate) files_recorded: IntCounterVec,
    pub(crate) last_run_start: GaugeVec,
    pub(crate) last_run_end: GaugeVec,
    pub(crate) last_run_success: IntGaugeVec,
    pub(crate) last_run_documents: IntGaugeVec,
    pub(crate) last_success: GaugeVec,
    pub(crate) schedule_overruns: IntCounterVec,
    pub(crate) schedule_run_duration: HistogramVec,
    pub(crate) schedule_run_documents: HistogramVec,
    pub(crate) model_loaded: IntGaugeVec,
    pub(crate) model_load_seconds: Gauge,
    pub(crate) build_info: IntGaugeVec,
    pub(crate) resident_memory: IntGauge,
    pub(crate) peak_resident_memory: IntGauge,
    pub(crate) ready: IntGauge,
    pub(crate) worker_heartbeat_age: Gauge,
    pub(crate) config_reloads: IntCounterVec,
    pub(crate) writes_blocked: IntGaugeVec,
    pub(crate) object_store_errors: IntCounterVec,
    pub(crate) ledger_up: IntGauge,
    pub(crate) fleet_workers: IntGaugeVec,
    pub(crate) lease_takeovers: IntCounter,
    pub(crate) leases_lost: IntCounter,
}

impl Metrics {
    /// Registers every series.
    pub(crate) fn new() -> Result<Self> {
        let r = Registry::new();
        Ok(Self {
            documents: register(&r, &DOCUMENTS)?,
            failures: register(&r, &FAILURES)?,
            retries: register(&r, &RETRIES)?,
            pages: register(&r, &PAGES)?,
            context_truncations: register(&r, &CONTEXT_TRUNCATIONS)?,
            stage_duration: register(&r, &STAGE_DURATION)?,
            document_duration: register(&r, &DOCUMENT_DURATION)?,
            queue_wait: register(&r, &QUEUE_WAIT)?,
            ttft: register(&r, &TTFT)?,
            document_pages: register(&r, &DOCUMENT_PAGES)?,
            document_prompt_tokens: register(&r, &DOCUMENT_PROMPT_TOKENS)?,
            inflight: register(&r, &INFLIGHT)?,
            prompt_tokens: register(&r, &PROMPT_TOKENS)?,
            prefilled_tokens: register(&r, &PREFILLED_TOKENS)?,
            generation_tokens: register(&r, &GENERATION_TOKENS)?,
            prefill_seconds: register(&r, &PREFILL_SECONDS)?,
            decode_seconds: register(&r, &DECODE_SECONDS)?,
            kv_state_bytes: register(&r, &KV_STATE_BYTES)?,
            queue_depth: register(&r, &QUEUE_DEPTH)?,
            oldest_queued_age: register(&r, &OLDEST_QUEUED_AGE)?,
            pipeline_scheduled: register(&r, &PIPELINE_SCHEDULED)?,
            watch_events: register(&r, &WATCH_EVENTS)?,
            rescan_found: register(&r, &RESCAN_FOUND)?,
            inbox_rescans: register(&r, &INBOX_RESCANS)?,
            files_recorded: register(&r, &FILES_RECORDED)?,
            last_run_start: register(&r, &LAST_RUN_START)?,
            last_run_end: register(&r, &LAST_RUN_END)?,
            last_run_success: register(&r, &LAST_RUN_SUCCESS)?,
            last_run_documents: register(&r, &LAST_RUN_DOCUMENTS)?,
            last_success: register(&r, &LAST_SUCCESS)?,
            schedule_overruns: register(&r, &SCHEDULE_OVERRUNS)?,
            schedule_run_duration: register(&r, &SCHEDULE_RUN_DURATION)?,
            schedule_run_documents: register(&r, &SCHEDULE_RUN_DOCUMENTS)?,
            model_loaded: register(&r, &MODEL_LOADED)?,
            model_load_seconds: register(&r, &MODEL_LOAD_SECONDS)?,
            build_info: register(&r, &BUILD_INFO)?,
            resident_memory: register(&r, &RESIDENT_MEMORY)?,
            peak_resident_memory: register(&r, &PEAK_RESIDENT_MEMORY)?,
            ready: register(&r, &READY)?,
            worker_heartbeat_age: register(&r, &WORKER_HEARTBEAT_AGE)?,
            config_reloads: register(&r, &CONFIG_RELOADS)?,
            writes_blocked: register(&r, &WRITES_BLOCKED)?,
            object_store_errors: register(&r, &OBJECT_STORE_ERRORS)?,
            ledger_up: register(&r, &LEDGER_UP)?,
            fleet_workers: register(&r, &FLEET_WORKERS)?,
            lease_takeovers: register(&r, &LEASE_TAKEOVERS)?,
            leases_lost: register(&r, &LEASES_LOST)?,
            registry: r,
        })
    }

    /// Creates the series of every pipeline at zero, so that a `rate()` or an alert sees 0
    /// rather than nothing before the first event, and reads the schedule timestamps from the
    /// ledger so a restart does not reset them.
    pub(crate) fn init_pipelines(&self, pipelines: &[Pipeline], ledger: &mut dyn Ledger) -> Result<()> {
        for p in pipelines {
            let n = p.name();
            self.pipeline_scheduled.with_label_values(&[n]).set(p.spec.schedule.is_some() as i64);
            for outcome in super::events::OUTCOMES {
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
            }
        }
        SchedulesSampled::read(pipelines, ledger)?.emit(self);
        for kind in ["text", "ocr"] {
            self.pages.with_label_values(&[kind]);
        }
        for source in ["inotify", "rescan", "notification"] {
            self.watch_events.with_label_values(&[source]);
        }
        for outcome in ["ok", "failed"] {
            self.config_reloads.with_label_values(&[outcome]);
        }
        for folder in super::storage::Folder::ALL {
            self.writes_blocked.with_label_values(&[folder.name()]);
        }
        for op in crate::bucket::Op::ALL {
            self.object_store_errors.with_label_values(&[op.name()]);
        }
        for result in ["new", "duplicate", "known"] {
            self.files_recorded.with_label_values(&[result]);
        }
        Ok(())
    }

    /// The text exposition of every series.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The first sample of series `name` whose line has every one of `labels` (`key="value"`),
    /// as the exposition shows it.
    #[cfg(test)]
    pub(crate) fn sample(&self, name: &str, labels: &[&str]) -> Option<f64> {
        self.render().lines().filter(|l| labels.iter().all(|x| l.contains(x))).find_map(|l| {
            let (head, v) = l.rsplit_once(' ')?;
            (head == name || head.starts_with(&format!("{name}{{"))).then(|| v.parse().ok())?
        })
    }
}
