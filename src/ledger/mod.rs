//! The job ledger: every document a pipeline has taken, its state, attempts, timings and errors,
//! the schedule runs, and the workers that run jobs. [`Ledger`] is the interface the daemon uses
//! (and the only hand-over between its threads). Two keep it:
//!
//! - [`SqliteLedger`], the default: one SQLite file in the state folder, WAL mode, for one daemon.
//! - [`PgLedger`] (`ledger: postgres://…`): one PostgreSQL database shared by a fleet of daemons
//!   on several machines (`docs/fleet.md`).
//!
//! Either way a daemon killed at any point restarts with nothing lost and nothing done twice.
//!
//! **Leases.** A claimed job is leased to the worker that claimed it ([`Ledger::join`]); the
//! worker's heartbeat renews its leases ([`Ledger::heartbeat`]), and a job whose lease ran out
//! (its machine died, its network was cut, it was paused) is queued again by whichever daemon
//! notices first ([`Ledger::reap`]), the attempt counted as an interruption. Every claim
//! increments the job's lease generation, the fencing token: the ledger takes a worker's
//! stage, result or failure only while its [`Lease`] is the job's current one, and the worker
//! asks ([`Ledger::holds`]) before it writes a result or quarantines, so a worker that wakes up
//! after its job was taken over writes nothing. With SQLite there is only one daemon; its leases
//! never run out and start-up recovery ([`Ledger::recover`]) does the rest.
//!
//! Files still being written (waiting for a stable size) have no content hash yet and are not in
//! the ledger: the watcher tracks them in memory and the start-up scan finds them again.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;

use crate::config::DaemonConfig;
use crate::failure::Failure;

mod postgres;
mod rows;
mod sqlite;
mod tls;

pub use self::postgres::{PgLedger, unreachable};
pub use self::sqlite::{SqliteLedger, refused_by_storage};

/// Opens the ledger the configuration names: PostgreSQL when `ledger` is set, otherwise
/// SQLite in the state folder.
pub fn open(d: &DaemonConfig) -> Result<Box<dyn Ledger>> {
    Ok(match &d.ledger {
        Some(url) => Box::new(PgLedger::connect(url, d.ledger_password_file.as_deref())?),
        None => Box::new(SqliteLedger::open(&d.state_dir)?),
    })
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
    /// Lease generation: incremented by every claim (the fencing token of [`Lease`]).
    pub lease: i64,
}

impl Job {
    /// The lease its claim gave.
    pub fn lease(&self) -> Lease {
        Lease { job: self.id, generation: self.lease }
    }
}

/// A worker's right to finish a job it claimed: the job and the lease generation of the claim.
/// The ledger refuses a stage, result or failure under a lease that is no longer the job's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The job.
    pub job: i64,
    /// Its lease generation when claimed.
    pub generation: i64,
}

/// A daemon as a worker of the ledger ([`Ledger::join`]).
#[derive(Clone, Debug)]
pub struct WorkerId {
    /// Unique among the live daemons of a fleet (default: the host name); a restarted daemon
    /// under the same name takes its predecessor's jobs back at once.
    pub name: String,
    /// Host it runs on.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Seconds without a heartbeat after which its jobs go to other workers.
    pub lease_s: f64,
}

/// A worker as the ledger sees it (`deltadoc status`).
#[derive(Clone, Debug, Serialize)]
pub struct WorkerState {
    /// Ledger id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Host it runs on.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// When it joined (Unix seconds).
    pub started_at: f64,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_s: f64,
    /// Its lease: no heartbeat for this long and its jobs go to others.
    pub lease_s: f64,
    /// The job it runs.
    pub job: Option<i64>,
    /// That job's document, relative to its inbox.
    pub document: Option<PathBuf>,
    /// The step it is in.
    pub stage: Option<String>,
    /// Documents it finished.
    pub documents: u64,
}

impl WorkerState {
    /// Its heartbeat is older than its lease: dead, cut off or paused.
    pub fn stale(&self) -> bool {
        self.heartbeat_age_s > self.lease_s
    }
}

/// A job whose lease ran out, queued again for another worker ([`Ledger::reap`]).
#[derive(Clone, Debug)]
pub struct Takeover {
    /// The job.
    pub job: i64,
    /// Its document, relative to its inbox.
    pub document: PathBuf,
    /// The worker that held it.
    pub worker: String,
    /// Seconds since that worker's last heartbeat.
    pub silent_s: f64,
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

/// One job with every column a ledger keeps, for [`Ledger::export`] and [`Ledger::import`].
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct JobRecord {
    /// Ledger id.
    pub id: i64,
    /// Idempotency key.
    pub key: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pipeline priority when queued.
    pub priority: i32,
    /// Inbox folder.
    pub inbox: String,
    /// Path relative to the inbox.
    pub rel_path: String,
    /// Where the file is now.
    pub source: String,
    /// sha256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// See [`state`].
    pub state: String,
    /// Stage running or failed.
    pub stage: Option<String>,
    /// Attempts counted.
    pub attempts: i32,
    /// Attempts interrupted by a stopped daemon.
    pub interruptions: i32,
    /// Where the daemon last crashed under it.
    pub died_at: Option<String>,
    /// Crashes in a row at that place.
    pub died_in_a_row: i32,
    /// Retry not before (Unix seconds).
    pub not_before: Option<f64>,
    /// When queued.
    pub queued_at: f64,
    /// When the last attempt started.
    pub started_at: Option<f64>,
    /// When it ended.
    pub finished_at: Option<f64>,
    /// Result file.
    pub output: Option<String>,
    /// The failure as JSON text.
    pub error: Option<String>,
    /// For skipped duplicates: the job with the result.
    pub duplicate_of: Option<i64>,
    /// Lease generation (fencing token).
    pub lease_gen: i64,
}

/// A remembered content hash, for [`Ledger::export`] and [`Ledger::import`].
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct HashRecord {
    /// Pipeline name.
    pub pipeline: String,
    /// Path of the file.
    pub path: String,
    /// Size in bytes when hashed.
    pub size: i64,
    /// Modification time, nanoseconds.
    pub mtime_ns: i64,
    /// sha256 of the bytes.
    pub sha256: String,
}

/// Everything a ledger holds but its workers (who run where is not moved: the daemons are
/// stopped while a ledger moves).
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Contents {
    /// Every job.
    pub jobs: Vec<JobRecord>,
    /// Every schedule run.
    pub runs: Vec<Run>,
    /// Pipeline name and when the ledger first saw it.
    pub pipelines: Vec<(String, f64)>,
    /// Remembered content hashes.
    pub hashes: Vec<HashRecord>,
}

impl Discovery {
    /// A job just recorded as `id`: queued, or a duplicate of `duplicate_of`.
    fn recorded(id: i64, duplicate_of: Option<i64>) -> Self {
        match duplicate_of {
            Some(of) => Discovery::Duplicate { of },
            None => Discovery::Queued(id),
        }
    }
}

/// A schedule run.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
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
    /// When the run is past its window (Unix seconds).
    pub deadline: f64,
    /// The overrun was reported (once per fleet).
    pub overrun_reported: bool,
}

/// The job ledger.
pub trait Ledger: Send {
    /// Where it is, for people (`status`, log lines); never shows a password.
    fn describe(&self) -> String;
    /// The folder it lives in (a write it refuses is that folder's), or `None` for a database
    /// server.
    fn folder(&self) -> Option<&Path>;
    /// Registers this daemon as a worker; the connection then claims under its name. Returns the
    /// worker's ledger id, for [`Ledger::heartbeat`] on another connection.
    fn join(&mut self, me: &WorkerId) -> Result<i64>;
    /// The worker stops cleanly: its row goes (its jobs were released before).
    fn leave(&mut self, worker: i64) -> Result<()>;
    /// Renews the worker's heartbeat and the leases of the jobs it runs. A worker the ledger
    /// forgot (silent for a day: cut off, paused) is registered again under its id, which no
    /// other worker can have been given: `Ok(true)` then.
    fn heartbeat(&mut self, worker: i64, me: &WorkerId) -> Result<bool>;
    /// Queues again the jobs whose lease ran out (their worker died, was cut off or paused),
    /// the attempt counted as an interruption, and forgets workers silent for a day.
    fn reap(&mut self) -> Result<Vec<Takeover>>;
    /// At start-up, after [`Ledger::join`]: jobs left `running` by this worker's predecessor (a
    /// daemon of the same name that stopped under them) go back to the queue without counting
    /// the interrupted attempt. `died_at` is where the crash marker says the daemon was (job
    /// and place, `daemon/crash_marker.rs`); a job the daemon died under `limit` times (at least
    /// 2) in a row at the same place is handed back, leased to this worker, to be quarantined.
    fn recover(&mut self, died_at: Option<(i64, &str)>, limit: u32) -> Result<Recovery>;
    /// The content hash recorded for a file with this size and mtime, to avoid re-hashing.
    fn cached_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64) -> Result<Option<String>>;
    /// Remembers a file's hash for its size and mtime.
    fn remember_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64, sha256: &str) -> Result<()>;
    /// Records a stable file: a new job, a known one, or a duplicate. Daemons that see the same
    /// file at once record it once.
    fn discover(&mut self, job: &NewJob) -> Result<Discovery>;
    /// Claims the next runnable job of one of `pipelines` (priority, then the fewest
    /// interruptions, then age) for the joined worker; marks it running, counts the attempt and
    /// gives it a new lease generation. Concurrent claims never take the same job.
    fn claim(&mut self, pipelines: &[&str], now: f64) -> Result<Option<Job>>;
    /// Whether `lease` is still the job's, renewing it: asked before a result or a quarantine
    /// entry is written.
    fn holds(&mut self, lease: Lease) -> Result<bool>;
    /// Notes the stage a running job is in.
    fn set_stage(&mut self, lease: Lease, stage: &str) -> Result<()>;
    /// The result was written. `false`: the lease was lost, nothing recorded.
    fn done(&mut self, lease: Lease, output: &Path, now: f64) -> Result<bool>;
    /// The attempt failed: wait until `retry_at`, or quarantined (`source` = where the file is
    /// now). `false`: the lease was lost, nothing recorded.
    fn failed(&mut self, lease: Lease, failure: &Failure, retry_at: Option<f64>, source: Option<&Path>, now: f64)
    -> Result<bool>;
    /// Puts a running job back without counting the attempt (drain on shutdown).
    fn release(&mut self, lease: Lease) -> Result<()>;
    /// Queues quarantined/waiting jobs again with fresh attempts; `None` = every failed job.
    fn retry(&mut self, id: Option<i64>) -> Result<usize>;
    /// Job count per pipeline and state.
    fn counts(&mut self) -> Result<Vec<(String, String, u64)>>;
    /// When the oldest queued job of each pipeline with queued jobs was queued.
    fn oldest_queued(&mut self) -> Result<Vec<(String, f64)>>;
    /// Whether a pipeline has queued, running or retry-due jobs.
    fn has_work(&mut self, pipeline: &str, now: f64) -> Result<bool>;
    /// The most recent jobs.
    fn recent(&mut self, n: usize) -> Result<Vec<Job>>;
    /// One job.
    fn job(&mut self, id: i64) -> Result<Option<Job>>;
    /// The workers, live and stale.
    fn workers(&mut self) -> Result<Vec<WorkerState>>;
    /// The last schedule run of a pipeline.
    fn last_run(&mut self, pipeline: &str) -> Result<Option<Run>>;
    /// Starts the run of `pipeline` for the fire at `planned_at`, unless one exists already
    /// (another daemon started it): `None` then.
    fn start_run(&mut self, pipeline: &str, planned_at: f64, deadline: f64, now: f64) -> Result<Option<i64>>;
    /// Ends run `id` if it has not ended yet, counting the documents that finished in it:
    /// `None` when another daemon ended it first.
    fn end_run(&mut self, id: i64, now: f64, overran: bool) -> Result<Option<Run>>;
    /// Marks run `id` as reported overrun: `true` for the first daemon that asks.
    fn report_overrun(&mut self, id: i64) -> Result<bool>;
    /// When this pipeline was first seen by this ledger (schedules do not catch up before it).
    fn first_seen(&mut self, pipeline: &str, now: f64) -> Result<f64>;
    /// End of the pipeline's last scheduled run that quarantined nothing.
    fn last_success(&mut self, pipeline: &str) -> Result<Option<f64>>;
    /// Proves the ledger takes a durable write now (readiness: a full disk, a read-only mount or
    /// an unreachable database fails here before a result is lost).
    fn probe_write(&mut self, now: f64) -> Result<()>;
    /// Everything it holds, to move it to another ledger (`deltadoc ledger copy`). Jobs that were
    /// running come out queued, their attempt counted as an interruption.
    fn export(&mut self) -> Result<Contents>;
    /// Fills an empty ledger with `contents`, ids kept (results name their job). Refused when
    /// it holds jobs already.
    fn import(&mut self, contents: &Contents) -> Result<()>;
}

impl JobRecord {
    /// As exported: a running job is queued again, its attempt an interruption.
    pub fn exported(mut self) -> Self {
        if self.state == state::RUNNING {
            self.state = state::QUEUED.into();
            self.stage = None;
            self.attempts = (self.attempts - 1).max(0);
            self.interruptions += 1;
        }
        self
    }
}
