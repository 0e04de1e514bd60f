//! Storage that refuses writes (`src/daemon/storage.rs`): output, quarantine and state folders on
//! small tmpfs mounts that the tests fill up and free again, a state folder on a read-only mount,
//! and inbox and output folders deleted under a running daemon. Nothing partial is left, the log
//! names the path, the daemon stays up, and the held write goes through once there is space,
//! without the document being run again.
//!
//! Mounting needs root or passwordless sudo, as CI has; elsewhere the tmpfs tests skip with a
//! message unless `DELTADOC_OPS_TOOLS=required` (set by `.ci/run`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::sandbox::{Daemon, Sandbox, json_files, metric, wait_for};
use serde_json::Value;

fn corpus_file(rel: &str) -> Vec<u8> {
    std::fs::read(common::corpus_path().join(rel)).unwrap()
}

const CONTRACT: &str = "contracts/commonpaper__Mutual-NDA.md";

/// `mount` and `umount`, through `sudo -n` when this process is not root (`.ci/run` does the
/// same for its packages).
fn as_root(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}

/// A tmpfs of `bytes` mounted at `path` (writable by everyone, like /tmp), unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// `None` (the test skips) where this process may not mount.
    fn mount(path: PathBuf, bytes: u64) -> Option<Self> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = as_root("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=1777")])
            .arg("tmpfs")
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            if std::env::var("DELTADOC_OPS_TOOLS").as_deref() == Ok("required") {
                panic!("cannot mount a tmpfs at {} (needs root or sudo; DELTADOC_OPS_TOOLS=required)", path.display());
            }
            eprintln!("skipped: mounting a tmpfs needs root or sudo");
            return None;
        }
        Some(Self { path })
    }

    /// Fills the file system with `<path>/.filler` until it refuses more.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        // A tmpfs gives its last pages one by one: make sure even a small file fails now.
        assert!(std::fs::write(self.path.join(".probe"), [0u8; 4096]).is_err(), "{} is full", self.path.display());
        let _ = std::fs::remove_file(self.path.join(".probe"));
    }

    /// Frees what [`Tmpfs::fill`] took.
    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    fn filler(&self) -> PathBuf {
        self.path.join(".filler")
    }

    /// Remounts read-only (`true`) or writable.
    fn read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        assert!(as_root("mount").args(["-o", opt]).arg(&self.path).status().unwrap().success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = as_root("umount").arg("-l").arg(&self.path).status();
    }
}

fn readyz(d: &Daemon) -> (u16, Value) {
    let (code, body) = d.get("/readyz");
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz body is not JSON ({e}): {body}")))
}

/// The failed `storage` check of `/readyz`, once there is one.
fn storage_refusal(d: &Daemon) -> String {
    wait_for("/readyz to fail its storage check", Duration::from_secs(30), || {
        let (code, r) = readyz(d);
        let failed = r["checks"].as_array()?.iter().find(|c| c["check"] == "storage" && c["ok"] == false)?.clone();
        assert_eq!(code, 503, "{r}");
        Some(failed["detail"].as_str().unwrap().to_string())
    })
}

/// Every file under `dir`, by path relative to it (hidden ones too: a temporary file left over
/// would show here).
fn files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(dir).iter().map(|p| p.strip_prefix(dir).unwrap().display().to_string()).collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// The ledger's job for `rel_path`.
fn job(sb: &Sandbox, rel_path: &str) -> Value {
    let status = sb.status();
    status["recent"].as_array().unwrap().iter().find(|j| j["rel_path"] == rel_path).unwrap_or_else(|| panic!("{status}")).clone()
}

/// A result that cannot be written because the output folder is full is held: no partial file,
/// the log and `/readyz` name the path, the job is neither retried nor quarantined. A drain
/// puts it back in the queue without counting the attempt; once space returns, the next
/// daemon writes it, exactly once.
#[test]
fn a_full_output_folder_holds_the_result_until_space_returns() {
    let sb = Sandbox::new("", 4096);
    let Some(out) = Tmpfs::mount(sb.path("out"), 1 << 20) else { return };
    out.fill();
    let d = sb.serve();
    std::fs::write(sb.path("inbox/nda.md"), corpus_file(CONTRACT)).unwrap();
    let result = sb.path("out/p/nda.md.json");
    let line = d.wait_log("the output folder refuses the write", Duration::from_secs(120));
    assert!(line.contains(&result.display().to_string()) && line.contains("No space left on device"), "{line}");
    let detail = storage_refusal(&d);
    assert!(detail.contains(&result.display().to_string()), "{detail}");
    assert_eq!(metric(&d.scrape(), "deltadoc_writes_blocked", &["folder=\"output\""]), Some(1.0));
    assert_eq!(d.get("/livez").0, 200, "alive while it waits");
    // The pause doubles from 1 s: the second and third tries have been made after 4 s.
    d.wait_log("still refused after", Duration::from_secs(10));
    assert_eq!(files(&sb.path("out")), [".filler"], "nothing partial");
    let j = job(&sb, "nda.md");
    assert_eq!((j["state"].as_str(), j["attempts"].as_u64()), (Some("running"), Some(1)), "{j}");

    // A drain ends the wait; the interrupted attempt does not count.
    d.stop();
    let j = job(&sb, "nda.md");
    assert_eq!((j["state"].as_str(), j["attempts"].as_u64()), (Some("queued"), Some(0)), "{j}");

    let d = sb.serve();
    d.wait_log("the output folder refuses the write", Duration::from_secs(120));
    std::fs::write(sb.path("inbox/second.md"), corpus_file(CONTRACT).repeat(2)).unwrap();
    out.free();
    let written = d.wait_log("nda.md.json: written after waiting", Duration::from_secs(60));
    assert!(written.contains("for the output folder"), "{written}");
    wait_for("both results", Duration::from_secs(120), || (sb.results().len() == 2).then_some(()));
    assert_eq!(files(&sb.path("out")), ["p/nda.md.json", "p/second.md.json"]);
    for (name, v) in sb.results() {
        common::sandbox::assert_valid_result(&name, &v);
    }
    wait_for("/readyz to pass", Duration::from_secs(30), || (readyz(&d).0 == 200).then_some(()));
    assert_eq!(metric(&d.scrape(), "deltadoc_writes_blocked", &["folder=\"output\""]), Some(0.0));
    let j = job(&sb, "nda.md");
    assert_eq!((j["state"].as_str(), j["attempts"].as_u64()), (Some("done"), Some(1)), "run once to completion: {j}");
    d.stop();
}

/// A quarantine entry (the error JSON and the copy) that cannot be written is held the same way,
/// and lands whole once space returns; the ledger says quarantined only then.
#[test]
fn a_full_quarantine_folder_holds_the_entry_until_space_returns() {
    let sb = Sandbox::new("", 4096);
    let Some(q) = Tmpfs::mount(sb.path("quarantine"), 1 << 20) else { return };
    q.fill();
    let d = sb.serve();
    let bad = "ocrmypdf__invalid.pdf";
    std::fs::write(sb.path("inbox").join(bad), corpus_file(&format!("malformed/{bad}"))).unwrap();
    let entry = sb.path("quarantine/p").join(bad);
    let line = d.wait_log("the quarantine folder refuses the write", Duration::from_secs(120));
    assert!(line.contains(&entry.display().to_string()) && line.contains("No space left on device"), "{line}");
    storage_refusal(&d);
    assert_eq!(metric(&d.scrape(), "deltadoc_writes_blocked", &["folder=\"quarantine\""]), Some(1.0));
    assert_eq!(files(&sb.path("quarantine")), [".filler"], "nothing partial");
    assert_eq!(job(&sb, bad)["state"], "running");

    q.free();
    d.wait_log("written after waiting", Duration::from_secs(60));
    let j = wait_for("the ledger to say quarantined", Duration::from_secs(30), || {
        let j = job(&sb, bad);
        (j["state"] == "quarantined").then_some(j)
    });
    assert_eq!(j["attempts"], 1, "{j}");
    assert_eq!(files(&sb.path("quarantine")), [format!("p/{bad}"), format!("p/{bad}.error.json")]);
    let (_, e) = json_files(&sb.path("quarantine/p")).into_iter().next().unwrap();
    assert_eq!(e["reason"], j["error"]["reason"], "{e}");
    assert_eq!(std::fs::read(&entry).unwrap(), corpus_file(&format!("malformed/{bad}")));
    assert_eq!(metric(&d.scrape(), "deltadoc_writes_blocked", &["folder=\"quarantine\""]), Some(0.0));
    d.stop();
}

/// The ledger's folder filling up under a running daemon: a file that arrives meanwhile is
/// recorded once space returns, and a job that finishes meanwhile holds its ledger update (the
/// result is already written) until then. The daemon stays up, `/readyz` names the ledger, and
/// the ledger is intact.
#[test]
fn a_full_state_folder_while_running_holds_the_ledger_until_space_returns() {
    let stages = "stages: [{name: summary, kind: summarize, max_new_tokens: 400}]\n";
    let sb = Sandbox::with_stages("", 4096, stages);
    let Some(state) = Tmpfs::mount(sb.path("state"), 4 << 20) else { return };
    let d = sb.serve();
    wait_for("ready", Duration::from_secs(120), || (readyz(&d).0 == 200).then_some(()));
    let ledger_refusal = || {
        wait_for("/readyz to fail its ledger check", Duration::from_secs(30), || {
            let (_, r) = readyz(&d);
            let c = r["checks"].as_array()?.iter().find(|c| c["check"] == "ledger" && c["ok"] == false)?.clone();
            Some(c["detail"].as_str().unwrap().to_string())
        })
    };

    // Full before the files arrive: the ingest thread cannot record them, and says so once.
    state.fill();
    std::fs::write(sb.path("inbox/first.md"), corpus_file(CONTRACT)).unwrap();
    let line = d.wait_log("first.md: database or disk is full", Duration::from_secs(30));
    assert!(line.contains(&sb.path("inbox/first.md").display().to_string()), "{line}");
    std::fs::write(sb.path("inbox/first-b.md"), [corpus_file(CONTRACT), b"\n".to_vec()].concat()).unwrap();
    let refused = ledger_refusal();
    assert!(refused.contains(&sb.path("state/ledger.sqlite3").display().to_string()) && refused.contains("full"), "{refused}");
    assert_eq!(d.get("/livez").0, 200, "alive while the state folder is full");
    std::thread::sleep(Duration::from_secs(3));
    let said = d.log().lines().filter(|l| l.contains("database or disk is full") && l.contains("inbox/")).count();
    assert_eq!(said, 1, "one warning for both files:\n{}", d.log());
    state.free();
    d.wait_log("the state folder takes writes again", Duration::from_secs(60));
    wait_for("the first results", Duration::from_secs(180), || (sb.results().len() == 2).then_some(()));

    // Full while a job runs: its result is written, its ledger update is held.
    std::fs::write(sb.path("inbox/second.md"), corpus_file(CONTRACT).repeat(2)).unwrap();
    d.wait_log("second.md: summary", Duration::from_secs(60));
    state.fill();
    let line = d.wait_log("the state folder refuses the write", Duration::from_secs(120));
    assert!(line.contains("database or disk is full"), "{line}");
    let detail = storage_refusal(&d);
    assert!(detail.starts_with("state folder"), "{detail}");
    assert_eq!(metric(&d.scrape(), "deltadoc_writes_blocked", &["folder=\"state\""]), Some(1.0));
    assert_eq!(d.get("/livez").0, 200);
    state.free();
    d.wait_log("written after waiting", Duration::from_secs(60));
    d.wait_log("second.md: done", Duration::from_secs(30));
    wait_for("/readyz to pass", Duration::from_secs(30), || (readyz(&d).0 == 200).then_some(()));
    d.stop();
    for name in ["first.md", "first-b.md", "second.md"] {
        let j = job(&sb, name);
        assert_eq!((j["state"].as_str(), j["attempts"].as_u64()), (Some("done"), Some(1)), "{j}");
    }
    assert_eq!(files(&sb.path("out")), ["p/first-b.md.json", "p/first.md.json", "p/second.md.json"]);
    let integrity = Command::new("python3")
        .args(["-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])"])
        .arg(sb.path("state/ledger.sqlite3"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&integrity.stdout).trim(), "ok");
}

/// A state folder the daemon cannot write stops the start with a message naming it and the
/// cause, before anything else happens.
#[test]
fn an_unusable_state_folder_stops_the_start_naming_it() {
    let sb = Sandbox::new("", 4096);
    let Some(state) = Tmpfs::mount(sb.path("state"), 1 << 20) else { return };
    let refused = |cause: &str| {
        let out = sb.run(&["run", "--once"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        let named = format!("state folder {}: cannot write", sb.path("state").display());
        assert!(err.contains(&named) && err.contains(cause), "{err}");
    };
    state.fill();
    refused("No space left on device");
    state.free();
    sb.run_once();
    state.read_only(true);
    refused("Read-only file system");
    state.read_only(false);
    sb.run_once();
}

/// An inbox removed while watched is watched again when it comes back (its new files arrive by
/// inotify, not by the hourly rescan), and an output folder deleted while running is made again.
#[test]
fn removed_inbox_and_output_folders_come_back() {
    let sb = Sandbox::new("", 4096);
    let cfg = std::fs::read_to_string(sb.path("config/deltadoc.yaml")).unwrap();
    sb.write("config/deltadoc.yaml", &cfg.replace("rescan_interval: 2s", "rescan_interval: 1h"));
    let d = sb.serve();
    std::fs::write(sb.path("inbox/first.md"), corpus_file(CONTRACT)).unwrap();
    wait_for("the first result", Duration::from_secs(120), || (sb.results().len() == 1).then_some(()));
    let by_inotify = |d: &Daemon| metric(&d.scrape(), "deltadoc_watch_events_total", &["source=\"inotify\""]).unwrap();
    let before = by_inotify(&d);

    std::fs::remove_dir_all(sb.path("inbox")).unwrap();
    std::fs::remove_dir_all(sb.path("out")).unwrap();
    let line = d.wait_log("was removed or moved away", Duration::from_secs(10));
    assert!(line.contains(&sb.path("inbox").display().to_string()), "{line}");
    assert_eq!(readyz(&d).0, 503, "an inbox is missing");
    assert_eq!(d.get("/livez").0, 200);

    std::fs::create_dir(sb.path("inbox")).unwrap();
    d.wait_log("is reachable again", Duration::from_secs(10));
    std::fs::write(sb.path("inbox/second.md"), corpus_file(CONTRACT).repeat(2)).unwrap();
    wait_for("the second result", Duration::from_secs(120), || (sb.results().len() == 1).then_some(()));
    assert_eq!(files(&sb.path("out")), ["p/second.md.json"]);
    assert_eq!(by_inotify(&d), before + 1.0, "the new file came by inotify");
    assert_eq!(metric(&d.scrape(), "deltadoc_rescan_found_total", &[]), Some(0.0));
    d.stop();
}
