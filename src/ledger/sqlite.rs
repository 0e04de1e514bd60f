//! The ledger in one SQLite file (`<state_dir>/ledger.sqlite3`), WAL mode with synchronous
//! FULL; schema versions migrate in place at open.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};

use super::{Discovery, Job, Ledger, NewJob, Recovery, Run, now_s, state};
use crate::failure::Failure;

/// Schema version stored in the ledger; migrations run on open.
const SCHEMA_VERSION: i64 = 3;

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
}

impl SqliteLedger {
    /// Opens (creating if needed) `dir/ledger.sqlite3` in WAL mode.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the state folder", dir.display()))?;
        let path = dir.join("ledger.sqlite3");
        let conn = Connection::open(&path).with_context(|| format!("{}: cannot open the ledger", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a result reported done must still be done after a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        let mut l = Self { conn, path };
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

    fn migrate(&mut self) -> Result<()> {
        let v: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v > SCHEMA_VERSION {
            bail!(
                "{}: ledger schema version {v} is newer than this deltadoc understands ({SCHEMA_VERSION}); upgrade deltadoc",
                self.path.display()
            );
        }
        if v < 1 {
            self.conn.execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE jobs(
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
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        if v < 2 {
            // Version 2: the readiness probe's row.
            self.conn.execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS health(id INTEGER PRIMARY KEY CHECK (id = 1), probed_at REAL NOT NULL);
                 PRAGMA user_version = 2;
                 COMMIT;",
            )?;
        }
        if v < 3 {
            // Version 3: interruptions are not failed attempts; where the daemon last died under
            // a job, and how many times in a row at that place.
            self.conn.execute_batch(
                "BEGIN IMMEDIATE;
                 ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE jobs ADD COLUMN died_at TEXT;
                 ALTER TABLE jobs ADD COLUMN died_in_a_row INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 3;
                 COMMIT;",
            )?;
        }
        Ok(())
    }

    fn jobs_where(&self, clause: &str, args: impl rusqlite::Params) -> Result<Vec<Job>> {
        let sql = format!(
            "SELECT id, key, pipeline, inbox, rel_path, source, sha256, size, state, stage, attempts, queued_at,
                    started_at, finished_at, output, error, duplicate_of, interruptions FROM jobs {clause}"
        );
        let mut st = self.conn.prepare_cached(&sql)?;
        let rows = st.query_map(args, |r| {
            let error: Option<String> = r.get(15)?;
            Ok(Job {
                id: r.get(0)?,
                key: r.get(1)?,
                pipeline: r.get(2)?,
                inbox: PathBuf::from(r.get::<_, String>(3)?),
                rel_path: PathBuf::from(r.get::<_, String>(4)?),
                source: PathBuf::from(r.get::<_, String>(5)?),
                sha256: r.get(6)?,
                size: r.get::<_, i64>(7)? as u64,
                state: r.get(8)?,
                stage: r.get(9)?,
                attempts: r.get(10)?,
                queued_at: r.get(11)?,
                started_at: r.get(12)?,
                finished_at: r.get(13)?,
                output: r.get::<_, Option<String>>(14)?.map(PathBuf::from),
                error: error.and_then(|e| serde_json::from_str(&e).ok()),
                duplicate_of: r.get(16)?,
                interruptions: r.get(17)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Ledger for SqliteLedger {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn recover(&mut self, died_at: Option<(i64, &str)>, limit: u32) -> Result<Recovery> {
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
                crashed = Some((id, in_a_row));
            }
        }
        let requeued = tx.execute(
            "UPDATE jobs SET state = ?1, stage = NULL, attempts = MAX(attempts - 1, 0), interruptions = interruptions + 1
             WHERE state = ?2 AND id IS NOT ?3",
            params![state::QUEUED, state::RUNNING, crashed.as_ref().map(|c| c.0)],
        )?;
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
        Ok(match dup {
            Some(of) => Discovery::Duplicate { of },
            None => Discovery::Queued(id),
        })
    }

    fn claim(&mut self, pipelines: &[&str], now: f64) -> Result<Option<Job>> {
        if pipelines.is_empty() {
            return Ok(None);
        }
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
            "UPDATE jobs SET state = ?3, attempts = attempts + 1, started_at = ?2, stage = NULL WHERE id = ?1",
            params![id, now, state::RUNNING],
        )?;
        tx.commit()?;
        self.job(id)
    }

    fn set_stage(&mut self, id: i64, stage: &str) -> Result<()> {
        self.conn.execute("UPDATE jobs SET stage = ?2 WHERE id = ?1", params![id, stage])?;
        Ok(())
    }

    fn done(&mut self, id: i64, output: &Path, now: f64) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state = ?4, stage = NULL, finished_at = ?2, output = ?3, error = NULL WHERE id = ?1",
            params![id, now, text(output), state::DONE],
        )?;
        Ok(())
    }

    fn failed(&mut self, id: i64, f: &Failure, retry_at: Option<f64>, source: Option<&Path>, now: f64) -> Result<()> {
        let err = serde_json::to_string(f)?;
        match retry_at {
            Some(t) => self.conn.execute(
                "UPDATE jobs SET state = ?5, not_before = ?2, stage = ?3, error = ?4 WHERE id = ?1",
                params![id, t, f.stage, err, state::RETRY_WAIT],
            )?,
            None => self.conn.execute(
                "UPDATE jobs SET state = ?6, stage = ?2, error = ?3, finished_at = ?4, source = COALESCE(?5, source)
                 WHERE id = ?1",
                params![id, f.stage, err, now, source.map(text), state::QUARANTINED],
            )?,
        };
        Ok(())
    }

    fn release(&mut self, id: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state = ?2, stage = NULL, attempts = MAX(attempts - 1, 0) WHERE id = ?1 AND state = ?3",
            params![id, state::QUEUED, state::RUNNING],
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

    fn last_run(&mut self, pipeline: &str) -> Result<Option<Run>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, pipeline, planned_at, started_at, ended_at, documents, ok, overran FROM runs
                 WHERE pipeline = ?1 ORDER BY planned_at DESC, id DESC LIMIT 1",
                params![pipeline],
                |r| {
                    Ok(Run {
                        id: r.get(0)?,
                        pipeline: r.get(1)?,
                        planned_at: r.get(2)?,
                        started_at: r.get(3)?,
                        ended_at: r.get(4)?,
                        documents: r.get::<_, i64>(5)? as u64,
                        ok: r.get(6)?,
                        overran: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    fn start_run(&mut self, pipeline: &str, planned_at: f64, now: f64) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO runs(pipeline, planned_at, started_at) VALUES (?1, ?2, ?3)",
            params![pipeline, planned_at, now],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    fn end_run(&mut self, id: i64, now: f64, documents: u64, ok: bool, overran: bool) -> Result<()> {
        self.conn.execute(
            "UPDATE runs SET ended_at = ?2, documents = ?3, ok = ?4, overran = ?5 WHERE id = ?1",
            params![id, now, documents as i64, ok, overran],
        )?;
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Reason;

    fn new_job<'a>(key: &'a str, rel: &'a Path, inbox: &'a Path) -> NewJob<'a> {
        NewJob { key, pipeline: "p", priority: 0, inbox, rel_path: rel, sha256: "s", size: 1, reprocess_duplicates: false }
    }

    #[test]
    fn lifecycle_duplicates_and_crash_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Path::new("/in");
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        let a = Path::new("a.pdf");
        let Discovery::Queued(id) = l.discover(&new_job("k1", a, inbox)).unwrap() else { panic!() };
        assert_eq!(l.discover(&new_job("k1", a, inbox)).unwrap(), Discovery::Known);
        assert_eq!(l.discover(&new_job("k1", Path::new("copy.pdf"), inbox)).unwrap(), Discovery::Duplicate { of: id });
        let j = l.claim(&["p"], 1.0).unwrap().unwrap();
        assert_eq!((j.id, j.attempts, j.state.as_str()), (id, 1, "running"));
        assert!(l.claim(&["p"], 1.0).unwrap().is_none());
        // A crash leaves it running; reopening the ledger and recovering queues it again, the
        // interrupted attempt not counted.
        drop(l);
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        assert_eq!(l.recover(None, 3).unwrap().requeued, 1);
        let j = l.claim(&["p"], 2.0).unwrap().unwrap();
        assert_eq!((j.attempts, j.interruptions), (1, 1));
        // An interrupted job waits behind the others of its priority, so that one the daemon
        // keeps dying under does not hold up the queue.
        let Discovery::Queued(b) = l.discover(&new_job("k2", Path::new("b.pdf"), inbox)).unwrap() else { panic!() };
        l.release(id).unwrap();
        assert_eq!(l.claim(&["p"], 2.0).unwrap().unwrap().id, b);
        l.done(b, Path::new("/out/b.pdf.json"), 2.0).unwrap();
        assert_eq!(l.claim(&["p"], 2.0).unwrap().unwrap().id, id);
        let f = Failure::new(Reason::Timeout, "extract", "slow");
        l.failed(id, &f, Some(100.0), None, 3.0).unwrap();
        assert!(l.claim(&["p"], 50.0).unwrap().is_none(), "backoff respected");
        let j = l.claim(&["p"], 100.0).unwrap().unwrap();
        assert_eq!(j.error.as_ref().unwrap().reason, Reason::Timeout);
        l.done(id, Path::new("/out/a.pdf.json"), 101.0).unwrap();
        assert_eq!(l.job(id).unwrap().unwrap().state, "done");
        assert!(l.oldest_queued().unwrap().is_empty());
    }

    #[test]
    fn a_job_the_daemon_dies_under_at_the_same_place_in_a_row_is_handed_back_to_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(dir.path()).unwrap();
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
    }

    #[test]
    fn concurrent_connections_never_see_database_is_locked() {
        // Ingest discovers while the worker claims, each on its own connection: read-then-write
        // transactions must wait for each other, not fail.
        let dir = tempfile::tempdir().unwrap();
        SqliteLedger::open(dir.path()).unwrap();
        let inbox = Path::new("/in");
        std::thread::scope(|s| {
            let discovering = s.spawn(|| {
                let mut l = SqliteLedger::open(dir.path()).unwrap();
                for i in 0..300 {
                    let (key, rel) = (format!("k{i}"), PathBuf::from(format!("{i}.pdf")));
                    l.discover(&new_job(&key, &rel, inbox)).unwrap();
                }
            });
            let mut l = SqliteLedger::open(dir.path()).unwrap();
            let mut claimed = 0;
            loop {
                match l.claim(&["p"], 1.0).unwrap() {
                    Some(j) => {
                        l.done(j.id, Path::new("/out/x.json"), 2.0).unwrap();
                        claimed += 1;
                    }
                    None if discovering.is_finished() => break,
                    None => std::thread::yield_now(),
                }
            }
            discovering.join().unwrap();
            while let Some(j) = l.claim(&["p"], 1.0).unwrap() {
                l.done(j.id, Path::new("/out/x.json"), 2.0).unwrap();
                claimed += 1;
            }
            assert_eq!(claimed, 300, "every job claimed once");
        });
    }

    #[test]
    fn a_version_1_ledger_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        let inbox = Path::new("/in");
        let Discovery::Queued(id) = l.discover(&new_job("k1", Path::new("a.pdf"), inbox)).unwrap() else { panic!() };
        // Turn it back into what deltadoc 0.1 wrote.
        l.conn
            .execute_batch(
                "DROP TABLE health; ALTER TABLE jobs DROP COLUMN interruptions; ALTER TABLE jobs DROP COLUMN died_at;
                 ALTER TABLE jobs DROP COLUMN died_in_a_row; PRAGMA user_version = 1;",
            )
            .unwrap();
        drop(l);
        let mut l = SqliteLedger::open(dir.path()).unwrap();
        let v: i64 = l.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        l.probe_write(1.0).unwrap();
        let j = l.job(id).unwrap().unwrap();
        assert_eq!((j.state.as_str(), j.interruptions), ("queued", 0), "jobs survive the migration");
        // A ledger from a newer deltadoc is refused, not rewritten.
        l.conn.execute_batch("PRAGMA user_version = 99;").unwrap();
        drop(l);
        let e = SqliteLedger::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("newer than this deltadoc"), "{e}");
    }
}
