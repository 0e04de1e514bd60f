//! Extraction in a child process (`deltadoc extract --json FILE`) under a wall-time limit and an
//! address-space cap: a hostile PDF can then crash, hang or balloon without taking the daemon
//! (and the loaded model) with it. Both sides of the protocol are here: [`extract`] starts the
//! child and reads its answer, [`child`] is what the child runs.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{ExtractLimits, Extracted};
use crate::failure::{Failure, Reason};

/// What the child prints on stdout: one JSON object.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Text was extracted.
    Ok(Extracted),
    /// The file was refused, with the reason.
    Error(Failure),
}

/// The child's side: extracts `path` and prints the [`Outcome`] as one JSON object on stdout.
pub fn child(path: &Path, limits: ExtractLimits) -> anyhow::Result<()> {
    let o = match super::extract_file(path, limits) {
        Ok(e) => Outcome::Ok(e),
        Err(f) => Outcome::Error(f),
    };
    println!("{}", serde_json::to_string(&o)?);
    Ok(())
}

/// Limits of one isolated extraction.
#[derive(Clone, Debug)]
pub struct Isolation {
    /// The `deltadoc` executable.
    pub exe: PathBuf,
    /// Killed after this long (`timeout`).
    pub timeout: Duration,
    /// Address-space cap in bytes (`oom` when hit).
    pub memory: u64,
    /// Page limit passed to the extractor.
    pub max_pages: u32,
}

/// Runs the extractor on `path` in a child process and classifies how it ended.
pub fn extract(path: &Path, iso: &Isolation) -> Result<Extracted, Failure> {
    let fail = |reason, msg: String| Failure::new(reason, "extract", format!("{}: {msg}", path.display()));
    let mut cmd = Command::new(&iso.exe);
    cmd.arg("extract").arg("--json").arg("--max-pages").arg(iso.max_pages.to_string()).arg(path);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env("DELTADOC_LOG", "warn");
    let memory = iso.memory;
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: memory as libc::rlim_t, rlim_max: memory as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child =
        cmd.spawn().map_err(|e| fail(Reason::Io, format!("cannot start the extractor {}: {e}", iso.exe.display())))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > iso.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(Reason::Timeout, format!("extraction did not finish within {:?}", iso.timeout)));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(fail(Reason::Io, format!("waiting for the extractor: {e}"))),
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    if status.success()
        && let Ok(o) = serde_json::from_slice::<Outcome>(&out)
    {
        return match o {
            Outcome::Ok(e) => Ok(e),
            Outcome::Error(f) => Err(f),
        };
    }
    let tail: String = err.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
    if err.contains("memory allocation of") || err.contains("capacity overflow") {
        return Err(fail(Reason::Oom, format!("extraction exceeded its memory cap of {} MiB ({tail})", memory >> 20)));
    }
    let how = match status.signal() {
        Some(sig) => format!("extractor crashed (signal {sig})"),
        None => format!("extractor failed ({status})"),
    };
    Err(fail(Reason::Parse, format!("{how}: {tail}")))
}
