//! Where the running jobs are, kept in `<state_dir>/running` as they go: for each document in
//! flight (one record a slot of the worker), the job's id, the step, and how many model steps
//! (prefill chunks and tokens) the attempt has made. The file is overwritten in place without
//! fsync (it must survive the process, not a power cut: a power cut is never the document's
//! fault).
//!
//! After a death the next start reads it to tell an interruption from a document that brings the
//! daemon down. A document can only do that by making the process fault or abort (a native
//! crash in the runtime, a stack overflow, a failed allocation): the handler [`CrashMarker::arm`]
//! installs for those signals marks the record before the process dies. SIGKILL, SIGTERM and
//! power cuts leave no mark. So an interrupted attempt is never counted, and a job is quarantined
//! (`crashed`) only when the process crashed under it `max_attempts` times (at least twice) in a
//! row at the same place, down to the model step (`ledger::Ledger::recover`), and only when it
//! was the one document in flight: with several, nothing tells which one brought the process
//! down, so none is blamed and each runs again. Calls an attempt
//! takes from the job's journal (`stage/journal.rs`) make no model steps, so the attempt after a
//! first crash reaches the same call with fewer: the count in a row starts with it. A crash while a
//! child process decodes the document (extraction, page images) is not the document's doing
//! either: the daemon only waits then; the record says so too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};

/// Bytes of a slot's record: the step name is cut to fit.
const RECORD: usize = 256;

/// Where in each record the fatal-signal handler writes [`FAULTED`].
const FAULT_AT: usize = RECORD - 2;
const FAULTED: u8 = b'C';

/// The marker's file descriptor, for the signal handler (-1 until armed).
static FD: AtomicI32 = AtomicI32::new(-1);
/// Records in the armed marker, for the signal handler.
static SLOTS: AtomicUsize = AtomicUsize::new(0);

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

/// The marker file of one daemon: a record for each of its worker's slots.
pub struct CrashMarker {
    path: PathBuf,
    file: File,
    now: Mutex<Vec<Option<Place>>>,
}

/// One slot's record: where the document it runs is.
#[derive(Clone, Copy)]
pub struct Slot<'m> {
    marker: &'m CrashMarker,
    index: usize,
}

impl CrashMarker {
    /// Opens `state_dir/running` with `slots` records, returning the places of the jobs the
    /// previous process left running.
    pub fn open(state_dir: &Path, slots: usize) -> Result<(Self, Vec<Place>)> {
        let path = state_dir.join("running");
        let left = std::fs::read(&path).map(|b| b.chunks(RECORD).filter_map(parse).collect()).unwrap_or_default();
        let file = File::create(&path).with_context(|| format!("{}: cannot write the crash marker", path.display()))?;
        let m = Self { path, file, now: Mutex::new(vec![None; slots.max(1)]) };
        for i in 0..slots.max(1) {
            m.write(i);
        }
        Ok((m, left))
    }

    /// Installs the handler that marks the records when the process dies of a fatal signal. The
    /// marker must outlive the process's work: the daemon's does.
    pub fn arm(&self) {
        SLOTS.store(self.lock().len(), Ordering::SeqCst);
        FD.store(self.file.as_raw_fd(), Ordering::SeqCst);
        install_handlers();
    }

    /// The record of slot `index` (below the `slots` it was opened with).
    pub fn slot(&self, index: usize) -> Slot<'_> {
        Slot { marker: self, index }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Place>>> {
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut Option<Place>)) {
        change(&mut self.lock()[index]);
        self.write(index);
    }

    fn write(&self, index: usize) {
        let mut rec = match &self.lock()[index] {
            Some(p) => format!("{} {} {} {}", p.job, p.beats, if p.waiting { "W" } else { "-" }, p.step),
            None => String::new(),
        };
        rec.truncate(rec.floor_char_boundary(FAULT_AT - 1));
        let mut bytes = rec.into_bytes();
        bytes.resize(RECORD - 1, b' ');
        bytes.push(b'\n');
        // The handler's mark stays only for a death: any write after it means the process lived.
        bytes[FAULT_AT] = b' ';
        if let Err(e) = self.file.write_at(&bytes, (index * RECORD) as u64) {
            tracing::warn!("{}: cannot update the crash marker: {e}", self.path.display());
        }
    }
}

impl Slot<'_> {
    /// A job's attempt starts.
    pub fn start(&self, job: i64) {
        let place = Place { job, beats: 0, step: String::new(), waiting: false, crashed: false };
        self.marker.update(self.index, |p| *p = Some(place));
    }

    /// The attempt enters `step`.
    pub fn step(&self, step: &str) {
        self.marker.update(self.index, |p| {
            if let Some(p) = p {
                p.step = step.to_string();
            }
        });
    }

    /// A child process starts (`true`) or stops decoding the document.
    pub fn waiting(&self, waiting: bool) {
        self.marker.update(self.index, |p| {
            if let Some(p) = p {
                p.waiting = waiting;
            }
        });
    }

    /// The attempt made one more model step.
    pub fn beat(&self) {
        self.marker.update(self.index, |p| {
            if let Some(p) = p {
                p.beats += 1;
            }
        });
    }

    /// The attempt ended (done, failed or released): nothing is running in this slot.
    pub fn clear(&self) {
        self.marker.update(self.index, |p| *p = None);
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

/// Marks the records, then lets the signal end the process as it would have without this
/// handler: the mark is all it adds. A fault (raised by the kernel at an instruction) goes back
/// to the previous action and the instruction runs again, so Rust's handler still reports a
/// stack overflow by name before aborting; a signal sent with kill(2) or raise(3) is raised
/// again with the default action.
extern "C" fn on_fatal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = FD.load(Ordering::SeqCst);
    if fd >= 0 {
        for slot in 0..SLOTS.load(Ordering::SeqCst) {
            // SAFETY: pwrite is async-signal-safe; the buffer is a static byte.
            unsafe { libc::pwrite(fd, [FAULTED].as_ptr().cast(), 1, (slot * RECORD + FAULT_AT) as libc::off_t) };
        }
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
        let (marker, left) = CrashMarker::open(dir.path(), 1).unwrap();
        assert_eq!(left, vec![]);
        let m = marker.slot(0);
        m.start(7);
        m.step("summary");
        for _ in 0..3 {
            m.beat();
        }
        drop(marker);
        let record = dir.path().join("running");
        let place = parse(&std::fs::read(&record).unwrap()).unwrap();
        assert_eq!(place, Place { job: 7, beats: 3, step: "summary".into(), waiting: false, crashed: false });
        assert_eq!(place.blame(), None, "a kill leaves no mark: never the document's fault");
        // What the fatal-signal handler writes before the process dies.
        std::fs::OpenOptions::new().write(true).open(&record).unwrap().write_at(&[FAULTED], FAULT_AT as u64).unwrap();
        let (marker, left) = CrashMarker::open(dir.path(), 1).unwrap();
        assert_eq!(left[0].blame().as_deref(), Some("summary after 3 model steps"));
        let (_, left) = CrashMarker::open(dir.path(), 1).unwrap();
        assert_eq!(left, vec![], "opening clears it");
        let m = marker.slot(0);
        m.start(8);
        m.step("transcription");
        m.waiting(true);
        std::fs::OpenOptions::new().write(true).open(&record).unwrap().write_at(&[FAULTED], FAULT_AT as u64).unwrap();
        let (marker, left) = CrashMarker::open(dir.path(), 1).unwrap();
        assert_eq!(left[0].blame(), None, "a crash while a child decodes is not the document's fault");
        let m = marker.slot(0);
        m.start(9);
        m.step(&"ä".repeat(300));
        m.clear();
        assert_eq!(CrashMarker::open(dir.path(), 1).unwrap().1, vec![]);
    }

    #[test]
    fn each_document_in_flight_has_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let (marker, _) = CrashMarker::open(dir.path(), 3).unwrap();
        let (a, b, c) = (marker.slot(0), marker.slot(1), marker.slot(2));
        a.start(4);
        b.start(5);
        c.start(6);
        a.step("summary");
        b.step("ocr");
        b.beat();
        c.clear();
        let left: Vec<(i64, String, u64)> =
            CrashMarker::open(dir.path(), 2).unwrap().1.into_iter().map(|p| (p.job, p.step, p.beats)).collect();
        assert_eq!(left, vec![(4, "summary".into(), 0), (5, "ocr".into(), 1)]);
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
        let (marker, _) = CrashMarker::open(dir.path(), 2).unwrap();
        let m = marker.slot(1);
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
            marker.arm();
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
        let record = std::fs::read(dir.path().join("running")).unwrap();
        let place = parse(&record[RECORD..]).unwrap();
        assert_eq!(place.blame().as_deref(), Some("summary after 0 model steps"), "marked as a crash");
        assert_eq!(record[FAULT_AT], FAULTED, "every record is marked");
    }
}
