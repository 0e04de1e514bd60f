//! Internal events: everything that happens in the daemon is one value here, and emitting it
//! writes its log line (or progress line) and updates its metrics together, so the two never
//! disagree and a new metric is one place to change. Metric names and labels are the contract
//! with `deploy/grafana/deltadoc.json` and `deploy/prometheus/alerts.yaml`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::health::Health;
use super::inbox::Seen;
use super::metrics::Metrics;
use super::storage::Folder;
use crate::bucket::StoreError;
use crate::config::Pipeline;
use crate::extract::Method;
use crate::failure::Failure;
use crate::ledger::{Discovery, Ledger, Run, Takeover, WorkerState, now_s, state};
use crate::llm::ModelInfo;
use crate::output::DocResult;
use crate::progress::DocProgress;
use crate::schedule;
use crate::util::ProcessMemory;

/// Something that happened, with what its log line and metrics need.
pub(crate) trait InternalEvent {
    /// Writes the log line and updates the metrics.
    fn emit(self, m: &Metrics);
}

/// Values of the `outcome` label of `deltadoc_documents_total`.
pub(crate) const OUTCOMES: [&str; 4] = ["ok", "failed", "quarantined", "skipped_duplicate"];

/// A file was noticed in an inbox for the first time (or changed since).
pub(crate) struct FileNoticed {
    /// By an event or a scan.
    pub source: Seen,
    /// A periodic rescan found it although the watcher runs: the watcher missed it.
    pub missed_by_watcher: bool,
}

impl InternalEvent for FileNoticed {
    fn emit(self, m: &Metrics) {
        m.watch_events.with_label_values(&[self.source.name()]).inc();
        if self.missed_by_watcher {
            m.rescan_found.inc();
        }
    }
}

/// A round of the periodic rescan ended: every folder inbox walked, every bucket inbox listed.
pub(crate) struct InboxesRescanned {
    pub seconds: f64,
}

impl InternalEvent for InboxesRescanned {
    fn emit(self, m: &Metrics) {
        m.inbox_rescans.inc();
        tracing::debug!("rescan of every inbox took {:.2} s", self.seconds);
    }
}

/// A stable file was recorded in the ledger: a new job, a duplicate of an earlier one
/// (duplicates: skip), or a file already known (nothing to say).
pub(crate) struct FileRecorded<'a> {
    pub path: &'a Path,
    pub pipeline: &'a str,
    pub discovery: Discovery,
}

impl InternalEvent for FileRecorded<'_> {
    fn emit(self, m: &Metrics) {
        let (path, pipeline) = (self.path.display(), self.pipeline);
        let result = match self.discovery {
            Discovery::Queued(job) => {
                tracing::info!("{path}: queued as job {job} ({pipeline})");
                "new"
            }
            Discovery::Duplicate { of } => {
                m.documents.with_label_values(&[pipeline, "skipped_duplicate"]).inc();
                tracing::info!("{path}: same content as job {of}; skipped (duplicates: skip)");
                "duplicate"
            }
            Discovery::Known => "known",
        };
        m.files_recorded.with_label_values(&[result]).inc();
    }
}

/// The worker took a job.
pub(crate) struct DocumentStarted<'a> {
    pub pipeline: &'a str,
    /// Seconds it waited in the queue.
    pub waited_s: f64,
}

impl InternalEvent for DocumentStarted<'_> {
    fn emit(self, m: &Metrics) {
        m.queue_wait.with_label_values(&[self.pipeline]).observe(self.waited_s.max(0.0));
        m.inflight.inc();
    }
}

/// A document's next step (extraction, a stage, a reduce) started: the progress line (a
/// spinner on a terminal, a log line otherwise) says so.
pub(crate) struct StepStarted<'a> {
    pub step: &'a str,
    pub progress: &'a DocProgress,
}

impl InternalEvent for StepStarted<'_> {
    fn emit(self, _: &Metrics) {
        self.progress.step(self.step);
    }
}

/// A prefill call consumed `tokens` more prompt tokens (the token counters are updated once the
/// document is done, from its result, so a retried attempt is not counted twice).
pub(crate) struct Prefilled<'a> {
    pub tokens: usize,
    pub progress: &'a DocProgress,
}

impl InternalEvent for Prefilled<'_> {
    fn emit(self, _: &Metrics) {
        self.progress.prefilled(self.tokens);
    }
}

/// At start-up: the daemon had died under a document at the same place too many times in a row,
/// so it goes to quarantine without another attempt.
pub(crate) struct DocumentCrashedDaemon<'a> {
    pub pipeline: &'a str,
    pub source: &'a Path,
    pub failure: &'a Failure,
}

impl InternalEvent for DocumentCrashedDaemon<'_> {
    fn emit(self, m: &Metrics) {
        let (p, f) = (self.pipeline, self.failure);
        count_quarantined(m, p, f);
        tracing::error!("{}: quarantined ({}: {})", self.source.display(), f.reason.name(), f.message);
    }
}

/// An attempt at a document ended: how long it took and what came of it.
pub(crate) struct AttemptEnded<'a> {
    pub pipeline: &'a str,
    /// Seconds the pipeline ran.
    pub seconds: f64,
    pub outcome: Outcome<'a>,
    pub progress: &'a DocProgress,
}

/// What came of an attempt.
pub(crate) enum Outcome<'a> {
    /// The result was written.
    Done { result: &'a DocResult, output: &'a Path },
    /// It failed and will be tried again: attempt `next` of `max`, after `wait_s` seconds.
    Retrying { failure: &'a Failure, next: u32, max: u32, wait_s: f64 },
    /// It failed for good and went to quarantine.
    Quarantined { failure: &'a Failure },
    /// Shutdown stopped it; it goes back to the queue without counting an attempt.
    Interrupted,
    /// Another worker took the job over while this one ran it (`LeaseLost` says so): nothing
    /// written.
    Lost,
}

impl InternalEvent for AttemptEnded<'_> {
    fn emit(self, m: &Metrics) {
        let p = self.pipeline;
        m.inflight.dec();
        m.document_duration.with_label_values(&[p]).observe(self.seconds);
        let line = match self.outcome {
            Outcome::Done { result, output } => {
                m.documents.with_label_values(&[p, "ok"]).inc();
                result_metrics(m, p, result);
                format!("done → {}", output.display())
            }
            Outcome::Retrying { failure: f, next, max, wait_s } => {
                m.failures.with_label_values(&[p, f.reason.name(), &f.stage]).inc();
                m.retries.with_label_values(&[p]).inc();
                m.documents.with_label_values(&[p, "failed"]).inc();
                format!("failed ({}: {}); retry {next} of {max} in {wait_s:.0} s", f.reason.name(), f.message)
            }
            Outcome::Quarantined { failure: f } => {
                count_quarantined(m, p, f);
                format!("quarantined ({}: {})", f.reason.name(), f.message)
            }
            Outcome::Interrupted => "interrupted; queued again".into(),
            Outcome::Lost => "taken over by another worker; nothing written".into(),
        };
        self.progress.finish(&line);
    }
}

/// A document of pipeline `p` went to quarantine for `f`.
fn count_quarantined(m: &Metrics, p: &str, f: &Failure) {
    m.failures.with_label_values(&[p, f.reason.name(), &f.stage]).inc();
    m.documents.with_label_values(&[p, "quarantined"]).inc();
}

/// What a result tells the metrics: step times, pages, sizes, tokens, model time, state.
fn result_metrics(m: &Metrics, p: &str, r: &DocResult) {
    for (stage, secs) in r.timings.iter().filter(|(s, _)| *s != "total") {
        m.stage_duration.with_label_values(&[p, stage]).observe(*secs);
    }
    for page in &r.pages {
        m.pages.with_label_values(&[if page.method == Method::Ocr { "ocr" } else { "text" }]).inc();
    }
    m.document_pages.with_label_values(&[p]).observe(r.pages.len() as f64);
    m.document_prompt_tokens.with_label_values(&[p]).observe(r.document_tokens as f64);
    if r.truncated {
        m.context_truncations.inc();
    }
    for t in r.stages.values().filter_map(|s| s.ttft_s) {
        m.ttft.with_label_values(&[p]).observe(t);
    }
    m.prompt_tokens.with_label_values(&[p]).inc_by(r.tokens.prompt as u64);
    m.prefilled_tokens.with_label_values(&[p]).inc_by(r.tokens.prefilled as u64);
    m.generation_tokens.with_label_values(&[p]).inc_by(r.tokens.generated as u64);
    m.prefill_seconds.with_label_values(&[p]).inc_by(r.stages.values().map(|s| s.prefill_s).sum());
    m.decode_seconds.with_label_values(&[p]).inc_by(r.stages.values().map(|s| s.decode_s).sum());
    if let Some(b) = r.stages.values().map(|s| s.state_bytes).max().filter(|&b| b > 0) {
        m.kv_state_bytes.set(b as i64);
    }
}

impl InternalEvent for schedule::Event {
    fn emit(self, m: &Metrics) {
        match self {
            schedule::Event::Started { pipeline, planned, catch_up } => {
                if catch_up {
                    tracing::warn!("{pipeline}: the run planned for {planned} was missed; running it now");
                } else {
                    tracing::info!("{pipeline}: scheduled run started (planned {planned})");
                }
            }
            schedule::Event::Overrun { pipeline } => {
                m.schedule_overruns.with_label_values(&[&pipeline]).inc();
                tracing::warn!("{pipeline}: the scheduled run is past its window and still has documents");
            }
            schedule::Event::Ended { pipeline, documents, ok, overran, started } => {
                let p: &[&str] = &[&pipeline];
                m.schedule_run_duration.with_label_values(p).observe((now_s() - started).max(0.0));
                m.schedule_run_documents.with_label_values(p).observe(documents as f64);
                tracing::info!(
                    "{pipeline}: scheduled run ended after {:.0} s: {documents} document(s), {}{}",
                    now_s() - started,
                    if ok { "none quarantined" } else { "some quarantined" },
                    if overran { ", past its window" } else { "" }
                );
            }
        }
    }
}

/// SIGHUP loaded a new configuration.
pub(crate) struct ConfigReloaded<'a> {
    pub pipelines: &'a [&'a str],
}

impl InternalEvent for ConfigReloaded<'_> {
    fn emit(self, m: &Metrics) {
        m.config_reloads.with_label_values(&["ok"]).inc();
        tracing::info!("configuration reloaded: pipelines {}", self.pipelines.join(", "));
    }
}

/// SIGHUP found a configuration that does not load; the running one stays.
pub(crate) struct ConfigReloadRefused<'a> {
    pub error: &'a anyhow::Error,
}

impl InternalEvent for ConfigReloadRefused<'_> {
    fn emit(self, m: &Metrics) {
        m.config_reloads.with_label_values(&["failed"]).inc();
        tracing::error!("reload refused, the running configuration stays: {:#}", self.error);
    }
}

/// A write the storage refused (`daemon/storage.rs`): held, tried again after `retry_in`.
pub(crate) struct WritesBlocked<'a> {
    pub folder: Folder,
    pub path: &'a Path,
    pub health: &'a Health,
    pub error: &'a anyhow::Error,
    /// The first refusal of this write.
    pub first: bool,
    /// Seconds since the first refusal.
    pub blocked_s: f64,
    pub retry_in: Duration,
}

impl InternalEvent for WritesBlocked<'_> {
    fn emit(self, m: &Metrics) {
        let (folder, what, path) = (self.folder.name(), self.folder.what(), self.path.display());
        count_store_error(m, self.error);
        m.writes_blocked.with_label_values(&[folder]).set(1);
        self.health.set_blocked(Some(format!("{what}: {:#}", self.error)));
        let (retry, (act, _)) = (self.retry_in.as_secs(), self.folder.act());
        if self.first {
            tracing::error!(
                "{:#}; the {what} refuses the {act}, so deltadoc holds it and tries again in {retry} s \
                 (the document is not run again)",
                self.error
            );
        } else {
            tracing::warn!("{path}: still refused after {:.0} s ({:#}); next try in {retry} s", self.blocked_s, self.error);
        }
    }
}

/// Counts `e` in `deltadoc_object_store_errors_total` when an object store request failed.
fn count_store_error(m: &Metrics, e: &anyhow::Error) {
    if let Some(e) = e.chain().find_map(|c| c.downcast_ref::<StoreError>()) {
        m.object_store_errors.with_label_values(&[e.op.name()]).inc();
    }
}

/// A request to an object store failed (after the client's own retries) where nothing waits
/// for it: a listing or a download of the ingest, which the next rescan makes again.
pub(crate) struct ObjectStoreFailed<'a> {
    pub error: &'a anyhow::Error,
    /// The first failure of this inbox in a row: said as a warning; later ones are counted.
    pub first: bool,
}

impl InternalEvent for ObjectStoreFailed<'_> {
    fn emit(self, m: &Metrics) {
        count_store_error(m, self.error);
        if self.first {
            tracing::warn!("{:#}; tried again at the next rescan", self.error);
        } else {
            tracing::debug!("{:#}", self.error);
        }
    }
}

/// The storage took a held write again: it went through, or failed for another reason (which
/// the caller reports).
pub(crate) struct WritesResumed<'a> {
    pub folder: Folder,
    pub path: &'a Path,
    pub health: &'a Health,
    pub waited_s: f64,
    pub written: bool,
}

impl InternalEvent for WritesResumed<'_> {
    fn emit(self, m: &Metrics) {
        let (folder, what, path, waited) = (self.folder.name(), self.folder.what(), self.path.display(), self.waited_s);
        m.writes_blocked.with_label_values(&[folder]).set(0);
        self.health.set_blocked(None);
        let (act, done) = self.folder.act();
        if self.written {
            tracing::info!("{path}: {done} after waiting {waited:.0} s for the {what}");
        } else {
            tracing::warn!("{path}: the {what} took the {act} after {waited:.0} s, but it failed otherwise");
        }
    }
}

/// The model is loaded.
pub(crate) struct ModelLoaded<'a> {
    pub info: &'a ModelInfo,
    pub seconds: f64,
}

impl InternalEvent for ModelLoaded<'_> {
    fn emit(self, m: &Metrics) {
        m.model_load_seconds.set(self.seconds);
        m.model_loaded.with_label_values(&[&self.info.name]).set(1);
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &self.info.name]).set(1);
        if self.info.random_weights {
            tracing::warn!("model {} has random weights: results are placeholders (see README: real weights)", self.info.source);
        }
    }
}

/// The scheduled runs as the ledger knows them, before a scrape and at start. In a fleet the
/// run a daemon reports may have been started or ended by another, so the `last_run` and
/// `last_success` gauges are never set from this daemon's own events.
pub(crate) struct SchedulesSampled {
    /// Per scheduled pipeline: the end of its last run without quarantine (or when the schedule
    /// was first seen), and its last run.
    pub pipelines: Vec<(String, f64, Option<Run>)>,
}

impl SchedulesSampled {
    /// Reads the schedules of `pipelines` from the ledger.
    pub fn read(pipelines: &[Pipeline], ledger: &mut dyn Ledger) -> anyhow::Result<Self> {
        let mut sampled = Vec::new();
        for p in pipelines.iter().filter(|p| p.spec.schedule.is_some()) {
            let n = p.name();
            let since = match ledger.last_success(n)? {
                Some(t) => t,
                None => ledger.first_seen(n, now_s())?,
            };
            sampled.push((n.to_string(), since, ledger.last_run(n)?));
        }
        Ok(Self { pipelines: sampled })
    }
}

impl InternalEvent for SchedulesSampled {
    fn emit(self, m: &Metrics) {
        for (n, since, run) in self.pipelines {
            let p: &[&str] = &[&n];
            m.last_success.with_label_values(p).set(since);
            let Some(run) = run else { continue };
            m.last_run_start.with_label_values(p).set(run.started_at);
            if let (Some(end), Some(ok)) = (run.ended_at, run.ok) {
                m.last_run_end.with_label_values(p).set(end);
                m.last_run_success.with_label_values(p).set(ok as i64);
                m.last_run_documents.with_label_values(p).set(run.documents as i64);
            }
        }
    }
}

/// The queue as the ledger and the stability tracker see it now (before a scrape; when the
/// ledger does not answer in time, the gauges keep their last values).
pub(crate) struct QueueSampled<'a> {
    pub pipelines: &'a [String],
    /// Jobs per (pipeline, state).
    pub counts: Vec<(String, String, u64)>,
    /// When the oldest queued job of each pipeline was queued.
    pub oldest: Vec<(String, f64)>,
    /// Files waiting for a stable size, per pipeline.
    pub waiting: &'a HashMap<String, usize>,
}

impl InternalEvent for QueueSampled<'_> {
    fn emit(self, m: &Metrics) {
        for p in self.pipelines {
            for s in state::ALL {
                m.queue_depth.with_label_values(&[p, s]).set(0);
            }
            m.queue_depth.with_label_values(&[p, "waiting_stable"]).set(*self.waiting.get(p).unwrap_or(&0) as i64);
            m.oldest_queued_age.with_label_values(&[p]).set(0.0);
        }
        for (p, s, n) in self.counts {
            m.queue_depth.with_label_values(&[&p, &s]).set(n as i64);
        }
        for (p, t) in self.oldest {
            m.oldest_queued_age.with_label_values(&[&p]).set((now_s() - t).max(0.0));
        }
    }
}

/// A worker sent no heartbeat within its lease: its job went back to the queue for another.
pub(crate) struct LeaseTakenOver<'a> {
    pub takeover: &'a Takeover,
}

impl InternalEvent for LeaseTakenOver<'_> {
    fn emit(self, m: &Metrics) {
        let t = self.takeover;
        m.lease_takeovers.inc();
        tracing::warn!(
            "job {} ({}): worker {} sent no heartbeat for {:.0} s; its lease ran out and the job is queued again \
             for another worker (an interruption, not a failed attempt)",
            t.job,
            t.document.display(),
            t.worker,
            t.silent_s
        );
    }
}

/// This worker finished a job another had taken over while it was silent: it writes nothing.
pub(crate) struct LeaseLost<'a> {
    pub job: i64,
    pub document: &'a Path,
    /// What it did not write.
    pub withheld: &'a str,
}

impl InternalEvent for LeaseLost<'_> {
    fn emit(self, m: &Metrics) {
        m.leases_lost.inc();
        tracing::warn!(
            "job {} ({}): this worker lost its lease while it ran (paused, or cut off from the ledger, for longer than \
             worker.lease) and another worker has the job now; the {} is not written",
            self.job,
            self.document.display(),
            self.withheld
        );
    }
}

/// The heartbeat reached the ledger, or did not.
pub(crate) struct LedgerReached<'a> {
    pub ledger: &'a str,
    /// The error, when it failed.
    pub error: Option<&'a anyhow::Error>,
    /// The previous heartbeat failed too (a failure is logged once, a recovery always).
    pub was_down: bool,
}

impl InternalEvent for LedgerReached<'_> {
    fn emit(self, m: &Metrics) {
        m.ledger_up.set(self.error.is_none() as i64);
        match (self.error, self.was_down) {
            (Some(e), false) => tracing::error!("heartbeat: {e:#}; trying again (jobs stay leased to this worker meanwhile)"),
            (None, true) => tracing::info!("heartbeat: the ledger {} answers again", self.ledger),
            _ => {}
        }
    }
}

/// The ledger as a scrape found it: whether it took the probe's write, and its workers (`None`
/// when it did not answer in time: the worker gauges keep their last values).
pub(crate) struct FleetSampled<'a> {
    pub workers: Option<&'a [WorkerState]>,
    pub ledger_ok: bool,
}

impl InternalEvent for FleetSampled<'_> {
    fn emit(self, m: &Metrics) {
        m.ledger_up.set(self.ledger_ok as i64);
        if let Some(workers) = self.workers {
            let stale = workers.iter().filter(|w| w.stale()).count();
            m.fleet_workers.with_label_values(&["live"]).set((workers.len() - stale) as i64);
            m.fleet_workers.with_label_values(&["stale"]).set(stale as i64);
        }
    }
}

/// The daemon's own state now: readiness, the worker's heartbeat, memory.
pub(crate) struct ProcessSampled {
    pub ready: bool,
    pub heartbeat_age_s: f64,
    pub memory: ProcessMemory,
}

impl InternalEvent for ProcessSampled {
    fn emit(self, m: &Metrics) {
        m.ready.set(self.ready as i64);
        m.worker_heartbeat_age.set(self.heartbeat_age_s);
        m.resident_memory.set(self.memory.resident_bytes as i64);
        m.peak_resident_memory.set(self.memory.peak_bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Reason;

    #[test]
    fn an_outcome_updates_its_series_and_nothing_else_claims_them() {
        let m = Metrics::new().unwrap();
        let progress = DocProgress::new("job 1 a.pdf".into());
        let f = Failure::new(Reason::Timeout, "summary", "slow");
        m.inflight.set(2);
        let retrying = Outcome::Retrying { failure: &f, next: 2, max: 3, wait_s: 60.0 };
        AttemptEnded { pipeline: "p", seconds: 1.5, outcome: retrying, progress: &progress }.emit(&m);
        let quarantined = Outcome::Quarantined { failure: &f };
        AttemptEnded { pipeline: "p", seconds: 2.5, outcome: quarantined, progress: &progress }.emit(&m);
        assert_eq!(m.sample("deltadoc_inflight_documents", &[]), Some(0.0));
        assert_eq!(m.sample("deltadoc_document_duration_seconds_sum", &["pipeline=\"p\""]), Some(4.0));
        assert_eq!(m.sample("deltadoc_documents_total", &["outcome=\"failed\""]), Some(1.0));
        assert_eq!(m.sample("deltadoc_documents_total", &["outcome=\"quarantined\""]), Some(1.0));
        assert_eq!(m.sample("deltadoc_retries_total", &["pipeline=\"p\""]), Some(1.0));
        let failures = ["reason=\"timeout\"", "stage=\"summary\""];
        assert_eq!(m.sample("deltadoc_failures_total", &failures), Some(2.0));
        FileRecorded { path: Path::new("/in/b.pdf"), pipeline: "p", discovery: Discovery::Duplicate { of: 1 } }.emit(&m);
        assert_eq!(m.sample("deltadoc_documents_total", &["outcome=\"skipped_duplicate\""]), Some(1.0));
        FileNoticed { source: Seen::Scan, missed_by_watcher: true }.emit(&m);
        assert_eq!(m.sample("deltadoc_rescan_found_total", &[]), Some(1.0));
        assert_eq!(m.sample("deltadoc_watch_events_total", &["source=\"rescan\""]), Some(1.0));
    }
}
