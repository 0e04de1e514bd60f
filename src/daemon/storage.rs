//! Writes the storage refuses. A full file system, a quota, a read-only remount, lost
//! permissions or a failing device are not the document's fault: a result or a quarantine entry
//! that cannot be written is held, and its write is retried with a growing pause until the
//! storage takes it again (the document is not run again and no attempt is counted). The ledger
//! is held the same way when its folder refuses writes, or when its database (a fleet's
//! PostgreSQL) cannot be reached. Meanwhile `/readyz` fails its `storage`
//! check, `deltadoc_writes_blocked{folder}` is 1, and the log says every retry which path
//! refuses and why. A drain (SIGTERM) ends the wait: the job goes back to the queue.
//!
//! What is written is never partial: results and quarantine entries are replaced atomically
//! (`output.rs`) and the ledger is SQLite with a write-ahead log.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::events::{InternalEvent, WritesBlocked, WritesResumed};
use super::health::Health;
use super::metrics::Metrics;
use super::signals::Signals;

/// The first pause before a refused write is tried again; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Which folder refused (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Folder {
    /// A bucket inbox the worker downloads a document from.
    Inbox,
    /// A pipeline's output folder (results).
    Output,
    /// A pipeline's quarantine folder.
    Quarantine,
    /// The state folder (the SQLite ledger).
    State,
    /// The ledger database of a fleet.
    Ledger,
}

impl Folder {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Folder::Inbox => "inbox",
            Folder::Output => "output",
            Folder::Quarantine => "quarantine",
            Folder::State => "state",
            Folder::Ledger => "ledger",
        }
    }

    /// What it is, for people.
    pub fn what(self) -> &'static str {
        match self {
            Folder::Inbox => "inbox bucket",
            Folder::Output => "output folder",
            Folder::Quarantine => "quarantine folder",
            Folder::State => "state folder",
            Folder::Ledger => "ledger database",
        }
    }

    /// What is held, and what it is once it went through: a download from an inbox bucket, a
    /// write elsewhere.
    pub fn act(self) -> (&'static str, &'static str) {
        match self {
            Folder::Inbox => ("download", "downloaded"),
            _ => ("write", "written"),
        }
    }

    /// Every value, to create the series at zero.
    pub const ALL: [Folder; 5] = [Folder::Inbox, Folder::Output, Folder::Quarantine, Folder::State, Folder::Ledger];
}

/// How a held write ended without succeeding.
#[derive(Debug)]
pub(crate) enum Held {
    /// The storage still refused when a drain was requested.
    Drained(anyhow::Error),
    /// It failed for a reason waiting cannot fix (a file name the file system refuses, say).
    Failed(anyhow::Error),
}

impl Held {
    /// The error, either way.
    pub fn into_error(self) -> anyhow::Error {
        match self {
            Held::Drained(e) | Held::Failed(e) => e,
        }
    }
}

/// Whether `e` is the storage refusing a write (rather than what was being written).
pub(crate) fn refused(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::{PermissionDenied, QuotaExceeded, ReadOnlyFilesystem, StorageFull};
    e.chain().any(|cause| match cause.downcast_ref::<std::io::Error>() {
        Some(io) => {
            matches!(io.kind(), StorageFull | QuotaExceeded | ReadOnlyFilesystem | PermissionDenied)
                || io.raw_os_error() == Some(libc::EIO)
        }
        None => {
            crate::ledger::refused_by_storage(cause)
                || crate::ledger::unreachable(cause)
                || cause.downcast_ref::<crate::bucket::StoreError>().is_some_and(crate::bucket::StoreError::waits)
        }
    })
}

/// What a held write needs of the daemon: the drain flag, and the places its wait shows.
#[derive(Clone, Copy)]
pub(crate) struct Storage<'a> {
    pub metrics: &'a Metrics,
    pub health: &'a Health,
    pub signals: &'a Signals,
}

impl Storage<'_> {
    /// Runs `write` until it succeeds, retrying while the storage refuses it (see the module
    /// docs); `path` is what it writes, for people.
    pub fn hold<T>(&self, folder: Folder, path: &Path, mut write: impl FnMut() -> Result<T>) -> Result<T, Held> {
        let mut blocked: Option<Instant> = None;
        let mut pause = FIRST_PAUSE;
        loop {
            let outcome = write();
            let error = match outcome {
                Err(e) if refused(&e) => e,
                done => {
                    if let Some(since) = blocked {
                        let (health, waited_s, written) = (self.health, since.elapsed().as_secs_f64(), done.is_ok());
                        WritesResumed { folder, path, health, waited_s, written }.emit(self.metrics);
                    }
                    return done.map_err(Held::Failed);
                }
            };
            let first = blocked.is_none();
            let since = *blocked.get_or_insert_with(Instant::now);
            WritesBlocked {
                folder,
                path,
                health: self.health,
                error: &error,
                first,
                blocked_s: since.elapsed().as_secs_f64(),
                retry_in: pause,
            }
            .emit(self.metrics);
            if !self.pause(pause) {
                return Err(Held::Drained(error));
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Sleeps `d` while showing the worker alive; false when a drain is requested.
    fn pause(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.signals.shutdown_requested() {
                return false;
            }
            self.health.beat();
            std::thread::sleep(Duration::from_millis(100));
        }
        !self.signals.shutdown_requested()
    }
}

/// At start: a folder the daemon must write (the state folder, the resume folder) exists (or is
/// created) and takes a durable write. A daemon that cannot keep its ledger there, or would
/// silently lose every checkpoint, must not start; the message names the folder, the setting
/// (`field`) and the cause.
pub(crate) fn check_folder(dir: &Path, what: &str, why: &str, field: &str) -> Result<()> {
    let probe = dir.join(".deltadoc-write-test");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let f = std::fs::File::create(&probe)?;
        std::io::Write::write_all(&mut &f, b"deltadoc")?;
        f.sync_all()?;
        std::fs::remove_file(&probe)
    };
    write().with_context(|| {
        format!("{what} {}: cannot write ({why}; free space, make it writable, or point daemon.{field} elsewhere)", dir.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_refusals_are_told_from_other_failures() {
        let io = |code| anyhow::Error::new(std::io::Error::from_raw_os_error(code)).context("/out/a.pdf.json: cannot write");
        for code in [libc::ENOSPC, libc::EDQUOT, libc::EROFS, libc::EACCES, libc::EPERM, libc::EIO] {
            assert!(refused(&io(code)), "os error {code}");
        }
        for code in [libc::ENAMETOOLONG, libc::EISDIR, libc::ENOTDIR, libc::EINVAL] {
            assert!(!refused(&io(code)), "os error {code}");
        }
        assert!(!refused(&anyhow::anyhow!("no space left on device (only the words)")));
    }

    #[test]
    fn a_refused_write_is_held_until_it_goes_through_and_a_drain_ends_the_wait() {
        let (metrics, health, signals) = (Metrics::new().unwrap(), Health::new(Duration::from_secs(60)), Signals::new());
        let storage = Storage { metrics: &metrics, health: &health, signals: &signals };
        fn full<T>() -> Result<T> {
            Err(anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOSPC)).context("/out/a.json: cannot write"))
        }
        let blocked = || metrics.sample("deltadoc_writes_blocked", &["folder=\"output\""]);
        let mut tries = 0;
        let held = storage.hold(Folder::Output, Path::new("/out/a.json"), || {
            tries += 1;
            if tries == 1 {
                assert!(health.storage_check().ok);
                full()
            } else {
                assert_eq!(blocked(), Some(1.0));
                let c = health.storage_check();
                assert!(!c.ok && c.detail.contains("/out/a.json: cannot write: No space left on device"), "{c:?}");
                Ok(tries)
            }
        });
        assert_eq!(held.unwrap(), 2);
        assert_eq!(blocked(), Some(0.0));
        assert!(health.storage_check().ok);

        let too_long = storage.hold(Folder::Output, Path::new("/out/a.json"), || -> Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG).into())
        });
        assert!(matches!(too_long, Err(Held::Failed(_))), "not the storage's fault: not held");
        let mut tries = 0;
        let then_too_long = storage.hold(Folder::Output, Path::new("/out/a.json"), || -> Result<()> {
            tries += 1;
            if tries == 1 { full() } else { Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG).into()) }
        });
        assert!(matches!(then_too_long, Err(Held::Failed(_))));
        assert_eq!(blocked(), Some(0.0), "no longer held");
        assert!(health.storage_check().ok);

        signals.request_shutdown();
        let drained = storage.hold(Folder::State, Path::new("/state"), full::<()>);
        assert!(matches!(drained, Err(Held::Drained(_))));
        assert_eq!(metrics.sample("deltadoc_writes_blocked", &["folder=\"state\""]), Some(1.0), "still refused when it ended");
    }
}
