//! The ingest thread: watches the inboxes (inotify plus a full rescan every `rescan_interval`),
//! waits until each file is stable, hashes it and records it in the ledger, which hands it to
//! the worker. Nothing else passes between the two threads.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::Mode;
use super::events::{FileNoticed, FileRecorded, InternalEvent};
use super::inbox::{self, Candidate, Filters, Inbox, Noticed, Seen, Stability, Watch};
use super::metrics::Metrics;
use super::signals::Signals;
use super::storage;
use crate::config::{Config, DuplicatePolicy};
use crate::ledger::{self, Ledger, NewJob};

/// What the ingest thread works with.
pub(crate) struct Ingest<'a> {
    pub cfg: &'a Config,
    /// Identity of the loaded model (part of every job key).
    pub model: &'a str,
    pub metrics: &'a Metrics,
    /// Files waiting for a stable size, per pipeline, for the queue gauges.
    pub waiting: &'a Mutex<HashMap<String, usize>>,
    pub mode: Mode,
    pub signals: &'a Signals,
    /// Set when a reload replaces this thread.
    pub stop: &'a AtomicBool,
}

/// Inboxes that failed to list, and refusals already reported, so each is said once.
#[derive(Default)]
struct Reported {
    unreachable: HashSet<PathBuf>,
    refused: HashSet<String>,
    /// Files the ledger could not record since the state folder began refusing writes.
    unrecorded: Option<usize>,
}

impl Ingest<'_> {
    /// Watches and records until shutdown (or, once, until everything present at start is
    /// recorded, or until `stop` for a reload).
    pub fn run(&self) -> Result<()> {
        let d = &self.cfg.daemon;
        let mut ledger = ledger::open(d)?;
        let inboxes = inbox::inboxes(&self.cfg.pipelines)?;
        let filters = Filters::new(&d.ingest.ignore)?;
        let mut stability = Stability::new(d.ingest.stable_window.0);
        let (tx, rx) = mpsc::channel();
        // Kept alive for the loop's lifetime: dropping it stops the events.
        let mut watch = if self.mode == Mode::Serve && !d.ingest.poll_only {
            let roots: Vec<(PathBuf, bool)> = inboxes.iter().map(|i| (i.root.clone(), i.recursive)).collect();
            Watch::start(&roots, tx)
                .map_err(|e| tracing::warn!("{e}; relying on rescans every {:?}", d.ingest.rescan_interval.0))
                .ok()
        } else {
            None
        };
        let watching = watch.is_some();
        let mut last_scan: Option<Instant> = None;
        let mut reported = Reported::default();
        loop {
            if self.signals.shutdown_requested() || self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Events first, so a file an event reported is not later counted as a rescan find.
            let wait = Duration::from_millis(if last_scan.is_some() { 200 } else { 0 });
            while let Ok(noticed) = rx.recv_timeout(wait) {
                match noticed {
                    Noticed::File(path) => {
                        for inbox in &inboxes {
                            if let Ok(Some(c)) = filters.admit(inbox, &path)
                                && stability.observe(c, Instant::now())
                            {
                                FileNoticed { source: Seen::Event, missed_by_watcher: false }.emit(self.metrics);
                            }
                        }
                    }
                    Noticed::Gone(root) => {
                        if let Some(w) = watch.as_mut() {
                            w.lost(&root);
                        }
                        if reported.unreachable.insert(root.clone()) {
                            tracing::warn!(
                                "inbox {} was removed or moved away; files dropped into it are found once it is back",
                                root.display()
                            );
                        }
                    }
                }
            }
            // An inbox that is back is scanned at once: what was dropped in since is not a miss.
            if watch.as_mut().is_some_and(Watch::rewatch) {
                last_scan = None;
            }
            if last_scan.is_none_or(|t| t.elapsed() >= d.ingest.rescan_interval.0) {
                // The start-up scan finds what was there before the watcher: not a miss.
                let missed = watching && last_scan.is_some();
                last_scan = Some(Instant::now());
                self.scan(&inboxes, &filters, &mut stability, missed, &mut reported);
            }
            for (c, (size, mtime)) in stability.take_ready(Instant::now()) {
                match self.record(&mut *ledger, &c, size, mtime) {
                    // The file is found again by the rescans. A state folder that refuses writes
                    // refuses them for every file: said once.
                    Err(e) => {
                        stability.forget(&c);
                        if !storage::refused(&e) {
                            tracing::warn!("{}: {e:#}", c.path().display());
                        } else if let Some(n) = reported.unrecorded.as_mut() {
                            *n += 1;
                        } else {
                            tracing::warn!(
                                "{}: {e:#}; files found while the state folder refuses writes are recorded once it takes them again",
                                c.path().display()
                            );
                            reported.unrecorded = Some(1);
                        }
                    }
                    Ok(()) => {
                        if let Some(n) = reported.unrecorded.take() {
                            tracing::info!(
                                "the state folder takes writes again; {n} files that waited are found by the next rescans"
                            );
                        }
                    }
                }
            }
            let waiting = stability.waiting();
            let pending: usize = waiting.values().sum();
            if let Ok(mut g) = self.waiting.lock() {
                *g = waiting;
            }
            if self.mode == Mode::Once {
                if pending == 0 {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Lists every inbox and notes what it holds.
    fn scan(&self, inboxes: &[Inbox], filters: &Filters, stability: &mut Stability, missed: bool, reported: &mut Reported) {
        let mut found = Vec::new();
        let mut refused = Vec::new();
        for inbox in inboxes {
            match filters.scan(inbox, &mut found, &mut refused) {
                Ok(()) => {
                    if reported.unreachable.remove(&inbox.root) {
                        tracing::info!("inbox {} is reachable again", inbox.root.display());
                    }
                }
                Err(e) => {
                    if reported.unreachable.insert(inbox.root.clone()) {
                        tracing::warn!("{e:#}");
                    }
                }
            }
        }
        for why in refused {
            if reported.refused.insert(why.clone()) {
                tracing::warn!("{why}");
            }
        }
        for c in found {
            if stability.observe(c, Instant::now()) {
                FileNoticed { source: Seen::Scan, missed_by_watcher: missed }.emit(self.metrics);
            }
        }
    }

    /// Hashes a stable file and records it in the ledger.
    pub(super) fn record(&self, ledger: &mut dyn Ledger, c: &Candidate, size: u64, mtime: i64) -> Result<()> {
        let p = self.cfg.pipeline(&c.pipeline)?;
        let path = c.path();
        let sha = match ledger.cached_hash(p.name(), &path, size, mtime)? {
            Some(s) => s,
            None => {
                let s = crate::util::sha256_file(&path).context("cannot read")?;
                ledger.remember_hash(p.name(), &path, size, mtime, &s)?;
                s
            }
        };
        let key = inbox::job_key(&sha, p.name(), p.spec.version, self.model);
        let job = NewJob {
            key: &key,
            pipeline: p.name(),
            priority: p.spec.priority,
            inbox: &c.inbox,
            rel_path: &c.rel,
            sha256: &sha,
            size,
            reprocess_duplicates: p.spec.duplicates == DuplicatePolicy::Reprocess,
        };
        let discovery = ledger.discover(&job)?;
        FileRecorded { path: &path, pipeline: p.name(), discovery }.emit(self.metrics);
        Ok(())
    }
}
