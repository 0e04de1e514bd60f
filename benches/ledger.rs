//! What the fleet's PostgreSQL ledger costs next to the single daemon's SQLite ledger, side by
//! side in one run on one machine:
//!
//!   cargo bench --bench ledger -- [JOBS]
//!
//! 1. Ledger time per job: the calls one document makes (discover, claim, three stage notes, the
//!    lease check before the result, done), JOBS times (default 300) on each ledger, both durable
//!    (SQLite WAL with synchronous=FULL; PostgreSQL with fsync and synchronous commit on, a
//!    throwaway cluster on this machine, tests/common/pg_cluster.rs), plus one heartbeat with its
//!    takeover check; PostgreSQL both plain and over TLS with the certificate verified.
//! 2. The demo inbox (examples/) through `deltadoc run --once` with each ledger, fresh state each
//!    time, the tiny model (built first by the quick start or `model synth`).
//!
//! Needs PostgreSQL's server binaries (Debian's `postgresql` package) and `openssl`. Prints both
//! tables.

// The tests' throwaway cluster; the bench uses part of it.
#[allow(dead_code)]
#[path = "../tests/common/pg_cluster.rs"]
mod pg_cluster;
// Its certificates.
#[allow(dead_code)]
#[path = "../tests/common/certs.rs"]
mod certs;
// Their ports.
#[path = "../tests/common/ports.rs"]
mod ports;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use deltadoc::ledger::{Ledger, NewJob, PgLedger, SqliteLedger, WorkerId};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds per job (every call of one document) and per heartbeat.
fn per_job(l: &mut dyn Ledger, jobs: usize) -> anyhow::Result<(f64, f64, f64)> {
    let me = WorkerId { name: "bench".into(), host: "bench".into(), pid: std::process::id(), lease_s: 30.0 };
    let worker = l.join(&me)?;
    let mut times = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let (key, rel) = (format!("key-{i}"), PathBuf::from(format!("doc-{i}.pdf")));
        let t = Instant::now();
        l.discover(&NewJob {
            key: &key,
            pipeline: "p",
            priority: 0,
            inbox: Path::new("/srv/inbox"),
            rel_path: &rel,
            sha256: &key,
            size: 1000,
            reprocess_duplicates: false,
        })?;
        let job = l.claim(&["p"], deltadoc::ledger::now_s())?.expect("the job just discovered");
        for stage in ["extract", "summary", "parties"] {
            l.set_stage(job.lease(), stage)?;
        }
        assert!(l.holds(job.lease())?);
        assert!(l.done(job.lease(), Path::new("/srv/out/x.json"), deltadoc::ledger::now_s())?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut beats = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        assert!(!l.heartbeat(worker, &me)?);
        l.reap()?;
        beats.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    Ok((mean, percentile(&mut times, 0.95), percentile(&mut beats, 0.5)))
}

/// Seconds of `deltadoc run --once` over a fresh copy of the demo inbox, with `ledger` (None:
/// SQLite) and the password in `password_file`.
fn demo(ledger: Option<&str>, password_file: &Path) -> anyhow::Result<(f64, usize)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir()?;
    let copy = Command::new("cp").arg("-r").arg(root.join("examples/inbox")).arg(work.path()).status()?;
    anyhow::ensure!(copy.success(), "cannot copy examples/inbox");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deltadoc"));
    cmd.args(["run", "--once", "--config"])
        .arg(root.join("config/deltadoc.yaml"))
        .env("DELTADOC_DATA_DIR", work.path())
        .env("DELTADOC_STATE_DIR", work.path().join("state"))
        .env("DELTADOC_METRICS_ENABLED", "false")
        .env("DELTADOC_LOG", "warn");
    if let Some(url) = ledger {
        cmd.env("DELTADOC_LEDGER", url).env("DELTADOC_LEDGER_PASSWORD_FILE", password_file);
    }
    let t = Instant::now();
    let out = cmd.output()?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(out.status.success(), "run --once failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let results = walk(&work.path().join("out"));
    Ok((secs, results))
}

/// Files under `dir`.
fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()).unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let jobs: usize = args.first().map(|j| j.parse()).transpose()?.unwrap_or(300);
    // Durable, as in production: the server's defaults (fsync and synchronous commit on).
    let cluster = pg_cluster::Cluster::start_with(&[]).ok_or_else(|| anyhow::anyhow!("PostgreSQL is not installed"))?;
    let pw = cluster.password_file();

    let dir = tempfile::tempdir()?;
    let mut sqlite = SqliteLedger::open(dir.path())?;
    let (s_mean, s_p95, s_beat) = per_job(&mut sqlite, jobs)?;
    let plain = |db: &str| format!("{}?sslmode=disable", cluster.database(db));
    let mut pg = PgLedger::connect(&plain("bench"), Some(&pw))?;
    let (p_mean, p_p95, p_beat) = per_job(&mut pg, jobs)?;
    let root = cluster.enable_tls().ok_or_else(|| anyhow::anyhow!("openssl is needed for the TLS certificates"))?;
    let verified = format!("{}?sslmode=verify-full&sslrootcert={}", cluster.database("bench_tls"), root.display());
    let (t_mean, t_p95, t_beat) = per_job(&mut PgLedger::connect(&verified, Some(&pw))?, jobs)?;
    println!("ledger time per job ({jobs} jobs: discover, claim, 3 stage notes, lease check, done):");
    println!("| ledger | mean ms/job | p95 ms/job | heartbeat + takeover check, ms |");
    println!("|---|---|---|---|");
    println!("| SQLite (WAL, synchronous=FULL) | {s_mean:.2} | {s_p95:.2} | {s_beat:.2} |");
    println!("| PostgreSQL (local, fsync on) | {p_mean:.2} | {p_p95:.2} | {p_beat:.2} |");
    println!("| PostgreSQL over TLS (verify-full) | {t_mean:.2} | {t_p95:.2} | {t_beat:.2} |");
    println!("PostgreSQL / SQLite per job: {:.2}; TLS / plain: {:.2}", p_mean / s_mean, t_mean / p_mean);

    let url = plain("demo");
    let (s_secs, s_results) = demo(None, &pw)?;
    let (p_secs, p_results) = demo(Some(&url), &pw)?;
    anyhow::ensure!(s_results == p_results, "{s_results} results with SQLite, {p_results} with PostgreSQL");
    println!("\ndemo inbox through `deltadoc run --once` ({s_results} result files each):");
    println!("| ledger | seconds |");
    println!("|---|---|");
    println!("| SQLite | {s_secs:.1} |");
    println!("| PostgreSQL | {p_secs:.1} |");
    println!("PostgreSQL / SQLite: {:.3}", p_secs / s_secs);
    Ok(())
}
