//! The ledger in PostgreSQL, shared by a fleet of daemons (`ledger: postgres://…`,
//! `docs/fleet.md`). Claims are one `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED)`, so
//! concurrent daemons never take the same job and never wait for each other; lease times come
//! from the database's clock (`deltadoc_now()`), so machines whose clocks disagree agree on
//! when a lease ran out. Schema migrations run at connect under an advisory lock: daemons that
//! start together migrate once.
//!
//! A lost connection (the server restarted, the network dropped) is reported as
//! [`Unreachable`]; the daemon holds its write and retries with a growing pause
//! (`daemon/storage.rs`), and the next call connects again. Nothing is lost meanwhile: a job
//! whose result could not be recorded stays leased, and a lease that runs out meanwhile is
//! taken over by another daemon like that of a dead worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use postgres::{Client, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::rows::{self, HASH_COLUMNS, JOB_COLUMNS, JOB_RECORD_COLUMNS, RUN_COLUMNS, insert_job_sql};
use super::{Contents, Discovery, Job, Lease, Ledger, NewJob, Recovery, Run, Takeover, WorkerId, WorkerState, state};
use crate::failure::Failure;

/// The schema, one entry per version; a daemon applies those the database lacks.
const MIGRATIONS: [&str; 1] = ["
    CREATE FUNCTION deltadoc_now() RETURNS double precision LANGUAGE sql VOLATILE
      AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;
    CREATE TABLE workers(id bigserial PRIMARY KEY, name text NOT NULL, host text NOT NULL, pid integer NOT NULL,
      started_at double precision NOT NULL, heartbeat_at double precision NOT NULL,
      lease_s double precision NOT NULL, documents bigint NOT NULL DEFAULT 0);
    CREATE TABLE jobs(id bigserial PRIMARY KEY,
      key text NOT NULL, pipeline text NOT NULL, priority integer NOT NULL,
      inbox text NOT NULL, rel_path text NOT NULL, source text NOT NULL,
      sha256 text NOT NULL, size bigint NOT NULL,
      state text NOT NULL, stage text, attempts integer NOT NULL DEFAULT 0,
      interruptions integer NOT NULL DEFAULT 0, died_at text, died_in_a_row integer NOT NULL DEFAULT 0,
      not_before double precision, queued_at double precision NOT NULL, started_at double precision,
      finished_at double precision, output text, error text, duplicate_of bigint,
      lease_gen bigint NOT NULL DEFAULT 0, lease_owner bigint, lease_expires double precision);
    CREATE UNIQUE INDEX jobs_identity ON jobs(key, inbox, rel_path);
    CREATE INDEX jobs_runnable ON jobs(state, pipeline, priority DESC, interruptions, queued_at, id);
    CREATE INDEX jobs_leased ON jobs(lease_owner) WHERE state = 'running';
    CREATE TABLE hashes(pipeline text NOT NULL, path text NOT NULL, size bigint NOT NULL, mtime_ns bigint NOT NULL,
      sha256 text NOT NULL, PRIMARY KEY(pipeline, path));
    CREATE TABLE runs(id bigserial PRIMARY KEY, pipeline text NOT NULL, planned_at double precision NOT NULL,
      started_at double precision NOT NULL, ended_at double precision, documents bigint NOT NULL DEFAULT 0,
      ok boolean, overran boolean NOT NULL DEFAULT false, deadline double precision NOT NULL,
      overrun_reported boolean NOT NULL DEFAULT false, UNIQUE(pipeline, planned_at));
    CREATE TABLE pipelines(name text PRIMARY KEY, first_seen double precision NOT NULL);
    CREATE TABLE health(id integer PRIMARY KEY CHECK (id = 1), probed_at double precision NOT NULL);
"];

/// Advisory lock key of migrations (any constant no other application of the database uses).
const MIGRATION_LOCK: i64 = 0x6465_6c74_6164_6f63;

/// Workers silent this long are forgotten (their jobs were taken over long before).
const FORGET_AFTER_S: f64 = 86_400.0;

/// The ledger database could not be reached (or dropped the connection): waiting may fix it.
#[derive(Debug, thiserror::Error)]
#[error("{ledger}: the ledger database cannot be reached: {source}")]
pub struct Unreachable {
    ledger: String,
    source: postgres::Error,
}

/// Whether `cause` is the ledger database out of reach, not a fault of the query.
pub fn unreachable(cause: &(dyn std::error::Error + 'static)) -> bool {
    cause.downcast_ref::<Unreachable>().is_some()
}

/// A connection to the fleet's ledger.
pub struct PgLedger {
    config: postgres::Config,
    /// TLS as the URL's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` ask (`ledger/tls.rs`).
    tls: MakeRustlsConnect,
    client: Option<Client>,
    /// The URL without its password.
    shown: String,
    /// The worker this connection claims for ([`Ledger::join`]).
    me: Option<(i64, WorkerId)>,
}

impl PgLedger {
    /// Connects to `url` (`postgres://user@host:port/db`, or `postgresql://`), migrating the
    /// schema. A password missing from the URL comes from `password_file` or `PGPASSWORD`; the
    /// host, port, user and database from `PGHOST`, `PGPORT`, `PGUSER` and `PGDATABASE`.
    pub fn connect(url: &str, password_file: Option<&Path>) -> Result<Self> {
        let (config, tls) = config(url, password_file)?;
        let shown = shown(&config);
        let mut l = Self { config, tls, client: None, shown, me: None };
        l.migrate()?;
        Ok(l)
    }

    /// Applies the migrations the database lacks; returns the schema version.
    pub fn migrate(&mut self) -> Result<usize> {
        let shown = self.shown.clone();
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS deltadoc_schema(version integer PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT now())",
            )?;
            let v: i32 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM deltadoc_schema", &[])?.get(0);
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(v as usize) {
                tx.batch_execute(sql)?;
                tx.execute("INSERT INTO deltadoc_schema(version) VALUES ($1)", &[&(i as i32 + 1)])?;
            }
            tx.commit()?;
            Ok(v as usize)
        })
        .and_then(|v| {
            if v > MIGRATIONS.len() {
                bail!(
                    "{shown}: ledger schema version {v} is newer than this deltadoc understands ({}); upgrade deltadoc",
                    MIGRATIONS.len()
                );
            }
            Ok(MIGRATIONS.len())
        })
    }

    /// Runs `f` on the connection, connecting first when there is none. A serialization failure
    /// or deadlock is tried again; a lost connection is dropped and reported as [`Unreachable`].
    fn with<T>(&mut self, mut f: impl FnMut(&mut Client) -> Result<T, postgres::Error>) -> Result<T> {
        let mut tries = 0;
        loop {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                self.client = None;
                let c =
                    self.config.connect(self.tls.clone()).map_err(|source| Unreachable { ledger: self.shown.clone(), source })?;
                self.client = Some(c);
            }
            let Some(client) = self.client.as_mut() else { continue };
            match f(client) {
                Ok(v) => return Ok(v),
                Err(e) if retry_later(&e) && tries < 5 => tries += 1,
                Err(e) if lost_connection(&e) => {
                    self.client = None;
                    return Err(Unreachable { ledger: self.shown.clone(), source: e }.into());
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("{}: ledger query failed", self.shown))),
            }
        }
    }

    fn jobs_where(&mut self, clause: &str, args: &[&(dyn postgres::types::ToSql + Sync)]) -> Result<Vec<Job>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs {clause}");
        read(&self.with(|c| c.query(sql.as_str(), args))?, rows::job)
    }

    /// The joined worker, for the calls only a worker makes.
    fn worker(&self) -> Result<&(i64, WorkerId)> {
        self.me.as_ref().context("this ledger connection has not joined as a worker")
    }
}

/// The connection settings: the URL, completed from the password file and the `PG*` variables,
/// and its TLS.
fn config(url: &str, password_file: Option<&Path>) -> Result<(postgres::Config, MakeRustlsConnect)> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (url, tls) = super::tls::from_url(url, var)?;
    let mut c: postgres::Config = url.parse().with_context(|| {
        // The URL may hold a password: name the setting, not the value.
        "`ledger` is not a PostgreSQL URL (postgres://user@host:port/database)".to_string()
    })?;
    if c.get_hosts().is_empty() {
        match var("PGHOST") {
            Some(h) => c.host(&h),
            None => c.host("localhost"),
        };
    }
    if c.get_ports().is_empty()
        && let Some(p) = var("PGPORT")
    {
        c.port(p.parse().with_context(|| format!("PGPORT={p:?} is not a port number"))?);
    }
    if c.get_user().is_none() {
        let user = var("PGUSER").or_else(|| var("USER")).context("the ledger URL names no user (nor does PGUSER)")?;
        c.user(&user);
    }
    if c.get_dbname().is_none()
        && let Some(db) = var("PGDATABASE")
    {
        c.dbname(&db);
    }
    if c.get_password().is_none() {
        if let Some(f) = password_file {
            let p = std::fs::read_to_string(f).with_context(|| format!("{}: cannot read the ledger password", f.display()))?;
            c.password(p.trim_end_matches(['\r', '\n']));
        } else if let Some(p) = var("PGPASSWORD") {
            c.password(&p);
        }
    }
    c.application_name("deltadoc");
    // A transaction left open by a client that stopped (paused, frozen) keeps row locks that would
    // hold back the takeover of its jobs: the server ends it. The ledger's transactions take
    // milliseconds; the shortest lease is 3 s.
    // The migration's `CREATE TABLE IF NOT EXISTS` notices are not news.
    c.options("-c idle_in_transaction_session_timeout=2s -c client_min_messages=warning");
    c.connect_timeout(Duration::from_secs(10));
    // A dead peer (machine gone, network cut) is noticed within about a minute.
    c.keepalives_idle(Duration::from_secs(30));
    Ok((c, tls))
}

/// The connection for people: never the password.
fn shown(c: &postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = c.get_ports().first().map(|p| format!(":{p}")).unwrap_or_default();
    let user = c.get_user().unwrap_or("");
    let db = c.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}{port}/{db}")
}

/// A serialization failure or deadlock: the transaction may simply be run again.
fn retry_later(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code().is_some_and(|c| *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// The connection is gone (closed, an I/O error, the server shutting down or starting).
fn lost_connection(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03");
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl rows::Row for Row {
    fn int(&self, i: usize) -> Result<Option<i64>> {
        // The ledger's counters are `integer`, its ids and sizes `bigint`.
        Ok(if *self.columns()[i].type_() == postgres::types::Type::INT4 {
            self.try_get::<_, Option<i32>>(i)?.map(i64::from)
        } else {
            self.try_get(i)?
        })
    }

    fn real(&self, i: usize) -> Result<Option<f64>> {
        Ok(self.try_get(i)?)
    }

    fn text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.try_get(i)?)
    }

    fn flag(&self, i: usize) -> Result<Option<bool>> {
        Ok(self.try_get(i)?)
    }
}

/// Reads each row with `read`.
fn read<T>(rows: &[Row], read: impl Fn(&dyn rows::Row) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(|r| read(r)).collect()
}

impl Ledger for PgLedger {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn folder(&self) -> Option<&Path> {
        None
    }

    fn join(&mut self, me: &WorkerId) -> Result<i64> {
        let pid = me.pid as i32;
        let id: i64 = self
            .with(|c| {
                c.query_one(
                    "INSERT INTO workers(name, host, pid, started_at, heartbeat_at, lease_s)
                     VALUES ($1, $2, $3, deltadoc_now(), deltadoc_now(), $4) RETURNING id",
                    &[&me.name, &me.host, &pid, &me.lease_s],
                )
            })?
            .get(0);
        self.me = Some((id, me.clone()));
        Ok(id)
    }

    fn leave(&mut self, worker: i64) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM workers WHERE id = $1", &[&worker]))?;
        Ok(())
    }

    fn heartbeat(&mut self, worker: i64, me: &WorkerId) -> Result<bool> {
        // One statement: a worker paused in the middle of it holds no lock while it is paused.
        // A forgotten worker held no running job (`reap` forgets only those), so there is no
        // lease to renew when it comes back.
        let pid = me.pid as i32;
        let rejoined: i64 = self
            .with(|c| {
                c.query_one(
                    "WITH w AS (UPDATE workers SET heartbeat_at = deltadoc_now() WHERE id = $1 RETURNING lease_s),
                          j AS (UPDATE jobs SET lease_expires = deltadoc_now() + (SELECT lease_s FROM w)
                                WHERE lease_owner = $1 AND state = 'running' AND EXISTS(SELECT 1 FROM w)),
                          back AS (INSERT INTO workers(id, name, host, pid, started_at, heartbeat_at, lease_s)
                                   SELECT $1, $2, $3, $4, deltadoc_now(), deltadoc_now(), $5
                                   WHERE NOT EXISTS(SELECT 1 FROM w) RETURNING id)
                     SELECT COUNT(*) FROM back",
                    &[&worker, &me.name, &me.host, &pid, &me.lease_s],
                )
            })?
            .get(0);
        Ok(rejoined > 0)
    }

    fn reap(&mut self) -> Result<Vec<Takeover>> {
        let rows = self.with(|c| {
            let mut tx = c.transaction()?;
            let rows = tx.query(
                "WITH expired AS (
                   SELECT id, lease_owner AS owner FROM jobs
                   WHERE state = 'running' AND lease_expires < deltadoc_now() FOR UPDATE SKIP LOCKED)
                 UPDATE jobs j SET state = 'queued', stage = NULL, attempts = GREATEST(j.attempts - 1, 0),
                   interruptions = j.interruptions + 1, lease_owner = NULL, lease_expires = NULL
                 FROM expired e WHERE j.id = e.id
                 RETURNING j.id, j.rel_path,
                   COALESCE((SELECT w.name || ' (' || w.host || ', pid ' || w.pid || ')' FROM workers w WHERE w.id = e.owner), 'a forgotten worker'),
                   COALESCE((SELECT deltadoc_now() - w.heartbeat_at FROM workers w WHERE w.id = e.owner), 0)",
                &[],
            )?;
            tx.execute(
                "DELETE FROM workers w WHERE w.heartbeat_at < deltadoc_now() - $1
                   AND NOT EXISTS(SELECT 1 FROM jobs j WHERE j.lease_owner = w.id AND j.state = 'running')",
                &[&FORGET_AFTER_S],
            )?;
            tx.commit()?;
            Ok(rows)
        })?;
        rows.iter()
            .map(|r| {
                Ok(Takeover {
                    job: r.try_get(0)?,
                    document: PathBuf::from(r.try_get::<_, String>(1)?),
                    worker: r.try_get(2)?,
                    silent_s: r.try_get(3)?,
                })
            })
            .collect()
    }

    fn recover(&mut self, died_at: Option<(i64, &str)>, limit: u32) -> Result<Recovery> {
        let (me, name) = {
            let (id, w) = self.worker()?;
            (*id, w.name.clone())
        };
        let limit = limit.max(2) as i32;
        let (requeued, crashed) = self.with(|c| {
            let mut tx = c.transaction()?;
            let mut crashed = None;
            if let Some((id, place)) = died_at {
                // Counted wherever the job is now: another daemon may have taken it over while this
                // one restarted. Handed back only if no live worker holds it.
                let in_a_row: Option<i32> = tx
                    .query_opt(
                        "UPDATE jobs SET died_in_a_row = CASE WHEN died_at = $2 THEN died_in_a_row + 1 ELSE 1 END, died_at = $2
                         WHERE id = $1 AND state IN ('running', 'queued') RETURNING died_in_a_row",
                        &[&id, &place],
                    )?
                    .map(|r| r.get(0));
                if in_a_row.is_some_and(|n| n >= limit) {
                    let taken = tx.execute(
                        "UPDATE jobs SET state = 'running', lease_gen = lease_gen + 1, lease_owner = $2,
                           lease_expires = deltadoc_now() + (SELECT lease_s FROM workers WHERE id = $2)
                         WHERE id = $1 AND (state = 'queued'
                           OR lease_owner IN (SELECT id FROM workers WHERE name = $3 AND id <> $2)
                           OR lease_expires < deltadoc_now())",
                        &[&id, &me, &name],
                    )?;
                    if taken == 1 {
                        crashed = Some((id, in_a_row.unwrap_or_default() as u32));
                    }
                }
            }
            let skip = crashed.map(|c: (i64, u32)| c.0).unwrap_or(0);
            let requeued = tx.execute(
                "UPDATE jobs SET state = 'queued', stage = NULL, attempts = GREATEST(attempts - 1, 0),
                   interruptions = interruptions + 1, lease_owner = NULL, lease_expires = NULL
                 WHERE state = 'running' AND id <> $3
                   AND lease_owner IN (SELECT id FROM workers WHERE name = $1 AND id <> $2)",
                &[&name, &me, &skip],
            )?;
            tx.execute("DELETE FROM workers WHERE name = $1 AND id <> $2", &[&name, &me])?;
            tx.commit()?;
            Ok((requeued as usize, crashed))
        })?;
        let crashed = match crashed {
            Some((id, in_a_row)) => self.job(id)?.map(|j| (j, in_a_row)),
            None => None,
        };
        Ok(Recovery { requeued, crashed })
    }

    fn cached_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64) -> Result<Option<String>> {
        let (path, size) = (text(path), size as i64);
        let row = self.with(|c| {
            c.query_opt(
                "SELECT sha256 FROM hashes WHERE pipeline = $1 AND path = $2 AND size = $3 AND mtime_ns = $4",
                &[&pipeline, &path, &size, &mtime_ns],
            )
        })?;
        Ok(row.map(|r| r.get(0)))
    }

    fn remember_hash(&mut self, pipeline: &str, path: &Path, size: u64, mtime_ns: i64, sha256: &str) -> Result<()> {
        let (path, size) = (text(path), size as i64);
        self.with(|c| {
            c.execute(
                "INSERT INTO hashes(pipeline, path, size, mtime_ns, sha256) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (pipeline, path) DO UPDATE SET size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns,
                   sha256 = EXCLUDED.sha256",
                &[&pipeline, &path, &size, &mtime_ns, &sha256],
            )
        })?;
        Ok(())
    }

    fn discover(&mut self, j: &NewJob) -> Result<Discovery> {
        let (inbox, rel, source) = (text(j.inbox), text(j.rel_path), text(&j.inbox.join(j.rel_path)));
        let size = j.size as i64;
        self.with(|c| {
            let mut tx = c.transaction()?;
            // Daemons that see the same content at once (one file in a shared inbox, or copies of
            // it) take turns, so it becomes one job and its duplicates.
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&j.key])?;
            let same =
                tx.query_opt("SELECT id FROM jobs WHERE key = $1 AND inbox = $2 AND rel_path = $3", &[&j.key, &inbox, &rel])?;
            if same.is_some() {
                return Ok(Discovery::Known);
            }
            let earlier: Option<i64> = tx
                .query_opt("SELECT id FROM jobs WHERE key = $1 AND state <> 'skipped' ORDER BY id LIMIT 1", &[&j.key])?
                .map(|r| r.get(0));
            let dup = earlier.filter(|_| !j.reprocess_duplicates);
            let st = if dup.is_some() { state::SKIPPED } else { state::QUEUED };
            let id: i64 = tx
                .query_one(
                    "INSERT INTO jobs(key, pipeline, priority, inbox, rel_path, source, sha256, size, state, queued_at,
                       finished_at, duplicate_of)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, deltadoc_now(),
                       CASE WHEN $10::bigint IS NULL THEN NULL ELSE deltadoc_now() END, $10)
                     RETURNING id",
                    &[&j.key, &j.pipeline, &j.priority, &inbox, &rel, &source, &j.sha256, &size, &st, &dup],
                )?
                .get(0);
            tx.commit()?;
            Ok(Discovery::recorded(id, dup))
        })
    }

    fn claim(&mut self, pipelines: &[&str], now: f64) -> Result<Option<Job>> {
        if pipelines.is_empty() {
            return Ok(None);
        }
        let (me, lease_s) = {
            let (id, w) = self.worker()?;
            (*id, w.lease_s)
        };
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = $2, stage = NULL,
               lease_gen = lease_gen + 1, lease_owner = $3, lease_expires = deltadoc_now() + $4
             WHERE id = (SELECT id FROM jobs WHERE pipeline = ANY($1)
                           AND (state = 'queued' OR (state = 'retry_wait' AND not_before <= $2))
                         ORDER BY priority DESC, interruptions, queued_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING {JOB_COLUMNS}"
        );
        let row = self.with(|c| c.query_opt(sql.as_str(), &[&pipelines, &now, &me, &lease_s]))?;
        row.as_ref().map(|r| rows::job(r)).transpose()
    }

    fn holds(&mut self, l: Lease) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE jobs SET lease_expires = deltadoc_now() + w.lease_s FROM workers w
                 WHERE jobs.id = $1 AND jobs.lease_gen = $2 AND jobs.state = 'running' AND w.id = jobs.lease_owner",
                &[&l.job, &l.generation],
            )
        })?;
        Ok(n == 1)
    }

    fn set_stage(&mut self, l: Lease, stage: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET stage = $3 WHERE id = $1 AND lease_gen = $2 AND state = 'running'",
                &[&l.job, &l.generation, &stage],
            )
        })?;
        Ok(())
    }

    fn done(&mut self, l: Lease, output: &Path, now: f64) -> Result<bool> {
        let output = text(output);
        let n: i64 = self
            .with(|c| {
                c.query_one(
                    "WITH d AS (UPDATE jobs SET state = 'done', stage = NULL, finished_at = $3, output = $4, error = NULL,
                                  lease_expires = NULL
                                WHERE id = $1 AND lease_gen = $2 AND state = 'running' RETURNING lease_owner),
                          w AS (UPDATE workers SET documents = documents + 1 WHERE id IN (SELECT lease_owner FROM d))
                     SELECT COUNT(*) FROM d",
                    &[&l.job, &l.generation, &now, &output],
                )
            })?
            .get(0);
        Ok(n == 1)
    }

    fn failed(&mut self, l: Lease, f: &Failure, retry_at: Option<f64>, source: Option<&Path>, now: f64) -> Result<bool> {
        let err = serde_json::to_string(f)?;
        let source = source.map(text);
        let n = self.with(|c| match retry_at {
            Some(t) => c.execute(
                "UPDATE jobs SET state = 'retry_wait', not_before = $3, stage = $4, error = $5, lease_expires = NULL
                 WHERE id = $1 AND lease_gen = $2 AND state = 'running'",
                &[&l.job, &l.generation, &t, &f.stage, &err],
            ),
            None => c.execute(
                "UPDATE jobs SET state = 'quarantined', stage = $3, error = $4, finished_at = $5,
                   source = COALESCE($6, source), lease_expires = NULL
                 WHERE id = $1 AND lease_gen = $2 AND state = 'running'",
                &[&l.job, &l.generation, &f.stage, &err, &now, &source],
            ),
        })?;
        Ok(n == 1)
    }

    fn release(&mut self, l: Lease) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET state = 'queued', stage = NULL, attempts = GREATEST(attempts - 1, 0), lease_owner = NULL,
                   lease_expires = NULL
                 WHERE id = $1 AND lease_gen = $2 AND state = 'running'",
                &[&l.job, &l.generation],
            )
        })?;
        Ok(())
    }

    fn retry(&mut self, id: Option<i64>) -> Result<usize> {
        let n = self.with(|c| match id {
            Some(id) => c.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, not_before = NULL, finished_at = NULL
                 WHERE id = $1 AND state IN ('quarantined', 'retry_wait', 'done')",
                &[&id],
            ),
            None => c.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, not_before = NULL, finished_at = NULL
                 WHERE state IN ('quarantined', 'retry_wait')",
                &[],
            ),
        })?;
        Ok(n as usize)
    }

    fn counts(&mut self) -> Result<Vec<(String, String, u64)>> {
        let rows = self.with(|c| c.query("SELECT pipeline, state, COUNT(*) FROM jobs GROUP BY pipeline, state", &[]))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64)).collect())
    }

    fn oldest_queued(&mut self) -> Result<Vec<(String, f64)>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT pipeline, MIN(queued_at) FROM jobs WHERE state IN ('queued', 'retry_wait')
                 GROUP BY pipeline ORDER BY pipeline",
                &[],
            )
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn has_work(&mut self, pipeline: &str, now: f64) -> Result<bool> {
        let row = self.with(|c| {
            c.query_one(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE pipeline = $1 AND
                   (state IN ('queued', 'running') OR (state = 'retry_wait' AND not_before <= $2)))",
                &[&pipeline, &now],
            )
        })?;
        Ok(row.get(0))
    }

    fn recent(&mut self, n: usize) -> Result<Vec<Job>> {
        let n = n as i64;
        self.jobs_where("ORDER BY COALESCE(finished_at, started_at, queued_at) DESC, id DESC LIMIT $1", &[&n])
    }

    fn job(&mut self, id: i64) -> Result<Option<Job>> {
        Ok(self.jobs_where("WHERE id = $1", &[&id])?.pop())
    }

    fn workers(&mut self) -> Result<Vec<WorkerState>> {
        let sql = rows::workers_sql("deltadoc_now() - w.heartbeat_at");
        read(&self.with(|c| c.query(sql.as_str(), &[]))?, rows::worker)
    }

    fn last_run(&mut self, pipeline: &str) -> Result<Option<Run>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE pipeline = $1 ORDER BY planned_at DESC, id DESC LIMIT 1");
        let row = self.with(|c| c.query_opt(sql.as_str(), &[&pipeline]))?;
        row.as_ref().map(|r| rows::run(r)).transpose()
    }

    fn start_run(&mut self, pipeline: &str, planned_at: f64, deadline: f64, now: f64) -> Result<Option<i64>> {
        let row = self.with(|c| {
            c.query_opt(
                "INSERT INTO runs(pipeline, planned_at, started_at, deadline) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (pipeline, planned_at) DO NOTHING RETURNING id",
                &[&pipeline, &planned_at, &now, &deadline],
            )
        })?;
        Ok(row.map(|r| r.get(0)))
    }

    fn end_run(&mut self, id: i64, now: f64, overran: bool) -> Result<Option<Run>> {
        // The documents that ended in the run: only during runs do a scheduled pipeline's jobs
        // run, so those are the ones that finished since it started.
        let sql = format!(
            "UPDATE runs SET ended_at = $2, overran = $3,
               documents = (SELECT COUNT(*) FROM jobs j WHERE j.pipeline = runs.pipeline
                              AND j.state IN ('done', 'quarantined') AND j.finished_at >= runs.started_at),
               ok = NOT EXISTS(SELECT 1 FROM jobs j WHERE j.pipeline = runs.pipeline AND j.state = 'quarantined'
                              AND j.finished_at >= runs.started_at)
             WHERE id = $1 AND ended_at IS NULL RETURNING {RUN_COLUMNS}"
        );
        let row = self.with(|c| c.query_opt(sql.as_str(), &[&id, &now, &overran]))?;
        row.as_ref().map(|r| rows::run(r)).transpose()
    }

    fn report_overrun(&mut self, id: i64) -> Result<bool> {
        let n =
            self.with(|c| c.execute("UPDATE runs SET overrun_reported = true WHERE id = $1 AND NOT overrun_reported", &[&id]))?;
        Ok(n == 1)
    }

    fn first_seen(&mut self, pipeline: &str, now: f64) -> Result<f64> {
        let row = self.with(|c| {
            c.execute("INSERT INTO pipelines(name, first_seen) VALUES ($1, $2) ON CONFLICT DO NOTHING", &[&pipeline, &now])?;
            c.query_one("SELECT first_seen FROM pipelines WHERE name = $1", &[&pipeline])
        })?;
        Ok(row.get(0))
    }

    fn last_success(&mut self, pipeline: &str) -> Result<Option<f64>> {
        let row = self.with(|c| c.query_one("SELECT MAX(ended_at) FROM runs WHERE pipeline = $1 AND ok", &[&pipeline]))?;
        Ok(row.get(0))
    }

    fn probe_write(&mut self, now: f64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO health(id, probed_at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET probed_at = EXCLUDED.probed_at",
                &[&now],
            )
        })
        .with_context(|| format!("{}: the ledger does not take writes", self.shown))?;
        Ok(())
    }

    fn export(&mut self) -> Result<Contents> {
        let jobs_sql = format!("SELECT {} FROM jobs ORDER BY id", JOB_RECORD_COLUMNS.join(", "));
        let runs_sql = format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id");
        let hashes_sql = format!("SELECT {HASH_COLUMNS} FROM hashes ORDER BY pipeline, path");
        let (jobs, runs, pipelines, hashes) = self.with(|c| {
            // One snapshot of all four tables.
            let mut tx = c.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start()?;
            let rows = (
                tx.query(jobs_sql.as_str(), &[])?,
                tx.query(runs_sql.as_str(), &[])?,
                tx.query("SELECT name, first_seen FROM pipelines ORDER BY name", &[])?,
                tx.query(hashes_sql.as_str(), &[])?,
            );
            tx.commit()?;
            Ok(rows)
        })?;
        Ok(Contents {
            jobs: read(&jobs, rows::job_record)?,
            runs: read(&runs, rows::run)?,
            pipelines: pipelines.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_>>()?,
            hashes: read(&hashes, rows::hash)?,
        })
    }

    fn import(&mut self, contents: &Contents) -> Result<()> {
        let shown = self.shown.clone();
        let insert_job = insert_job_sql(|i| format!("${i}"));
        let insert_run = format!("INSERT INTO runs({RUN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)");
        let held = self.with(|c| {
            let mut tx = c.transaction()?;
            // Nobody records jobs meanwhile.
            tx.batch_execute("LOCK TABLE jobs IN EXCLUSIVE MODE")?;
            let held: i64 = tx.query_one("SELECT COUNT(*) FROM jobs", &[])?.get(0);
            if held > 0 {
                return Ok(held);
            }
            let job = tx.prepare(&insert_job)?;
            for j in &contents.jobs {
                tx.execute(
                    &job,
                    &[
                        &j.id,
                        &j.key,
                        &j.pipeline,
                        &j.priority,
                        &j.inbox,
                        &j.rel_path,
                        &j.source,
                        &j.sha256,
                        &j.size,
                        &j.state,
                        &j.stage,
                        &j.attempts,
                        &j.interruptions,
                        &j.died_at,
                        &j.died_in_a_row,
                        &j.not_before,
                        &j.queued_at,
                        &j.started_at,
                        &j.finished_at,
                        &j.output,
                        &j.error,
                        &j.duplicate_of,
                        &j.lease_gen,
                    ],
                )?;
            }
            let run = tx.prepare(&insert_run)?;
            for r in &contents.runs {
                let documents = r.documents as i64;
                tx.execute(
                    &run,
                    &[
                        &r.id,
                        &r.pipeline,
                        &r.planned_at,
                        &r.started_at,
                        &r.ended_at,
                        &documents,
                        &r.ok,
                        &r.overran,
                        &r.deadline,
                        &r.overrun_reported,
                    ],
                )?;
            }
            for (name, first) in &contents.pipelines {
                tx.execute(
                    "INSERT INTO pipelines(name, first_seen) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET first_seen = EXCLUDED.first_seen",
                    &[name, first],
                )?;
            }
            for h in &contents.hashes {
                tx.execute(
                    "INSERT INTO hashes(pipeline, path, size, mtime_ns, sha256) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (pipeline, path) DO UPDATE SET size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns,
                       sha256 = EXCLUDED.sha256",
                    &[&h.pipeline, &h.path, &h.size, &h.mtime_ns, &h.sha256],
                )?;
            }
            // New ids continue after the imported ones.
            tx.batch_execute(
                "SELECT setval(pg_get_serial_sequence('jobs', 'id'), GREATEST((SELECT MAX(id) FROM jobs), 1));
                 SELECT setval(pg_get_serial_sequence('runs', 'id'), GREATEST((SELECT MAX(id) FROM runs), 1));",
            )?;
            tx.commit()?;
            Ok(0)
        })?;
        if held > 0 {
            bail!("{shown}: the ledger holds {held} jobs already; import into an empty ledger");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_shown_never_carries_the_password() {
        let (c, _) = config("postgres://fleet:s3cret@db.example:6543/deltadoc", None).unwrap();
        assert_eq!(shown(&c), "postgres://fleet@db.example:6543/deltadoc");
        assert_eq!(c.get_password(), Some(&b"s3cret"[..]));
    }

    #[test]
    fn a_password_file_fills_in_a_url_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").unwrap();
        let (c, _) = config("postgres://fleet@db/deltadoc", Some(&f)).unwrap();
        assert_eq!(c.get_password(), Some(&b"from-file"[..]));
        let error = |url: &str, password: Option<&Path>| format!("{:#}", config(url, password).err().expect(url));
        let e = error("postgres://fleet@db/deltadoc", Some(&dir.path().join("missing")));
        assert!(e.contains("cannot read the ledger password"), "{e}");
        let e = error("postgres://fleet:s3cret@db/deltadoc?keepalives=maybe", None);
        assert!(e.contains("not a PostgreSQL URL") && !e.contains("s3cret"), "the password is not echoed: {e}");
        let e = error("postgres://fleet:s3cret@db/deltadoc?sslmode=bogus", None);
        assert!(e.contains("sslmode=\"bogus\"") && !e.contains("s3cret"), "the password is not echoed: {e}");
    }
}
