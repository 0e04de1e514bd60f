//! A daemon installation in a temporary folder: config, pipelines, inbox, output, state, and the
//! tiny random-weight model shared by all tests of a binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The tiny model (full vocabulary, random weights), synthesised once per test binary.
pub fn tiny_model() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| synth_tiny("tiny", "fp32")).clone()
}

/// [`tiny_model`] with int8 weights.
pub fn tiny_model_int8() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| synth_tiny("tiny-int8", "int8")).clone()
}

fn synth_tiny(name: &str, precision: &str) -> PathBuf {
    let dir = super::root().join("target/test-models").join(name);
    // Rebuilt when missing or written by an older deltadoc (model-folder format changed).
    if deltadoc::model::ModelDir::open(&dir).is_err() {
        let _ = std::fs::remove_dir_all(&dir);
        super::deltadoc(&["model", "synth", "--shape", "tiny", "--precision", precision, "--out", dir.to_str().unwrap()]);
    }
    dir
}

/// A pipeline stage list that keeps the tiny model's work small.
pub const QUICK_STAGES: &str = "stages:
  - {name: summary, kind: summarize, max_new_tokens: 6}
  - {name: parties, kind: prompt, instruction: \"List the parties.\", max_new_tokens: 4}
";

/// One sandboxed installation.
pub struct Sandbox {
    /// The temporary root (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// Writes `config/deltadoc.yaml` (with `limits` overriding the defaults below) and one
    /// pipeline `p` reading `inbox/`, writing `out/p`, quarantining to `quarantine/p`, with
    /// the [`QUICK_STAGES`].
    pub fn new(pipeline_extra: &str, max_tokens: usize) -> Self {
        Self::with_stages(pipeline_extra, max_tokens, QUICK_STAGES)
    }

    /// [`Sandbox::new`] with other stages (`stages:` and its list).
    pub fn with_stages(pipeline_extra: &str, max_tokens: usize, stages: &str) -> Self {
        Self::with_model(&tiny_model(), pipeline_extra, max_tokens, stages)
    }

    /// [`Sandbox::with_stages`] with another model folder.
    pub fn with_model(model: &Path, pipeline_extra: &str, max_tokens: usize, stages: &str) -> Self {
        let s = Self { dir: tempfile::tempdir().unwrap() };
        s.write(
            "config/deltadoc.yaml",
            &format!(
                "model: {{path: {model:?}}}
threads: 1
memory_budget: 8GiB
state_dir: state
pipelines: pipelines
metrics: {{enabled: true, listen: \"127.0.0.1:0\"}}
ingest: {{rescan_interval: 2s, stable_window: 1s, poll_only: false, ignore: [\".*\", \"*.tmp\", \"*.part\"]}}
limits: {{max_file_bytes: 64MiB, max_pages: 2000, document_timeout: 10m, extract_timeout: 60s, extract_memory: 2GiB,
  max_attempts: 1, retry_backoff: 1s}}
"
            ),
        );
        s.write(
            "pipelines/p.yaml",
            &format!(
                "name: p
inboxes: [{{path: inbox}}]
output: out/p
quarantine: quarantine/p
quarantine_mode: copy
context: {{max_tokens: {max_tokens}, overlap: 64}}
{pipeline_extra}{stages}"
            ),
        );
        std::fs::create_dir_all(s.path("inbox")).unwrap();
        s
    }

    /// Copies every file of a corpus folder into the inbox; their names.
    pub fn fill_inbox(&self, corpus_dir: &str) -> Vec<String> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(super::corpus_path().join(corpus_dir)).unwrap().flatten() {
            std::fs::copy(e.path(), self.path("inbox").join(e.file_name())).unwrap();
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names
    }

    /// `deltadoc run --once`, which must succeed.
    pub fn run_once(&self) {
        let out = self.run(&["run", "--once"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// A path inside the sandbox.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file (creating folders).
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// `deltadoc <args> --config <sandbox config>`, whatever its status.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.run_with(args, &[])
    }

    /// [`Sandbox::run`] with more environment variables.
    pub fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let cfg = self.path("config/deltadoc.yaml");
        Command::new(env!("CARGO_BIN_EXE_deltadoc"))
            .args(args)
            .args(["--config", cfg.to_str().unwrap()])
            .env("DELTADOC_LOG", "warn")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// Starts `deltadoc serve`; returns the process and the metrics URL's address.
    pub fn serve(&self) -> Daemon {
        self.serve_with(&[])
    }

    /// [`Sandbox::serve`] with more environment variables (`DELTADOC_<FIELD>` overrides).
    pub fn serve_with(&self, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deltadoc"));
        // Tests crash the daemon on purpose (tests/daemon.rs): no core file in the checkout.
        // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        let mut child = cmd
            .args(["serve", "--config", self.path("config/deltadoc.yaml").to_str().unwrap()])
            .env("DELTADOC_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let err = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let d = Daemon { child, lines, metrics_addr: String::new() };
        let addr = d.wait_log("metrics at http://", Duration::from_secs(120));
        let addr = addr.split("http://").nth(1).unwrap().split('/').next().unwrap().to_string();
        Daemon { metrics_addr: addr, ..d }
    }

    /// Result JSONs under `out/p`, by path relative to it.
    pub fn results(&self) -> Vec<(PathBuf, Value)> {
        json_files(&self.path("out/p"))
    }

    /// The ledger as `status --json` prints it.
    pub fn status(&self) -> Value {
        let out = self.run(&["status", "--json", "--recent", "1000"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Every `*.json` file under `dir` (recursively), parsed.
pub fn json_files(dir: &Path) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), v));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A running `deltadoc serve`.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its log lines so far.
    pub lines: Arc<Mutex<Vec<String>>>,
    /// host:port of /metrics.
    pub metrics_addr: String,
}

impl Daemon {
    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(t.elapsed() < timeout, "no log line with {needle:?} after {timeout:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// `GET path` on the metrics listener: status code and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.request(&format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n"))
    }

    /// `POST path` of `body` (JSON) on the metrics listener: status code and body.
    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        let head = format!("POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}", body.len());
        self.request(&format!("{head}\r\n\r\n{body}"))
    }

    fn request(&self, request: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(&self.metrics_addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, body.to_string())
    }

    /// The Prometheus exposition.
    pub fn scrape(&self) -> String {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "daemon exited with {st} after SIGTERM:\n{}", self.log());
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "daemon did not stop after SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits until `f` returns `Some`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Value of a metric line `name{labels} value` whose labels contain all of `labels`.
pub fn metric(exposition: &str, name: &str, labels: &[&str]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            (series == name || series.starts_with(&format!("{name}{{"))) && labels.iter().all(|x| series.contains(x))
        })
        .and_then(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

/// Checks a result against config/result.schema.json.
pub fn assert_valid_result(name: &Path, v: &Value) {
    static SCHEMA: OnceLock<jsonschema::Validator> = OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        let s: Value = serde_json::from_str(deltadoc::output::RESULT_SCHEMA).unwrap();
        jsonschema::validator_for(&s).unwrap()
    });
    let errors: Vec<String> = schema.iter_errors(v).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{} does not match the result schema:\n{}", name.display(), errors.join("\n"));
}
