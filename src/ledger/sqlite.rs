//! The ledger in one SQLite file (`<state_dir>/ledger.sqlite3`), WAL mode with synchronous
//! FULL; schema versions migrate in place at open. One daemon uses it (its threads each on their
//! own connection), so leases never run out here: start-up recovery queues its running jobs again.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{self, HASH_COLUMNS, JOB_COLUMNS, JOB_RECORD_COLUMNS, insert_job_sql};
use super::{Contents, Discovery, Job, Lease, Ledger, NewJob, Recovery, Run, Takeover, WorkerId, WorkerState, now_s, state};
use crate::failure::Failure;

/// Schema version stored in the ledger; migrations run on open.
const SCHEMA_VERSION: i64 = 4;

/// Whether `cause` is SQLite reporting that the storage refuses a write (disk full, read-only,
/// permissions, an I/O error), not a fault of the ledger's own.
pub fn refused_by_storage(cause: &(dyn std::error::Error + 'static)) -> bool {
    use rusqlite::ErrorCode::{CannotOpen, DiskFull, PermissionDenied, ReadOnly, SystemIoFailure};
    matches!(
        cause.downcast_ref::<rusqlite::Error>(),
        Some(rusqlite::Error::SqliteFailure(e, _)) if matches!(e.code, DiskFull | ReadOnly | SystemIoFailure | CannotOpen | PermissionDenied)
    )
}

/// The SQLite ledger.
pub struct SqliteLedger {
    conn: Connection,
    path: PathBuf,
    /// The worker this connection claims for ([`Ledger::join`]).
    worker: Option<i64>,
}

impl SqliteLedger {
    /// Opens (creating if needed) `dir/ledger.sqlite3` in WAL mode.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the state folder", dir.display()))?;
        let path = dir.join("ledger.sqlite3");
        let conn = Connection::open(&path).with_context(|| format!("{}: cannot open the ledger", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // Switching a new file to WAL takes an exclusive lock without waiting for a busy one:
        // connections that create the ledger at once take turns.
        let mut tries = 0;
        while let Err(e) = conn.pragma_update(None, "journal_mode", "WAL") {
            match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy) if tries < 200 => tries += 1,
                _ => return Err(anyhow::Error::new(e).context(format!("{}: cannot open the ledger", path.display()))),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // FULL: a result reported done must still be done after a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        let mut l = Self { conn, path, worker: None };
        l.migrate()?;
        Ok(l)
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A transaction that reads and then writes. It takes the write lock up front: a deferred
    /// one that has to upgrade fails at once with "database is locked" when another connection
    /// (ingest, worker, readiness probe) wrote in between, without waiting for busy_timeout.
    fn write_tx(&mut self) -> Result<rusqlite::Transaction<'_>> {
        Ok(self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
    }

    /// Brings the schema up to date in one write transaction: connections that open a new
    /// ledger at once migrate it once. An up-to-date ledger is only read (`status` on a
    /// read-only copy works).
    fn migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        if self.conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = self.write_tx()?;
        let v: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v > SCHEMA_VERSION {
            bail!(
                "{}: ledger schema version {v} is newer than this deltadoc understands ({SCHEMA_VERSION}); upgrade deltadoc",
                path.display()
            );
        }
        if v < 1 {
            tx.execute_batch(
                "CREATE TABLE jobs(
                   id INTEGER PRIMARY KEY,
                   key TEXT NOT NULL, pipeline TEXT NOT NULL, priority INTEGER NOT NULL,
                   inbox TEXT NOT NULL, rel_path TEXT NOT NULL, source TEXT NOT NULL,
                   sha256 TEXT NOT NULL, size INTEGER NOT NULL,
                   state TEXT NOT NULL, stage TEXT, attempts INTEGER NOT NULL DEFAULT 0,
                   not_before REAL, queued_at REAL NOT NULL, started_at REAL, finished_at REAL,
                   output TEXT, error TEXT, duplicate_of INTEGER);
                 CREATE UNIQUE INDEX jobs_identity ON jobs(key, inbox, rel_path);
                 CREATE INDEX jobs_runnable ON jobs(state, pipeline, priority, queued_at);
                 CREATE TABLE hashes(pipeline TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
                   mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY(pipeline, path));
                 CREATE TABLE runs(id INTEGER PRIMARY KEY, pipeline TEXT NOT NULL, planned_at REAL NOT NULL,
                   started_at REAL NOT NULL, ended_at REAL, documents INTEGER NOT NULL DEFAULT 0,
                   ok INTEGER, overran INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE pipelines(name TEXT PRIMARY KEY, first_seen REAL NOT NULL);
                 PRAGMA user_version = 1;",
            )?;
        }
        if v < 2 {
            // Version 2: the readiness probe's row.
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS health(id INTEGER PRIMARY KEY CHECK (id = 1), probed_at REAL NOT NULL);
                 PRAGMA user_version = 2;",
            )?;
        }
        if v < 3 {
            // Version 3: interruptions are not failed attempts; where the daemon last died under
            // a job, and how many times in a row at that place.
            tx.execute_batch(
                "ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE jobs ADD COLUMN died_at TEXT;
                 ALTER TABLE jobs ADD COLUMN died_in_a_row INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 3;",
            )?;
        }
        if v < 4 {
            // Version 4: leases and workers (as in the PostgreSQL ledger, `ledger/postgres.rs`),
            // and schedule runs one per fire, ended and reported once, with their deadline.
            tx.execute_batch(
                "ALTER TABLE jobs ADD COLUMN lease_gen INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE jobs ADD COLUMN lease_owner INTEGER;
                 CREATE TABLE workers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, host TEXT NOT NULL,
                   pid INTEGER NOT NULL, started_at REAL NOT NULL, heartbeat_at REAL NOT NULL, lease_s REAL NOT NULL,
                   documents INTEGER NOT NULL DEFAULT 0);
                 ALTER TABLE runs ADD COLUMN deadline REAL;
                 ALTER TABLE runs ADD COLUMN overrun_reported INTEGER NOT NULL DEFAULT 0;
                 CREATE UNIQUE INDEX runs_fire ON runs(pipeline, planned_at);
                 PRAGMA user_version = 4;",
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn jobs_where(&self, clause: &str, args: impl rusqlite::Params) -> Result<Vec<Job>> {
        self.select(&format!("SELECT {JOB_COLUMNS} FROM jobs {clause}"), args, rows::job)
    }

    /// Runs `sql` and reads each row with `read`.
    fn select<T>(&self, sql: &str, args: impl rusqlite::Params, read: impl Fn(&dyn rows::Row) -> Result<T>) -> Result<Vec<T>> {
        let mut st = self.conn.prepare_cached(sql)?;
        let mut q = st.query(args)?;
        let mut out = Vec::new();
        while let Some(r) = q.next()? {
            out.push(read(r)?);
        }
        Ok(out)
    }
}

impl rows::Row for rusqlite::Row<'_> {
    fn int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.get(i)?)
    }

    fn real(&self, i: usize) -> Result<Option<f64>> {
        Ok(self.get(i)?)
    }

    fn text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.get(i)?)
    }

    fn flag(&self, i: usize) -> Result<Option<bool>> {
        Ok(self.get(i)?)
    }
}

/// [`rows::RUN_COLUMNS`] as SQLite selects them: runs from before schema 4 have no deadline,
/// their fire time stands in.
fn run_columns() -> String {
    rows::RUN_COLUMNS.replace(", deadline,", ", COALESCE(deadline, planned_at),")
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Ledger for SqliteLedger {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn folder(&self) -> Option<&Path> {
        self.path.parent()
    }

    fn join(&mut self, me: &WorkerId) -> Result<i64> {
        let now = now_s();
        self.conn.execute(
            "INSERT INTO workers(name, host, pid, started_at, heartbeat_at, lease_s) VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
            params![me.name, me.host, me.pid, now, me.lease_s],
        )?;
        let id = self.conn.last_insert_rowid();
        self.worker = Some(id);
        Ok(id)
    }

    fn leave(&mut self, worker: i64) -> Result<()> {
        self.conn.execute("DELETE FROM workers WHERE id = ?1", [worker])?;
        Ok(())
    }

    fn heartbeat(&mut self, worker: i64, me: &WorkerId) -> Result<bool> {
        let now = now_s();
        if self.conn.execute("UPDATE workers SET heartbeat_at = ?2 WHERE id = ?1", params![worker, now])? == 1 {
            return Ok(false);
        }
        self.conn.execute(
            "INSERT INTO workers(id, name, host, pid, started_at, heartbeat_at, lease_s) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
            params![worker, me.name, me.host, me.pid, now, me.lease_s],
        )?;
        Ok(true)
    }

    fn reap(&mut self) -> Result<Vec<Takeover>> {
        // One daemon: its own jobs are never taken from it.
        Ok(Vec::new())
    }

    fn recover(&mut self, died_at: Option<(i64, &str)>, limit: u32) -> Result<Recovery> {
        let me = self.worker;
        let tx = self.write_tx()?;
        let mut crashed = None;
        if let Some((id, place)) = died_at {
            let n = tx.execute(
                "UPDATE jobs SET died_in_a_row = CASE WHEN died_at = ?2 THEN died_in_a_row + 1 ELSE 1 END, died_at = ?2
                 WHERE id = ?1 AND state = ?3",
                params![id, place, state::RUNNING],
            )?;
            let in_a_row: u32 =
                if n == 1 { tx.query_row("SELECT died_in_a_row FROM jobs WHERE id = ?1", [id], |r| r.get(0))? } else { 0 };
            // One death proves nothing: the place must repeat.
            if in_a_row >= limit.max(2) {
                tx.execute("UPDATE jobs SET lease_gen = lease_gen + 1, lease_owner = ?2 WHERE id = ?1", params![id, me])?;
                crashed = Some((id, in_a_row));
            }
        }
        let requeued = tx.execute(
            "UPDATE jobs SET state = ?1, stage = NULL, attempts = MAX(attempts - 1, 0), interruptions = interruptions + 1,
               lease_owner = NULL
             WHERE state = ?2 AND id IS NOT ?3",
            params![state::QUEUED, state::RUNNING, crashed.as_ref().map(|c| c.0)],
        )?;
        // The daemon that stopped is gone for good.
        tx.execute("DELETE FROM workers WHERE id IS NOT ?1", [me])?;
        tx.commit()?;
        let crashed = match crashed {
            Some((id, in_a_row)) => self.job(id)?.map(|j| (j, in_a_row)),
            None => None,
        };
        Ok(Recovery { requeued, crashed })
    }

    fn cached_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT sha256 FROM hashes WHERE pipeline = ?1 AND path = ?2 AND size = ?3 AND mtime_ns = ?4",
                params![pipeline, text(path), size as i64, mtime_ns],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn remember_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64, sha256: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO hashes(pipeline, path, size, mtime_ns, sha256) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![pipeline, text(path), size as i64, mtime_ns, sha256],
        )?;
        Ok(())
    }

    fn discover(&mut self, j: &NewJob) -> Result<Discovery> {
        let tx = self.write_tx()?;
        let same: Option<i64> = tx
            .query_row(
                "SELECT id FROM jobs WHERE key = ?1 AND inbox = ?2 AND rel_path = ?3",
                params![j.key, text(j.inbox), text(j.rel_path)],
                |r| r.get(0),
            )
            .optional()?;
        if same.is_some() {
            return Ok(Discovery::Known);
        }
        let earlier: Option<i64> = tx
            .query_row(
                "SELECT id FROM jobs WHERE key = ?1 AND state != ?2 ORDER BY id LIMIT 1",
                params![j.key, state::SKIPPED],
                |r| r.get(0),
            )
            .optional()?;
        let now = now_s();
        let source = j.inbox.join(j.rel_path);
        let (state, dup, finished) = match earlier {
            Some(of) if !j.reprocess_duplicates => (state::SKIPPED, Some(of), Some(now)),
            _ => (state::QUEUED, None, None),
        };
        tx.execute(
            "INSERT INTO jobs(key, pipeline, priority, inbox, rel_path, source, sha256, size, state, queued_at, finished_at, duplicate_of)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                j.key,
                j.pipeline,
                j.priority,
                text(j.inbox),
                text(j.rel_path),
                text(&source),
                j.sha256,
                j.size as i64,
                state,
                now,
                finished,
                dup
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Discovery::recorded(id, dup))
    }

    fn claim(&mut self, pipelines: &[&str], now: f64) -> Result<Option<Job>> {
        if pipelines.is_empty() {
            return Ok(None);
        }
        let me = self.worker;
        let tx = self.write_tx()?;
        let id: Option<i64> = tx
            .query_row(
                "SELECT id FROM jobs WHERE pipeline IN (SELECT value FROM json_each(?2)) AND
                   (state = ?3 OR (state = ?4 AND not_before <= ?1))
                 ORDER BY priority DESC, interruptions, queued_at, id LIMIT 1",
                params![now, serde_json::to_string(pipelines)?, state::QUEUED, state::RETRY_WAIT],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        tx.execute(
            "UPDATE jobs SET state = ?3, attempts = attempts + 1, started_at = ?2, stage = NULL,
               lease_gen = lease_gen + 1, lease_owner = ?4 WHERE id = ?1",
            params![id, now, state::RUNNING, me],
        )?;
        tx.commit()?;
        self.job(id)
    }

    fn holds(&mut self, l: Lease) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM jobs WHERE id = ?1 AND lease_gen = ?2 AND state = ?3)",
            params![l.job, l.generation, state::RUNNING],
            |r| r.get(0),
        )?)
    }

    fn set_stage(&mut self, l: Lease, stage: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET stage = ?3 WHERE id = ?1 AND lease_gen = ?2 AND state = ?4",
            params![l.job, l.generation, stage, state::RUNNING],
        )?;
        Ok(())
    }

    fn done(&mut self, l: Lease, output: &Path, now: f64) -> Result<bool> {
        let tx = self.write_tx()?;
        let n = tx.execute(
            "UPDATE jobs SET state = ?5, stage = NULL, finished_at = ?3, output = ?4, error = NULL
             WHERE id = ?1 AND lease_gen = ?2 AND state = ?6",
            params![l.job, l.generation, now, text(output), state::DONE, state::RUNNING],
        )?;
        tx.execute(
            "UPDATE workers SET documents = documents + ?2 WHERE id = (SELECT lease_owner FROM jobs WHERE id = ?1)",
            params![l.job, n as i64],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }

    fn failed(&mut self, l: Lease, f: &Failure, retry_at: Option<f64>, source: Option<&Path>, now: f64) -> Result<bool> {
        let err = serde_json::to_string(f)?;
        let n = match retry_at {
            Some(t) => self.conn.execute(
                "UPDATE jobs SET state = ?6, not_before = ?3, stage = ?4, error = ?5
                 WHERE id = ?1 AND lease_gen = ?2 AND state = ?7",
                params![l.job, l.generation, t, f.stage, err, state::RETRY_WAIT, state::RUNNING],
            )?,
            None => self.conn.execute(
                "UPDATE jobs SET state = ?7, stage = ?3, error = ?4, finished_at = ?5, source = COALESCE(?6, source)
                 WHERE id = ?1 AND lease_gen = ?2 AND state = ?8",
                params![l.job, l.generation, f.stage, err, now, source.map(text), state::QUARANTINED, state::RUNNING],
            )?,
        };
        Ok(n == 1)
    }

    fn release(&mut self, l: Lease) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state = ?3, stage = NULL, attempts = MAX(attempts - 1, 0), lease_owner = NULL
             WHERE id = ?1 AND lease_gen = ?2 AND state = ?4",
            params![l.job, l.generation, state::QUEUED, state::RUNNING],
        )?;
        Ok(())
    }

    fn retry(&mut self, id: Option<i64>) -> Result<usize> {
        let n = match id {
            Some(id) => self.conn.execute(
                "UPDATE jobs SET state = ?2, attempts = 0, not_before = NULL, finished_at = NULL
                 WHERE id = ?1 AND state IN (?3, ?4, ?5)",
                params![id, state::QUEUED, state::QUARANTINED, state::RETRY_WAIT, state::DONE],
            )?,
            None => self.conn.execute(
                "UPDATE jobs SET state = ?1, attempts = 0, not_before = NULL, finished_at = NULL
                 WHERE state IN (?2, ?3)",
                params![state::QUEUED, state::QUARANTINED, state::RETRY_WAIT],
            )?,
        };
        Ok(n)
    }

    fn counts(&mut self) -> Result<Vec<(String, String, u64)>> {
        let mut st = self.conn.prepare_cached("SELECT pipeline, state, COUNT(*) FROM jobs GROUP BY pipeline, state")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn oldest_queued(&mut self) -> Result<Vec<(String, f64)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT pipeline, MIN(queued_at) FROM jobs WHERE state IN (?1, ?2) GROUP BY pipeline ORDER BY pipeline",
        )?;
        let rows = st.query_map(params![state::QUEUED, state::RETRY_WAIT], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn has_work(&mut self, pipeline: &str, now: f64) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM jobs WHERE pipeline = ?1 AND
               (state IN (?3, ?4) OR (state = ?5 AND not_before <= ?2)))",
            params![pipeline, now, state::QUEUED, state::RUNNING, state::RETRY_WAIT],
            |r| r.get(0),
        )?)
    }

    fn recent(&mut self, n: usize) -> Result<Vec<Job>> {
        self.jobs_where("ORDER BY COALESCE(finished_at, started_at, queued_at) DESC, id DESC LIMIT ?1", params![n as i64])
    }

    fn job(&mut self, id: i64) -> Result<Option<Job>> {
        Ok(self.jobs_where("WHERE id = ?1", params![id])?.pop())
    }

    fn workers(&mut self) -> Result<Vec<WorkerState>> {
        self.select(&rows::workers_sql("?1 - w.heartbeat_at"), [now_s()], rows::worker)
    }

    fn last_run(&mut self, pipeline: &str) -> Result<Option<Run>> {
        let sql = format!("SELECT {} FROM runs WHERE pipeline = ?1 ORDER BY planned_at DESC, id DESC LIMIT 1", run_columns());
        Ok(self.select(&sql, params![pipeline], rows::run)?.pop())
    }

    fn start_run(&mut self, pipeline: &str, planned_at: f64, deadline: f64, now: f64) -> Result<Option<i64>> {
        let n = self.conn.execute(
            "INSERT INTO runs(pipeline, planned_at, started_at, deadline) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(pipeline, planned_at) DO NOTHING",
            params![pipeline, planned_at, now, deadline],
        )?;
        Ok((n == 1).then(|| self.conn.last_insert_rowid()))
    }

    fn end_run(&mut self, id: i64, now: f64, overran: bool) -> Result<Option<Run>> {
        // The documents that ended in the run: only during runs do a scheduled pipeline's jobs
        // run, so those are the ones that finished since it started.
        let n = self.conn.execute(
            "UPDATE runs SET ended_at = ?2, overran = ?3,
               documents = (SELECT COUNT(*) FROM jobs j WHERE j.pipeline = runs.pipeline AND j.state IN (?4, ?5)
                              AND j.finished_at >= runs.started_at),
               ok = NOT EXISTS(SELECT 1 FROM jobs j WHERE j.pipeline = runs.pipeline AND j.state = ?5
                              AND j.finished_at >= runs.started_at)
             WHERE id = ?1 AND ended_at IS NULL",
            params![id, now, overran, state::DONE, state::QUARANTINED],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let sql = format!("SELECT {} FROM runs WHERE id = ?1", run_columns());
        Ok(self.select(&sql, [id], rows::run)?.pop())
    }

    fn report_overrun(&mut self, id: i64) -> Result<bool> {
        Ok(self.conn.execute("UPDATE runs SET overrun_reported = 1 WHERE id = ?1 AND overrun_reported = 0", [id])? == 1)
    }

    fn last_success(&mut self, pipeline: &str) -> Result<Option<f64>> {
        Ok(self
            .conn
            .query_row("SELECT MAX(ended_at) FROM runs WHERE pipeline = ?1 AND ok = 1", params![pipeline], |r| r.get(0))?)
    }

    fn probe_write(&mut self, now: f64) -> Result<()> {
        self.conn
            .execute("INSERT INTO health(id, probed_at) VALUES (1, ?1) ON CONFLICT(id) DO UPDATE SET probed_at = ?1", [now])
            .with_context(|| format!("{}: the ledger does not take writes", self.path.display()))?;
        Ok(())
    }

    fn first_seen(&mut self, pipeline: &str, now: f64) -> Result<f64> {
        self.conn.execute("INSERT OR IGNORE INTO pipelines(name, first_seen) VALUES (?1, ?2)", params![pipeline, now])?;
        Ok(self.conn.query_row("SELECT first_seen FROM pipelines WHERE name = ?1", params![pipeline], |r| r.get(0))?)
    }

    fn export(&mut self) -> Result<Contents> {
        // One read transaction: a consistent picture of the four tables.
        self.conn.execute_batch("BEGIN")?;
        let contents = (|| {
            Ok(Contents {
                jobs: self.select(
                    &format!("SELECT {} FROM jobs ORDER BY id", JOB_RECORD_COLUMNS.join(", ")),
                    [],
                    rows::job_record,
                )?,
                runs: self.select(&format!("SELECT {} FROM runs ORDER BY id", run_columns()), [], rows::run)?,
                pipelines: self.select("SELECT name, first_seen FROM pipelines ORDER BY name", [], |r| {
                    Ok((r.text(0)?.unwrap_or_default(), r.real(1)?.unwrap_or_default()))
                })?,
                hashes: self.select(&format!("SELECT {HASH_COLUMNS} FROM hashes ORDER BY pipeline, path"), [], rows::hash)?,
            })
        })();
        self.conn.execute_batch("COMMIT")?;
        contents
    }

    fn import(&mut self, c: &Contents) -> Result<()> {
        let path = self.path.clone();
        let tx = self.write_tx()?;
        let held: i64 = tx.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))?;
        if held > 0 {
            bail!("{}: the ledger holds {held} jobs already; import into an empty ledger", path.display());
        }
        {
            let mut job = tx.prepare(&insert_job_sql(|i| format!("?{i}")))?;
            for j in &c.jobs {
                job.execute(params![
                    j.id,
                    j.key,
                    j.pipeline,
                    j.priority,
                    j.inbox,
                    j.rel_path,
                    j.source,
                    j.sha256,
                    j.size,
                    j.state,
                    j.stage,
                    j.attempts,
                    j.interruptions,
                    j.died_at,
                    j.died_in_a_row,
                    j.not_before,
                    j.queued_at,
                    j.started_at,
                    j.finished_at,
                    j.output,
                    j.error,
                    j.duplicate_of,
                    j.lease_gen
                ])?;
            }
            let mut run =
                tx.prepare(&format!("INSERT INTO runs({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)", rows::RUN_COLUMNS))?;
            for r in &c.runs {
                run.execute(params![
                    r.id,
                    r.pipeline,
                    r.planned_at,
                    r.started_at,
                    r.ended_at,
                    r.documents as i64,
                    r.ok,
                    r.overran,
                    r.deadline,
                    r.overrun_reported
                ])?;
            }
            for (name, first) in &c.pipelines {
                tx.execute("INSERT OR REPLACE INTO pipelines(name, first_seen) VALUES (?1, ?2)", params![name, first])?;
            }
            let mut hash =
                tx.prepare("INSERT OR REPLACE INTO hashes(pipeline, path, size, mtime_ns, sha256) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for h in &c.hashes {
                hash.execute(params![h.pipeline, h.path, h.size, h.mtime_ns, h.sha256])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The contract both ledgers keep (leases, fencing, concurrent claims and discoveries) is
    // tested in tests/ledger.rs; these are SQLite's own: recovery at start and migrations.

    fn new_job<'a>(key: &'a str, rel: &'a Path, inbox: &'a Path) -> NewJob<'a> {
        NewJob { key, pipeline: "p", priority: 0, inbox, rel_path: rel, sha256: "s", size: 1, reprocess_duplicates: false }
    }

    fn join(l: &mut SqliteLedger) {
        l.join(&WorkerId { name: "d".into(), host: "h".into(), pid: 1, lease_s: 30.0 }).unwrap();
    }

    #[test]
    fn a_restart_queues_running_jobs_again_behind_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Path::new("/in");
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        join(&mut l);
        let Discovery::Queued(id) = l.discover(&new_job("k1", Path::new("a.pdf"), inbox)).unwrap() else { panic!() };
        let j = l.claim(&["p"], 1.0).unwrap().unwrap();
        assert_eq!((j.id, j.attempts), (id, 1));
        // A crash leaves it running; reopening the ledger and recovering queues it again, the
        // interrupted attempt not counted, and forgets the dead daemon.
        drop(l);
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        join(&mut l);
        assert_eq!(l.recover(None, 3).unwrap().requeued, 1);
        assert_eq!(l.workers().unwrap().len(), 1);
        let Discovery::Queued(b) = l.discover(&new_job("k2", Path::new("b.pdf"), inbox)).unwrap() else { panic!() };
        // An interrupted job waits behind the others of its priority, so that one the daemon
        // keeps dying under does not hold up the queue.
        let next = l.claim(&["p"], 2.0).unwrap().unwrap();
        assert_eq!(next.id, b);
        let j = l.claim(&["p"], 2.0).unwrap().unwrap();
        assert_eq!((j.id, j.attempts, j.interruptions, j.lease), (id, 1, 1, 2));
    }

    #[test]
    fn a_job_the_daemon_dies_under_at_the_same_place_in_a_row_is_handed_back_to_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        join(&mut l);
        let inbox = Path::new("/in");
        let Discovery::Queued(id) = l.discover(&new_job("k1", Path::new("a.pdf"), inbox)).unwrap() else { panic!() };
        let mut deaths = |place: &str| {
            l.claim(&["p"], 1.0).unwrap().unwrap();
            l.recover(Some((id, place)), 3).unwrap()
        };
        // Kills from outside land anywhere: a new place starts the count again.
        for place in ["summary after 5 model steps", "summary after 5 model steps", "extract after 0 model steps"] {
            let r = deaths(place);
            assert_eq!((r.requeued, r.crashed.is_none()), (1, true), "{place}");
        }
        assert_eq!(deaths("summary after 9 model steps").requeued, 1);
        assert_eq!(deaths("summary after 9 model steps").requeued, 1);
        let r = deaths("summary after 9 model steps");
        let (job, in_a_row) = r.crashed.expect("the third death in a row at one place");
        assert_eq!((r.requeued, job.id, job.state.as_str(), in_a_row), (0, id, "running", 3));
        assert_eq!((job.attempts, job.interruptions), (1, 5), "interrupted attempts are not counted");
        assert!(l.holds(job.lease()).unwrap(), "handed back under a lease of its own");
    }

    #[test]
    fn a_version_1_ledger_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        let inbox = Path::new("/in");
        let Discovery::Queued(id) = l.discover(&new_job("k1", Path::new("a.pdf"), inbox)).unwrap() else { panic!() };
        l.start_run("nightly", 10.0, 20.0, 11.0).unwrap();
        // Turn it back into what deltadoc 0.1 wrote.
        l.conn
            .execute_batch(
                "DROP TABLE health; DROP TABLE workers; DROP INDEX runs_fire;
                 ALTER TABLE jobs DROP COLUMN interruptions; ALTER TABLE jobs DROP COLUMN died_at;
                 ALTER TABLE jobs DROP COLUMN died_in_a_row; ALTER TABLE jobs DROP COLUMN lease_gen;
                 ALTER TABLE jobs DROP COLUMN lease_owner; ALTER TABLE runs DROP COLUMN deadline;
                 ALTER TABLE runs DROP COLUMN overrun_reported; PRAGMA user_version = 1;",
            )
            .unwrap();
        drop(l);
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        let v: i64 = l.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        l.probe_write(1.0).unwrap();
        join(&mut l);
        let j = l.job(id).unwrap().unwrap();
        assert_eq!((j.state.as_str(), j.interruptions, j.lease), ("queued", 0, 0), "jobs survive the migration");
        let run = l.last_run("nightly").unwrap().unwrap();
        assert_eq!((run.deadline, run.overrun_reported), (10.0, false), "an old run's deadline is its fire time");
        // A ledger from a newer deltadoc is refused, not rewritten.
        l.conn.execute_batch("PRAGMA user_version = 99;").unwrap();
        drop(l);
        let e = SqliteLedger::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("newer than this deltadoc"), "{e}");
    }
}
