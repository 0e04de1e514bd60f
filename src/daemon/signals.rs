//! SIGTERM/SIGINT ask the daemon to drain (the running document goes back to the queue at its
//! next prefill chunk or token; a second signal exits at once), SIGHUP asks it to reload its
//! configuration between documents. Handlers only set flags; the worker and the ingest thread
//! poll them through a [`Signals`] handle, which tests make their own of.

use std::sync::atomic::{AtomicBool, Ordering};

/// Requests from outside: drain and exit, or reload.
#[derive(Debug, Default)]
pub struct Signals {
    shutdown: AtomicBool,
    reload: AtomicBool,
}

impl Signals {
    /// Flags that no signal handler sets (tests, `deltadoc process` before it installs them).
    pub const fn new() -> Self {
        Self { shutdown: AtomicBool::new(false), reload: AtomicBool::new(false) }
    }

    /// The flag the running document polls: set, it stops at its next chunk or token.
    pub fn shutdown_flag(&self) -> &AtomicBool {
        &self.shutdown
    }

    /// Whether a drain was requested.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Requests a drain (what SIGTERM does).
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Requests a reload (what SIGHUP does, and tests).
    #[cfg(test)]
    pub fn request_reload(&self) {
        self.reload.store(true, Ordering::SeqCst);
    }

    /// Whether a reload was requested since the last call.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::SeqCst)
    }
}

/// The flags the process's signal handlers set.
pub static PROCESS: Signals = Signals::new();

extern "C" fn on_terminate(_: libc::c_int) {
    if PROCESS.shutdown.swap(true, Ordering::SeqCst) {
        // Second signal: the operator wants out now; the ledger still recovers the job.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

extern "C" fn on_hangup(_: libc::c_int) {
    PROCESS.reload.store(true, Ordering::SeqCst);
}

/// Installs the handlers that set [`PROCESS`]'s flags, and returns it.
pub fn install() -> &'static Signals {
    // SAFETY: the handlers only touch atomics and call _exit.
    unsafe {
        let terminate = on_terminate as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, terminate);
        libc::signal(libc::SIGINT, terminate);
        libc::signal(libc::SIGHUP, on_hangup as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    &PROCESS
}
