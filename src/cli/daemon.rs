//! The daemon's commands: `serve`, `run --once`, `process`, `status`, `retry`, `config check`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::{DaemonArgs, Outcome};
use crate::config::Config;
use crate::daemon::{self, Mode};
use crate::ledger::{self, state};
use crate::schedule;

/// What `deltadoc run` takes.
#[derive(Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Required: one pass (continuous running is `serve`).
    #[arg(long)]
    once: bool,
}

/// What `deltadoc process` takes.
#[derive(Args)]
pub(super) struct ProcessArgs {
    /// The document to process.
    file: PathBuf,
    /// Pipeline name from the configuration (see `config check`).
    #[arg(long)]
    pipeline: String,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// What `deltadoc status` takes.
#[derive(Args)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Recent jobs to list.
    #[arg(long, default_value_t = 20)]
    recent: usize,
    /// One JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// What `deltadoc retry` takes.
#[derive(Args)]
pub(super) struct RetryArgs {
    /// Job id (see `status`).
    job: Option<i64>,
    /// Every failed job.
    #[arg(long, conflicts_with = "job")]
    failed: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// Configuration commands.
#[derive(Subcommand)]
pub(super) enum ConfigCmd {
    /// Validate the daemon configuration and every pipeline; print a summary.
    Check(DaemonArgs),
}

/// Ledger commands.
#[derive(Subcommand)]
pub(super) enum LedgerCmd {
    /// Bring the ledger's schema up to date (daemons do it at start too; several at once
    /// migrate once) and say where it is.
    Migrate(DaemonArgs),
    /// Write everything the configured ledger holds (jobs, runs, hashes) to a JSON file, to move
    /// it to another ledger with `import`. Stop the daemons first: running jobs are written as
    /// queued.
    Export {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Fill the configured ledger, which must hold no jobs yet, from a file `export` wrote; jobs
    /// keep their ids and states, so documents already done are not processed again.
    Import {
        /// The file `export` wrote.
        file: PathBuf,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

/// `deltadoc ledger …`.
pub(super) fn ledger(c: LedgerCmd) -> Result<Outcome> {
    match c {
        LedgerCmd::Migrate(d) => {
            let l = ledger::open(&d.load()?.daemon)?;
            println!("ledger {}: schema up to date", l.describe());
        }
        LedgerCmd::Export { out, daemon } => {
            let mut l = ledger::open(&daemon.load()?.daemon)?;
            let contents = l.export()?;
            let mut bytes = serde_json::to_vec(&contents)?;
            bytes.push(b'\n');
            crate::output::write_atomic(&out, &bytes)?;
            eprintln!(
                "{}: {} jobs, {} schedule runs, {} hashes from ledger {}",
                out.display(),
                contents.jobs.len(),
                contents.runs.len(),
                contents.hashes.len(),
                l.describe()
            );
        }
        LedgerCmd::Import { file, daemon } => {
            let bytes = std::fs::read(&file).with_context(|| format!("{}: cannot read", file.display()))?;
            let contents: ledger::Contents = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a file `deltadoc ledger export` wrote", file.display()))?;
            let mut l = ledger::open(&daemon.load()?.daemon)?;
            l.import(&contents)?;
            eprintln!("{}: {} jobs imported into ledger {}", file.display(), contents.jobs.len(), l.describe());
        }
    }
    Ok(Outcome::Success)
}

/// `deltadoc serve`.
pub(super) fn serve(d: DaemonArgs) -> Result<Outcome> {
    daemon::run(d.load()?, Mode::Serve)?;
    Ok(Outcome::Success)
}

/// `deltadoc run --once`; says where the results landed.
pub(super) fn run_once(r: RunArgs) -> Result<Outcome> {
    if !r.once {
        bail!("`run` needs --once (use `serve` to keep running)");
    }
    let cfg = r.daemon.load()?;
    let outputs: Vec<String> =
        cfg.pipelines.iter().map(|p| format!("{}: {} (failed documents: {})", p.name(), p.output, p.quarantine)).collect();
    daemon::run(cfg, Mode::Once)?;
    eprintln!("results (one JSON per document):\n  {}", outputs.join("\n  "));
    Ok(Outcome::Success)
}

/// `deltadoc process`: the result on stdout, or `{"error": …}` there and the reason on stderr.
pub(super) fn process(a: ProcessArgs) -> Result<Outcome> {
    let cfg = a.daemon.load()?;
    match daemon::process_one(&cfg, &a.pipeline, &a.file)? {
        Ok(r) => {
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(Outcome::Success)
        }
        Err(f) => {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "error": f }))?);
            super::error_line(format_args!("{} ({}, stage {})", f.message, f.reason.name(), f.stage));
            Ok(Outcome::DocumentFailed)
        }
    }
}

/// `deltadoc status`.
pub(super) fn status(s: StatusArgs) -> Result<Outcome> {
    print_status(&s.daemon.load()?, s.recent, s.json)?;
    Ok(Outcome::Success)
}

/// `deltadoc retry JOB | --failed`.
pub(super) fn retry(r: RetryArgs) -> Result<Outcome> {
    if r.job.is_none() && !r.failed {
        bail!("name a job id or give --failed");
    }
    let cfg = r.daemon.load()?;
    let n = ledger::open(&cfg.daemon)?.retry(r.job)?;
    if let Some(id) = r.job
        && n == 0
    {
        bail!("job {id} is not failed, quarantined or done (see `deltadoc status`)");
    }
    eprintln!("{n} job(s) queued again; a running daemon picks them up (or run `deltadoc run --once`)");
    Ok(Outcome::Success)
}

/// `deltadoc config check`: a line per pipeline.
pub(super) fn config(c: ConfigCmd) -> Result<Outcome> {
    let ConfigCmd::Check(d) = c;
    let cfg = d.load()?;
    let src = cfg.file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "built-in defaults".into());
    println!("config {src}: ok (model {}, state {})", cfg.daemon.model.path.display(), cfg.daemon.state_dir.display());
    for p in &cfg.pipelines {
        let when = match &p.spec.schedule {
            Some(s) => format!("cron {:?} {} window {:?}", s.cron.text, s.timezone.name, s.window.0),
            None => "continuous".into(),
        };
        let stages: Vec<String> = p.stages.iter().map(|s| s.describe()).collect();
        println!(
            "pipeline {} v{} ({}): {} inbox(es) -> {}; {when}; stages: {}",
            p.name(),
            p.spec.version,
            p.file.display(),
            p.inboxes.len(),
            p.output,
            stages.join(", ")
        );
    }
    Ok(Outcome::Success)
}

/// `deltadoc status`: queue per pipeline and state, schedules, recent jobs.
fn print_status(cfg: &Config, recent: usize, json: bool) -> Result<()> {
    let mut l = ledger::open(&cfg.daemon)?;
    let counts = l.counts()?;
    let workers = l.workers()?;
    let jobs = l.recent(recent)?;
    let now = jiff::Timestamp::now();
    let mut schedules = Vec::new();
    for p in &cfg.pipelines {
        if let Some(s) = &p.spec.schedule {
            let last = l.last_run(p.name())?;
            let next = schedule::next_fire(s, now).map(|t| t.to_string());
            schedules.push(serde_json::json!({ "pipeline": p.name(), "cron": s.cron.text, "timezone": s.timezone.name,
                "next": next, "last_run": last }));
        }
    }
    let inboxes = crate::daemon::check_inboxes(cfg);
    if json {
        let c: Vec<_> = counts.iter().map(|(p, s, n)| serde_json::json!({"pipeline": p, "state": s, "jobs": n})).collect();
        let i: Vec<_> = inboxes
            .iter()
            .map(|(p, inbox, ok, detail)| serde_json::json!({"pipeline": p, "inbox": inbox, "reachable": ok, "detail": detail}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "ledger": l.describe(), "workers": workers, "counts": c,
                "inboxes": i, "schedules": schedules, "recent": jobs }))?
        );
        return Ok(());
    }
    println!("ledger {}", l.describe());
    for (_, inbox, ok, detail) in &inboxes {
        if *ok {
            println!("inbox {inbox}: reachable");
        } else {
            println!("inbox {inbox}: UNREACHABLE ({detail})");
        }
    }
    if workers.is_empty() {
        println!("no daemon is running");
    }
    for w in &workers {
        let doing = match (&w.document, &w.stage) {
            (Some(d), Some(s)) => format!("job {} {} [{s}]", w.job.unwrap_or_default(), d.display()),
            (Some(d), None) => format!("job {} {}", w.job.unwrap_or_default(), d.display()),
            _ => "idle".into(),
        };
        let health = if w.stale() { " STALE: no heartbeat within its lease" } else { "" };
        println!(
            "worker {} ({}, pid {}): heartbeat {:.0} s ago, {} document(s) done, {doing}{health}",
            w.name, w.host, w.pid, w.heartbeat_age_s, w.documents
        );
    }
    if counts.is_empty() {
        println!("no jobs yet");
    }
    for p in &cfg.pipelines {
        let line: Vec<String> = counts.iter().filter(|(q, _, _)| q == p.name()).map(|(_, s, n)| format!("{s} {n}")).collect();
        if !line.is_empty() {
            println!("{:<16} {}", p.name(), line.join(", "));
        }
    }
    for s in &schedules {
        println!("schedule {}", s);
    }
    if !jobs.is_empty() {
        println!("\n{:>6}  {:<12} {:<12} {:>3}  document", "job", "pipeline", "state", "try");
    }
    for j in jobs {
        let detail = match (&j.error, &j.stage) {
            (Some(e), _) if j.state != state::DONE => format!("  [{}: {}]", e.reason.name(), e.message),
            (_, Some(st)) if j.state == state::RUNNING => format!("  [{st}]"),
            _ => j.duplicate_of.map(|d| format!("  [duplicate of job {d}]")).unwrap_or_default(),
        };
        println!("{:>6}  {:<12} {:<12} {:>3}  {}{detail}", j.id, j.pipeline, j.state, j.attempts, j.rel_path.display());
    }
    Ok(())
}
