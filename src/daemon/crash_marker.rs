//! Where the running job is, kept in `<state_dir>/running` as the job goes: its id, the step,
//! and how many model steps (prefill chunks and tokens) the attempt has made. The file is
//! overwritten in place without fsync (it must survive the process, not a power cut: a power
//! cut is never the document's fault).
//!
//! After a death the next start reads it to tell an interruption from a document that brings the
//! daemon down. A document can only do that by making the process fault or abort (a native
//! crash in the runtime, a stack overflow, a failed allocation): the handler [`CrashMarker::arm`]
//! installs for those signals marks the record before the process dies. SIGKILL, SIGTERM and
//! power cuts leave no mark. So an interrupted attempt is never counted, and a job is quarantined
//! (`crashed`) only when the process crashed under it `max_attempts` times (at least twice) in a
//! row at the same place, down to the model step (`ledger::Ledger::recover`). Calls an attempt
//! takes from the job's journal (`stage/journal.rs`) make no model steps, so the attempt after a
//! first crash reaches the same call with fewer: the count in a row starts with it. A crash while a
//! child process decodes the document (extraction, page images) is not the document's doing
//! either: the daemon only waits then; the record says so too.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};

/// Bytes of the record: the step name is cut to fit.
const RECORD: usize = 256;

/// Where in the record the fatal-signal handler writes [`FAULTED`].
const FAULT_AT: usize = RECORD - 2;
const FAULTED: u8 = b'C';

/// The marker's file descriptor, for the signal handler (-1 until armed).
static FD: AtomicI32 = AtomicI32::new(-1);

/// The signals a crash ends the process with.
const FATAL: [libc::c_int; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGABRT];

/// Where a job was when the daemon last wrote the marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The job.
    pub job: i64,
    /// Model steps the attempt had made.
    pub beats: u64,
    /// The step it was in.
    pub step: String,
    /// A child process was decoding the document: the daemon was only waiting.
    pub waiting: bool,
    /// The process died of a fatal signal (a crash), not of a kill or a power cut.
    pub crashed: bool,
}

impl Place {
    /// The place as the ledger keeps it (step and model steps) when the process crashed there
    /// while working on the document itself; `None` for a kill, or while a child decoded.
    pub fn blame(&self) -> Option<String> {
        (self.crashed && !self.waiting).then(|| self.to_string())
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} after {} model steps", self.step, self.beats)
    }
}

/// The marker file of one daemon.
pub struct CrashMarker {
    path: PathBuf,
    file: File,
    now: RefCell<Option<Place>>,
}

impl CrashMarker {
    /// Opens `state_dir/running`, returning what the previous process left there.
    pub fn open(state_dir: &Path) -> Result<(Self, Option<Place>)> {
        let path = state_dir.join("running");
        let left = std::fs::read(&path).ok().and_then(|b| parse(&b));
        let file = File::create(&path).with_context(|| format!("{}: cannot write the crash marker", path.display()))?;
        let m = Self { path, file, now: RefCell::new(None) };
        m.write();
        Ok((m, left))
    }

    /// Installs the handler that marks the record when the process dies of a fatal signal. The
    /// marker must outlive the process's work: the daemon's does.
    pub fn arm(&self) {
        FD.store(self.file.as_raw_fd(), Ordering::SeqCst);
        install_handlers();
    }

    /// A job's attempt starts.
    pub fn start(&self, job: i64) {
        *self.now.borrow_mut() = Some(Place { job, beats: 0, step: String::new(), waiting: false, crashed: false });
        self.write();
    }

    /// The attempt enters `step`.
    pub fn step(&self, step: &str) {
        if let Some(p) = self.now.borrow_mut().as_mut() {
            p.step = step.to_string();
        }
        self.write();
    }

    /// A child process starts (`true`) or stops decoding the document.
    pub fn waiting(&self, waiting: bool) {
        if let Some(p) = self.now.borrow_mut().as_mut() {
            p.waiting = waiting;
        }
        self.write();
    }

    /// The attempt made one more model step.
    pub fn beat(&self) {
        if let Some(p) = self.now.borrow_mut().as_mut() {
            p.beats += 1;
        }
        self.write();
    }

    /// The attempt ended (done, failed or released): nothing is running.
    pub fn clear(&self) {
        *self.now.borrow_mut() = None;
        self.write();
    }

    fn write(&self) {
        let mut rec = match &*self.now.borrow() {
            Some(p) => format!("{} {} {} {}", p.job, p.beats, if p.waiting { "W" } else { "-" }, p.step),
            None => String::new(),
        };
        rec.truncate(rec.floor_char_boundary(FAULT_AT - 1));
        let mut bytes = rec.into_bytes();
        bytes.resize(RECORD - 1, b' ');
        bytes.push(b'\n');
        // The handler's mark stays only for a death: any write after it means the process lived.
        bytes[FAULT_AT] = b' ';
        if let Err(e) = self.file.write_at(&bytes, 0) {
            tracing::warn!("{}: cannot update the crash marker: {e}", self.path.display());
        }
    }
}

fn parse(bytes: &[u8]) -> Option<Place> {
    let text = std::str::from_utf8(&bytes[..bytes.len().min(FAULT_AT)]).ok()?.trim_end();
    let mut parts = text.splitn(4, ' ');
    let job = parts.next()?.parse().ok()?;
    let beats = parts.next()?.parse().ok()?;
    let waiting = parts.next()? == "W";
    let crashed = bytes.get(FAULT_AT) == Some(&FAULTED);
    Some(Place { job, beats, waiting, crashed, step: parts.next().unwrap_or("").to_string() })
}

/// The actions the fatal signals had before [`install_handlers`] (Rust's stack-overflow report
/// for SIGSEGV and SIGBUS), in [`FATAL`]'s order; the handler hands a fault on to them.
static PREVIOUS: OnceLock<[libc::sigaction; FATAL.len()]> = OnceLock::new();

/// Sets [`on_fatal`] for every signal of [`FATAL`], on the alternate signal stack: a stack
/// overflow leaves no room on the thread's own.
fn install_handlers() {
    // SAFETY: sigaction with a zeroed, then filled struct; the handler only calls
    // async-signal-safe functions (pwrite, sigaction, raise).
    unsafe {
        let mut mine: libc::sigaction = std::mem::zeroed();
        mine.sa_sigaction = on_fatal as *const () as libc::sighandler_t;
        mine.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut mine.sa_mask);
        let mut previous: [libc::sigaction; FATAL.len()] = std::mem::zeroed();
        for (sig, old) in FATAL.iter().zip(previous.iter_mut()) {
            libc::sigaction(*sig, &mine, old);
        }
        // Armed twice (tests): the first saved actions are the ones to hand on to.
        let _ = PREVIOUS.set(previous);
    }
}

/// Marks the record, then lets the signal end the process as it would have without this
/// handler: the mark is all it adds. A fault (raised by the kernel at an instruction) goes back
/// to the previous action and the instruction runs again, so Rust's handler still reports a
/// stack overflow by name before aborting; a signal sent with kill(2) or raise(3) is raised
/// again with the default action.
extern "C" fn on_fatal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: pwrite is async-signal-safe; the buffer is a static byte.
        unsafe { libc::pwrite(fd, [FAULTED].as_ptr().cast(), 1, FAULT_AT as libc::off_t) };
    }
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; sigaction and raise are
    // async-signal-safe. A raised signal stays pending until this handler returns.
    unsafe {
        let sent = info.is_null() || (*info).si_code <= 0;
        let previous = PREVIOUS.get().and_then(|p| FATAL.iter().position(|s| *s == sig).map(|i| &p[i]));
        match previous {
            Some(old) if !sent => {
                libc::sigaction(sig, old, std::ptr::null_mut());
            }
            _ => {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_place_survives_the_process_and_an_ended_attempt_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let (m, left) = CrashMarker::open(dir.path()).unwrap();
        assert_eq!(left, None);
        m.start(7);
        m.step("summary");
        for _ in 0..3 {
            m.beat();
        }
        drop(m);
        let record = dir.path().join("running");
        let place = parse(&std::fs::read(&record).unwrap()).unwrap();
        assert_eq!(place, Place { job: 7, beats: 3, step: "summary".into(), waiting: false, crashed: false });
        assert_eq!(place.blame(), None, "a kill leaves no mark: never the document's fault");
        // What the fatal-signal handler writes before the process dies.
        std::fs::OpenOptions::new().write(true).open(&record).unwrap().write_at(&[FAULTED], FAULT_AT as u64).unwrap();
        let (m, left) = CrashMarker::open(dir.path()).unwrap();
        assert_eq!(left.unwrap().blame().as_deref(), Some("summary after 3 model steps"));
        let (_, left) = CrashMarker::open(dir.path()).unwrap();
        assert_eq!(left, None, "opening clears it");
        m.start(8);
        m.step("transcription");
        m.waiting(true);
        std::fs::OpenOptions::new().write(true).open(&record).unwrap().write_at(&[FAULTED], FAULT_AT as u64).unwrap();
        let (m, left) = CrashMarker::open(dir.path()).unwrap();
        assert_eq!(left.unwrap().blame(), None, "a crash while a child decodes is not the document's fault");
        m.start(9);
        m.step(&"ä".repeat(300));
        m.clear();
        assert_eq!(CrashMarker::open(dir.path()).unwrap().1, None);
    }

    /// Recurses until the stack overflows.
    #[inline(never)]
    fn deeper(n: u64) -> u64 {
        let frame = std::hint::black_box([n; 64]);
        if std::hint::black_box(n) == u64::MAX { frame[0] } else { deeper(n + 1).wrapping_add(frame[1]) }
    }

    #[test]
    fn a_stack_overflow_is_marked_and_still_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = CrashMarker::open(dir.path()).unwrap();
        m.start(4);
        m.step("summary");
        let stderr = File::create(dir.path().join("stderr")).unwrap();
        // SAFETY: the child only redirects stderr, turns core files off, installs the handlers
        // (no allocation) and overflows its stack; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe {
                libc::dup2(stderr.as_raw_fd(), 2);
                libc::setrlimit(libc::RLIMIT_CORE, &libc::rlimit { rlim_cur: 0, rlim_max: 0 });
            }
            m.arm();
            deeper(0);
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        // SAFETY: waitpid and kill on our own child.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            if std::time::Instant::now() > deadline {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("the child did not die of its stack overflow");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let said = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
        assert!(said.contains("has overflowed its stack"), "Rust's report is kept: {said:?}");
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGABRT, "status {status:#x}");
        let place = parse(&std::fs::read(dir.path().join("running")).unwrap()).unwrap();
        assert_eq!(place.blame().as_deref(), Some("summary after 0 model steps"), "marked as a crash");
    }
}
