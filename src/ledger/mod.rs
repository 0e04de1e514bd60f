//! The job ledger: every document a pipeline has taken, its state, attempts, timings and errors,
//! and the schedule runs. [`Ledger`] is the interface the daemon uses (and the only hand-over
//! between its threads); [`SqliteLedger`] keeps it in one SQLite file in WAL mode, so that a
//! daemon killed at any point restarts with nothing lost and nothing done twice.
//!
//! Files still being written (waiting for a stable size) have no content hash yet and are not in
//! the ledger: the watcher tracks them in memory and the start-up scan finds them again.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;

use crate::failure::Failure;

mod sqlite;

pub use sqlite::{SqliteLedger, refused_by_storage};

/// Opens the ledger of a daemon whose state lives in `state_dir`.
pub fn open(state_dir: &Path) -> Result<Box<dyn Ledger>> {
    Ok(Box::new(SqliteLedger::open(state_dir)?))
}

/// Seconds since the Unix epoch, as stored in the ledger.
pub fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Job states.
pub mod state {
    /// Waiting for a worker (or for its schedule window).
    pub const QUEUED: &str = "queued";
    /// A worker holds it; `stage` says where it is.
    pub const RUNNING: &str = "running";
    /// Failed; tried again after `not_before`.
    pub const RETRY_WAIT: &str = "retry_wait";
    /// Result written.
    pub const DONE: &str = "done";
    /// Failed for good; in the quarantine folder with an error JSON.
    pub const QUARANTINED: &str = "quarantined";
    /// Content already processed under another name (duplicate policy `skip`).
    pub const SKIPPED: &str = "skipped";
    /// Every state, for reports.
    pub const ALL: [&str; 6] = [QUEUED, RUNNING, RETRY_WAIT, DONE, QUARANTINED, SKIPPED];
    /// The states of a job that will run again.
    pub const OPEN: [&str; 3] = [QUEUED, RUNNING, RETRY_WAIT];
}

/// One job as stored.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    /// Ledger id.
    pub id: i64,
    /// Idempotency key: sha256 of content + pipeline + version + model.
    pub key: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Inbox folder the file was found in.
    pub inbox: PathBuf,
    /// Path relative to the inbox (mirrored in the output folder).
    pub rel_path: PathBuf,
    /// Where the file is now (the inbox, or the quarantine folder after a move).
    pub source: PathBuf,
    /// sha256 of the bytes.
    pub sha256: String,
    /// Size of the file in bytes.
    pub size: u64,
    /// See [`state`].
    pub state: String,
    /// Stage being run, or the stage that failed.
    pub stage: Option<String>,
    /// Attempts started, not counting those interrupted by a daemon that stopped under them.
    pub attempts: u32,
    /// Times a daemon stopped (killed, crashed, lost power) while this job was running.
    pub interruptions: u32,
    /// When it was queued (Unix seconds).
    pub queued_at: f64,
    /// When the last attempt started.
    pub started_at: Option<f64>,
    /// When it ended (done or quarantined).
    pub finished_at: Option<f64>,
    /// Result file.
    pub output: Option<PathBuf>,
    /// Last failure.
    pub error: Option<Failure>,
    /// For skipped duplicates: the job that processed the same content.
    pub duplicate_of: Option<i64>,
}

/// What start-up found of the jobs a stopped daemon left running.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Jobs queued again.
    pub requeued: usize,
    /// A job the daemon died under at the same place `limit` times (at least 2) in a row, with
    /// that count: left running for the caller to quarantine.
    pub crashed: Option<(Job, u32)>,
}

/// A file that became stable in an inbox.
#[derive(Clone, Debug)]
pub struct NewJob<'a> {
    /// Idempotency key.
    pub key: &'a str,
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Pipeline priority (higher first).
    pub priority: i32,
    /// Inbox folder.
    pub inbox: &'a Path,
    /// Path relative to the inbox.
    pub rel_path: &'a Path,
    /// sha256 of the bytes.
    pub sha256: &'a str,
    /// Size of the file in bytes.
    pub size: u64,
    /// Process content seen before again (`reprocess`) or record a duplicate (`skip`).
    pub reprocess_duplicates: bool,
}

/// What [`Ledger::discover`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// A new job.
    Queued(i64),
    /// This file with this content is already known: nothing to do.
    Known,
    /// Same content as job `of` under another name: recorded as skipped.
    Duplicate {
        /// The job that has (or will have) the result.
        of: i64,
    },
}

/// A schedule run.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// Ledger id.
    pub id: i64,
    /// The pipeline whose schedule this run serves.
    pub pipeline: String,
    /// The cron fire time this run serves.
    pub planned_at: f64,
    /// When it started.
    pub started_at: f64,
    /// When it ended (`None` while running).
    pub ended_at: Option<f64>,
    /// Documents finished during the run.
    pub documents: u64,
    /// No document of the run was quarantined.
    pub ok: Option<bool>,
    /// It ran past its window.
    pub overran: bool,
}

/// The job ledger.
pub trait Ledger: Send {
    /// Where it is, for people (`status`).
    fn describe(&self) -> String;
    /// At start-up: jobs left `running` by a daemon that stopped under them go back to the queue
    /// without counting the interrupted attempt. `died_at` is where the crash marker says the
    /// daemon was (job and place, `daemon/crash_marker.rs`); a job the daemon died under
    /// `limit` times (at least 2) in a row at the same place is handed back to be quarantined
    /// instead.
    fn recover(&mut self, died_at: Option<(i64, &str)>, limit: u32) -> Result<Recovery>;
    /// The content hash recorded for a file with this size and mtime, to avoid re-hashing.
    fn cached_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64) -> Result<Option<String>>;
    /// Remembers a file's hash for its size and mtime.
    fn remember_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64, sha256: &str) -> Result<()>;
    /// Records a stable file: a new job, a known one, or a duplicate.
    fn discover(&mut self, job: &NewJob) -> Result<Discovery>;
    /// Claims the next runnable job of one of `pipelines` (priority, then the fewest
    /// interruptions, then age); marks it running and counts the attempt.
    fn claim(&mut self, pipelines: &[&str], now: f64) -> Result<Option<Job>>;
    /// Notes the stage a running job is in.
    fn set_stage(&mut self, id: i64, stage: &str) -> Result<()>;
    /// The result was written.
    fn done(&mut self, id: i64, output: &Path, now: f64) -> Result<()>;
    /// The attempt failed: wait until `retry_at`, or quarantined (`source` = where the file is now).
    fn failed(&mut self, id: i64, failure: &Failure, retry_at: Option<f64>, source: Option<&Path>, now: f64) -> Result<()>;
    /// Puts a running job back without counting the attempt (drain on shutdown).
    fn release(&mut self, id: i64) -> Result<()>;
    /// Queues quarantined/waiting jobs again with fresh attempts; `None` = every failed job.
    fn retry(&mut self, id: Option<i64>) -> Result<usize>;
    /// Job count per pipeline and state.
    fn counts(&mut self) -> Result<Vec<(String, String, u64)>>;
    /// When the oldest queued job of each pipeline with queued jobs was queued.
    fn oldest_queued(&mut self) -> Result<Vec<(String, f64)>>;
    /// Whether a pipeline has queued or retry-due jobs.
    fn has_work(&mut self, pipeline: &str, now: f64) -> Result<bool>;
    /// The most recent jobs.
    fn recent(&mut self, n: usize) -> Result<Vec<Job>>;
    /// One job.
    fn job(&mut self, id: i64) -> Result<Option<Job>>;
    /// The last schedule run of a pipeline.
    fn last_run(&mut self, pipeline: &str) -> Result<Option<Run>>;
    /// Starts a schedule run.
    fn start_run(&mut self, pipeline: &str, planned_at: f64, now: f64) -> Result<i64>;
    /// Ends a schedule run.
    fn end_run(&mut self, id: i64, now: f64, documents: u64, ok: bool, overran: bool) -> Result<()>;
    /// When this pipeline was first seen by this ledger (schedules do not catch up before it).
    fn first_seen(&mut self, pipeline: &str, now: f64) -> Result<f64>;
    /// End of the pipeline's last scheduled run that quarantined nothing.
    fn last_success(&mut self, pipeline: &str) -> Result<Option<f64>>;
    /// Proves the ledger takes a durable write now (readiness: a full disk or a read-only
    /// mount fails here before a result is lost).
    fn probe_write(&mut self, now: f64) -> Result<()>;
}
