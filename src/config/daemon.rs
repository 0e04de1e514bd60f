//! Daemon-wide settings (`config/deltadoc.yaml`). Every field has a default, the value the
//! shipped file writes out (a test keeps the two equal), so a file needs only what differs:
//!
//! ```yaml
//! model: {path: /var/lib/deltadoc/models/qwen35-0.8b}
//! state_dir: /var/lib/deltadoc
//! data_dir: /srv/deltadoc
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde::Deserialize;

use super::values::{ByteSize, Dur, GlobPattern};
use crate::llm::DEFAULT_PREFILL_CHUNK;

/// Daemon-wide settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The model every pipeline runs.
    pub model: ModelConfig,
    /// Intra-op threads of the model (0 = all cores).
    pub threads: usize,
    /// Memory a job may plan to use (weights + KV + state + activations).
    pub memory_budget: ByteSize,
    /// Ledger (SQLite), crash marker and other state of this daemon.
    pub state_dir: PathBuf,
    /// Prefill checkpoints and the journals of completed model calls (`stage/journal.rs`), so
    /// that a later attempt resumes a job. A fleet puts it on a volume every daemon mounts, so a
    /// job taken over resumes where the dead worker stopped (`docs/fleet.md`). Absent:
    /// `state_dir`.
    pub resume_dir: Option<PathBuf>,
    /// A PostgreSQL URL (`postgres://user@host:port/database`): the job ledger a fleet of
    /// daemons shares (`docs/fleet.md`). Absent: SQLite in `state_dir`, for one daemon.
    pub ledger: Option<String>,
    /// File holding the ledger's password when the URL has none (else `PGPASSWORD`).
    pub ledger_password_file: Option<PathBuf>,
    /// This daemon as a worker of the ledger.
    pub worker: WorkerConfig,
    /// Folder of pipeline definitions (`*.yaml`).
    pub pipelines: PathBuf,
    /// Relative inbox, output and quarantine paths of pipelines are relative to this folder
    /// (absent: the folder holding the pipelines folder). One pipeline file thus serves the demo
    /// (`examples`) and an install (`/srv/deltadoc`).
    pub data_dir: Option<PathBuf>,
    /// Prometheus endpoint and health probes.
    pub metrics: MetricsConfig,
    /// `human` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Watching the inboxes.
    pub ingest: IngestConfig,
    /// Per-document limits and retries.
    pub limits: Limits,
    /// How `s3://` inboxes, outputs and quarantines are reached (`docs/buckets.md`).
    pub object_store: ObjectStoreConfig,
}

impl DaemonConfig {
    /// Where prefill checkpoints and job journals live: `resume_dir`, else `state_dir`.
    pub fn resume_dir(&self) -> &Path {
        self.resume_dir.as_deref().unwrap_or(&self.state_dir)
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            threads: 0,
            memory_budget: ByteSize(20 << 30),
            state_dir: "state".into(),
            resume_dir: None,
            ledger: None,
            ledger_password_file: None,
            worker: WorkerConfig::default(),
            pipelines: "pipelines".into(),
            data_dir: None,
            metrics: MetricsConfig::default(),
            log_format: LogFormat::Human,
            ingest: IngestConfig::default(),
            limits: Limits::default(),
            object_store: ObjectStoreConfig::default(),
        }
    }
}

/// Which model folder runs the stages, and how.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A model folder written by `deltadoc model import` or `model synth`.
    pub path: PathBuf,
    /// When the folder does not exist, synthesise random weights of this shape there (demo only:
    /// results then say `random_weights: true`).
    pub synth_if_missing: Option<String>,
    /// Prompt tokens per prefill call: longer calls run faster and hold larger activations (the
    /// memory plan counts them).
    pub prefill_chunk: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { path: "models/current".into(), synth_if_missing: None, prefill_chunk: DEFAULT_PREFILL_CHUNK }
    }
}

/// This daemon as a worker of the ledger.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Unique among the live daemons sharing a ledger (absent: the host name). A daemon restarted
    /// under the same name takes back the jobs its predecessor was running at once; others take
    /// them once their lease runs out.
    pub name: Option<String>,
    /// A worker silent this long (no heartbeat: its machine died, its network was cut, it was
    /// paused) loses its jobs to the other daemons. Heartbeats go every third of it.
    pub lease: Dur,
    /// Most sequences decoded in one step: a document's stage calls (and its parts' calls) decode
    /// together, reading the weights once a step for all of them, each prefilled when a row is
    /// free; the memory plan may allow fewer (docs/model.md, "State and memory").
    pub max_batch: usize,
    /// Most documents in flight: their model calls decode in the same steps (up to
    /// `max_batch` at once, prefills taking turns), each document on a thread of its own and
    /// with an equal share of `memory_budget` beyond the weights. 1: one document at a time.
    /// Two finish 1.34 times the contracts an hour of one, four no more (benches/RESULTS.md,
    /// "Documents in flight").
    pub max_docs: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { name: None, lease: Dur(Duration::from_secs(30)), max_batch: 8, max_docs: 2 }
    }
}

/// How buckets are reached. Credentials are never here: they come from the AWS environment
/// (`AWS_ACCESS_KEY_ID`, …), a web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`, as
/// Kubernetes service accounts set them), the profile files (`AWS_PROFILE`), or the machine's
/// role (`src/bucket/mod.rs`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectStoreConfig {
    /// An S3-compatible server (`https://minio.internal:9000`); null: `AWS_ENDPOINT_URL`, the
    /// profile's `endpoint_url`, else AWS itself.
    pub endpoint: Option<String>,
    /// null: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's, else `us-east-1`.
    pub region: Option<String>,
    /// `path` (`endpoint/bucket/key`: MinIO, SeaweedFS, Ceph, R2) or `virtual`
    /// (`bucket.endpoint/key`).
    pub addressing: Addressing,
    /// PEM file of the certificate authority of a private endpoint (added to the system's;
    /// certificates are always verified).
    pub ca_file: Option<PathBuf>,
    /// A request that does not connect, or a download that stalls, this long fails; it is
    /// retried a few times within this long, then the daemon waits for the store.
    pub timeout: Dur,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        Self { endpoint: None, region: None, addressing: Addressing::Path, ca_file: None, timeout: Dur(Duration::from_secs(30)) }
    }
}

/// Where the bucket's name goes in a request.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Addressing {
    /// In the path.
    Path,
    /// In the host name.
    Virtual,
}

/// Prometheus endpoint settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics`, `/livez` and `/readyz` at all.
    pub enabled: bool,
    /// Listen address; loopback by default because metrics are not for the open network.
    pub listen: String,
    /// `/readyz` fails when documents are queued and the worker showed no progress this long.
    pub stall_after: Dur,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, listen: "127.0.0.1:9464".into(), stall_after: Dur(Duration::from_secs(900)) }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Human,
    /// One JSON object per line (journald, Loki).
    Json,
}

/// Inbox watching.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Full rescan of every inbox this often, whatever the watcher says.
    pub rescan_interval: Dur,
    /// A file counts as complete once its size and mtime stayed the same this long.
    pub stable_window: Dur,
    /// Do not use filesystem events at all (network mounts, some containers).
    pub poll_only: bool,
    /// File names never taken (temp files of scanners, editors and sync tools).
    pub ignore: Vec<GlobPattern>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        let ignore = [".*", "~*", "*.tmp", "*.part", "*.crdownload", "*.partial", "*.swp", "*.filepart", "Thumbs.db"];
        Self {
            rescan_interval: Dur(Duration::from_secs(60)),
            stable_window: Dur(Duration::from_secs(5)),
            poll_only: false,
            ignore: ignore.iter().map(|g| g.parse().expect("the built-in ignore globs are valid")).collect(),
        }
    }
}

/// Per-document limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Larger files are refused (`too_large`).
    pub max_file_bytes: ByteSize,
    /// PDFs with more pages are refused (`too_large`).
    pub max_pages: u32,
    /// Wall time of one attempt at one document, all stages.
    pub document_timeout: Dur,
    /// Wall time of the isolated text extraction process.
    pub extract_timeout: Dur,
    /// Address-space cap of the extraction process (decompression bombs).
    pub extract_memory: ByteSize,
    /// Attempts before a document goes to quarantine.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles after each further failure.
    pub retry_backoff: Dur,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: ByteSize(512 << 20),
            max_pages: 5000,
            document_timeout: Dur(Duration::from_secs(6 * 3600)),
            extract_timeout: Dur(Duration::from_secs(120)),
            extract_memory: ByteSize(4 << 30),
            max_attempts: 3,
            retry_backoff: Dur(Duration::from_secs(60)),
        }
    }
}

/// `DELTADOC_<FIELD>` environment variables override the file; each value is read as YAML of the
/// field's type, so it gets the same checks.
pub fn apply_env_overrides(d: &mut DaemonConfig, var: impl Fn(&str) -> Option<String>) -> Result<()> {
    fn set<T: for<'de> Deserialize<'de>>(slot: &mut T, name: &str, var: &impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = var(name) {
            *slot = serde_saphyr::from_str(&v).map_err(|e| anyhow!("environment variable {name}={v:?}: {e}"))?;
        }
        Ok(())
    }
    set(&mut d.model.path, "DELTADOC_MODEL", &var)?;
    set(&mut d.model.synth_if_missing, "DELTADOC_SYNTH_IF_MISSING", &var)?;
    set(&mut d.threads, "DELTADOC_THREADS", &var)?;
    set(&mut d.memory_budget, "DELTADOC_MEMORY_BUDGET", &var)?;
    set(&mut d.state_dir, "DELTADOC_STATE_DIR", &var)?;
    set(&mut d.resume_dir, "DELTADOC_RESUME_DIR", &var)?;
    set(&mut d.ledger, "DELTADOC_LEDGER", &var)?;
    set(&mut d.ledger_password_file, "DELTADOC_LEDGER_PASSWORD_FILE", &var)?;
    set(&mut d.worker.name, "DELTADOC_WORKER_NAME", &var)?;
    set(&mut d.worker.lease, "DELTADOC_WORKER_LEASE", &var)?;
    set(&mut d.worker.max_batch, "DELTADOC_WORKER_MAX_BATCH", &var)?;
    set(&mut d.worker.max_docs, "DELTADOC_WORKER_MAX_DOCS", &var)?;
    set(&mut d.pipelines, "DELTADOC_PIPELINES", &var)?;
    set(&mut d.data_dir, "DELTADOC_DATA_DIR", &var)?;
    set(&mut d.metrics.listen, "DELTADOC_METRICS_LISTEN", &var)?;
    set(&mut d.metrics.enabled, "DELTADOC_METRICS_ENABLED", &var)?;
    set(&mut d.log_format, "DELTADOC_LOG_FORMAT", &var)?;
    set(&mut d.ingest.poll_only, "DELTADOC_POLL_ONLY", &var)?;
    set(&mut d.ingest.rescan_interval, "DELTADOC_RESCAN_INTERVAL", &var)?;
    set(&mut d.ingest.stable_window, "DELTADOC_STABLE_WINDOW", &var)?;
    set(&mut d.limits.document_timeout, "DELTADOC_DOCUMENT_TIMEOUT", &var)?;
    set(&mut d.limits.max_attempts, "DELTADOC_MAX_ATTEMPTS", &var)?;
    set(&mut d.limits.retry_backoff, "DELTADOC_RETRY_BACKOFF", &var)?;
    Ok(())
}
