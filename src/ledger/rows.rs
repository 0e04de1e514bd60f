//! The ledger's rows as values, read alike from either database: each driver's row type
//! implements [`Row`] (`sqlite.rs`, `postgres.rs`), and both ledgers select the columns listed
//! here, in this order.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{HashRecord, Job, JobRecord, Run, WorkerState};

/// A result row, read by column index; `None` is SQL NULL.
pub(super) trait Row {
    /// An integer column (any width).
    fn int(&self, i: usize) -> Result<Option<i64>>;
    /// A floating-point column.
    fn real(&self, i: usize) -> Result<Option<f64>>;
    /// A text column.
    fn text(&self, i: usize) -> Result<Option<String>>;
    /// A boolean column (SQLite keeps 0 and 1).
    fn flag(&self, i: usize) -> Result<Option<bool>>;
}

/// A column that is never NULL.
fn need<T>(v: Option<T>, i: usize) -> Result<T> {
    v.with_context(|| format!("ledger column {i} is unexpectedly NULL"))
}

/// Reads column `$i` of `$r` as the field's type.
macro_rules! col {
    ($r:expr, $i:expr, int) => {
        need($r.int($i)?, $i)?
    };
    ($r:expr, $i:expr, real) => {
        need($r.real($i)?, $i)?
    };
    ($r:expr, $i:expr, text) => {
        need($r.text($i)?, $i)?
    };
    ($r:expr, $i:expr, flag) => {
        need($r.flag($i)?, $i)?
    };
}

/// The columns [`job`] reads.
pub(super) const JOB_COLUMNS: &str = "id, key, pipeline, inbox, rel_path, source, sha256, size, state, stage, attempts, \
     queued_at, started_at, finished_at, output, error, duplicate_of, interruptions, lease_gen";

/// A job.
pub(super) fn job(r: &dyn Row) -> Result<Job> {
    Ok(Job {
        id: col!(r, 0, int),
        key: col!(r, 1, text),
        pipeline: col!(r, 2, text),
        inbox: PathBuf::from(col!(r, 3, text)),
        rel_path: PathBuf::from(col!(r, 4, text)),
        source: PathBuf::from(col!(r, 5, text)),
        sha256: col!(r, 6, text),
        size: col!(r, 7, int) as u64,
        state: col!(r, 8, text),
        stage: r.text(9)?,
        attempts: col!(r, 10, int) as u32,
        queued_at: col!(r, 11, real),
        started_at: r.real(12)?,
        finished_at: r.real(13)?,
        output: r.text(14)?.map(PathBuf::from),
        error: r.text(15)?.and_then(|e| serde_json::from_str(&e).ok()),
        duplicate_of: r.int(16)?,
        interruptions: col!(r, 17, int) as u32,
        lease: col!(r, 18, int),
    })
}

/// The columns of a [`JobRecord`], in its fields' order.
pub(super) const JOB_RECORD_COLUMNS: [&str; 23] = [
    "id",
    "key",
    "pipeline",
    "priority",
    "inbox",
    "rel_path",
    "source",
    "sha256",
    "size",
    "state",
    "stage",
    "attempts",
    "interruptions",
    "died_at",
    "died_in_a_row",
    "not_before",
    "queued_at",
    "started_at",
    "finished_at",
    "output",
    "error",
    "duplicate_of",
    "lease_gen",
];

/// `INSERT INTO jobs(…) VALUES (…)` of every [`JOB_RECORD_COLUMNS`], with placeholders written
/// by `placeholder` (`?1` for SQLite, `$1` for PostgreSQL).
pub(super) fn insert_job_sql(placeholder: impl Fn(usize) -> String) -> String {
    let values: Vec<String> = (1..=JOB_RECORD_COLUMNS.len()).map(placeholder).collect();
    format!("INSERT INTO jobs({}) VALUES ({})", JOB_RECORD_COLUMNS.join(", "), values.join(", "))
}

/// A job with every column, as exported.
pub(super) fn job_record(r: &dyn Row) -> Result<JobRecord> {
    Ok(JobRecord {
        id: col!(r, 0, int),
        key: col!(r, 1, text),
        pipeline: col!(r, 2, text),
        priority: col!(r, 3, int) as i32,
        inbox: col!(r, 4, text),
        rel_path: col!(r, 5, text),
        source: col!(r, 6, text),
        sha256: col!(r, 7, text),
        size: col!(r, 8, int),
        state: col!(r, 9, text),
        stage: r.text(10)?,
        attempts: col!(r, 11, int) as i32,
        interruptions: col!(r, 12, int) as i32,
        died_at: r.text(13)?,
        died_in_a_row: col!(r, 14, int) as i32,
        not_before: r.real(15)?,
        queued_at: col!(r, 16, real),
        started_at: r.real(17)?,
        finished_at: r.real(18)?,
        output: r.text(19)?,
        error: r.text(20)?,
        duplicate_of: r.int(21)?,
        lease_gen: col!(r, 22, int),
    }
    .exported())
}

/// The columns [`run`] reads (SQLite's runs from before its schema 4 have no deadline: it reads
/// their fire time instead, in this place).
pub(super) const RUN_COLUMNS: &str =
    "id, pipeline, planned_at, started_at, ended_at, documents, ok, overran, deadline, overrun_reported";

/// A schedule run.
pub(super) fn run(r: &dyn Row) -> Result<Run> {
    Ok(Run {
        id: col!(r, 0, int),
        pipeline: col!(r, 1, text),
        planned_at: col!(r, 2, real),
        started_at: col!(r, 3, real),
        ended_at: r.real(4)?,
        documents: col!(r, 5, int) as u64,
        ok: r.flag(6)?,
        overran: col!(r, 7, flag),
        deadline: col!(r, 8, real),
        overrun_reported: col!(r, 9, flag),
    })
}

/// The workers with the job each runs; `age` is the expression of seconds since a heartbeat.
pub(super) fn workers_sql(age: &str) -> String {
    format!(
        "SELECT w.id, w.name, w.host, w.pid, w.started_at, {age}, w.lease_s, j.id, j.rel_path, j.stage, w.documents
         FROM workers w LEFT JOIN jobs j ON j.lease_owner = w.id AND j.state = 'running' ORDER BY w.name, w.id"
    )
}

/// A worker, as [`workers_sql`] selects it.
pub(super) fn worker(r: &dyn Row) -> Result<WorkerState> {
    Ok(WorkerState {
        id: col!(r, 0, int),
        name: col!(r, 1, text),
        host: col!(r, 2, text),
        pid: col!(r, 3, int) as u32,
        started_at: col!(r, 4, real),
        heartbeat_age_s: col!(r, 5, real),
        lease_s: col!(r, 6, real),
        job: r.int(7)?,
        document: r.text(8)?.map(PathBuf::from),
        stage: r.text(9)?,
        documents: col!(r, 10, int) as u64,
    })
}

/// The columns [`hash`] reads.
pub(super) const HASH_COLUMNS: &str = "pipeline, path, size, mtime_ns, sha256";

/// A remembered content hash.
pub(super) fn hash(r: &dyn Row) -> Result<HashRecord> {
    Ok(HashRecord {
        pipeline: col!(r, 0, text),
        path: col!(r, 1, text),
        size: col!(r, 2, int),
        mtime_ns: col!(r, 3, int),
        sha256: col!(r, 4, text),
    })
}
