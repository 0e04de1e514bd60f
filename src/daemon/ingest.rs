//! The ingest thread: watches the inboxes (inotify plus a full rescan every `rescan_interval`),
//! waits until each file is stable, hashes it and records it in the ledger, which hands it to
//! the worker. Nothing else passes between the two threads.
//!
//! Bucket inboxes are listed at each rescan (object stores send no events to a poller), and at
//! once when their store's event notification names the bucket ([`Notified`], at most once a
//! second): the rescan stays the guarantee, a notification only comes sooner. An object is whole
//! once it is listed, so it needs no stability window: a new key, or a new version (ETag) of a
//! known one, is hashed as it streams from the store and recorded.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};

use super::Mode;
use super::events::{FileNoticed, FileRecorded, InboxesRescanned, InternalEvent, ObjectStoreFailed};
use super::inbox::{self, Candidate, Filters, Inbox, Noticed, Seen, Stability, Watch};
use super::metrics::Metrics;
use super::signals::Signals;
use super::storage;
use crate::bucket::{Bucket, BucketUrl, Listed, Stores};
use crate::config::{Config, DuplicatePolicy, Location, Pipeline};
use crate::ledger::{self, Ledger, NewJob};

/// Buckets named by store notifications (`POST /notify/s3`, `daemon/http.rs`) since the ingest
/// thread last looked.
#[derive(Debug, Default)]
pub(crate) struct Notified {
    /// `None` inside: a notification that named no bucket deltadoc could read, so all.
    buckets: Mutex<Option<BTreeSet<String>>>,
    pending: AtomicBool,
}

impl Notified {
    /// A notification naming `buckets` (`None`: unreadable, list every bucket inbox).
    pub fn add(&self, buckets: Option<Vec<String>>) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let was_pending = self.pending.swap(true, Ordering::SeqCst);
        *b = match (was_pending, b.take(), buckets) {
            (true, None, _) | (_, _, None) => None,
            (true, Some(mut have), Some(new)) => {
                have.extend(new);
                Some(have)
            }
            (false, _, Some(new)) => Some(new.into_iter().collect()),
        };
    }

    /// What was notified since the last call: `None` when nothing was, `Some(None)` for all.
    fn take(&self) -> Option<Option<BTreeSet<String>>> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        self.pending.swap(false, Ordering::SeqCst).then(|| b.take())
    }
}

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
    /// Buckets whose stores said something changed.
    pub notified: &'a Notified,
    /// The daemon's bucket clients.
    pub stores: &'a Stores,
}

/// Inboxes that failed to list, and refusals already reported, so each is said once.
#[derive(Default)]
struct Reported {
    unreachable: HashSet<Location>,
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
        let mut buckets = Buckets { stores: self.stores, recorded: HashMap::new() };
        let mut stability = Stability::new(d.ingest.stable_window.0);
        let (tx, rx) = mpsc::channel();
        // Kept alive for the loop's lifetime: dropping it stops the events.
        let mut watch = if self.mode == Mode::Serve && !d.ingest.poll_only {
            let roots: Vec<(PathBuf, bool)> = inboxes
                .iter()
                .filter_map(|i| match &i.root {
                    Location::Folder(root) => Some((root.clone(), i.recursive)),
                    Location::Bucket(_) => None,
                })
                .collect();
            Watch::start(&roots, tx)
                .map_err(|e| tracing::warn!("{e}; relying on rescans every {:?}", d.ingest.rescan_interval.0))
                .ok()
        } else {
            None
        };
        let watching = watch.is_some();
        let mut last_scan: Option<Instant> = None;
        let mut last_notified = Instant::now();
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
                        if reported.unreachable.insert(Location::Folder(root.clone())) {
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
                let all = Listing { only: None, source: Seen::Scan };
                self.list_buckets(&mut *ledger, &inboxes, &filters, &mut buckets, &mut reported, &all);
                InboxesRescanned { seconds: last_scan.map_or(0.0, |t| t.elapsed().as_secs_f64()) }.emit(self.metrics);
            }
            if last_notified.elapsed() >= Duration::from_secs(1)
                && let Some(only) = self.notified.take()
            {
                last_notified = Instant::now();
                let listing = Listing { only: only.as_ref(), source: Seen::Notification };
                self.list_buckets(&mut *ledger, &inboxes, &filters, &mut buckets, &mut reported, &listing);
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
            let Location::Folder(root) = &inbox.root else { continue };
            match filters.scan(inbox, root, &mut found, &mut refused) {
                Ok(()) => {
                    if reported.unreachable.remove(&inbox.root) {
                        tracing::info!("inbox {} is reachable again", inbox.root);
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

    /// Lists the bucket inboxes `listing` names and records their new objects and new versions.
    fn list_buckets(
        &self,
        ledger: &mut dyn Ledger,
        inboxes: &[Inbox],
        filters: &Filters,
        buckets: &mut Buckets<'_>,
        reported: &mut Reported,
        listing: &Listing,
    ) {
        for inbox in inboxes {
            let Location::Bucket(url) = &inbox.root else { continue };
            if listing.only.is_some_and(|only| !only.contains(&url.bucket)) {
                continue;
            }
            let listed = buckets.stores.bucket(&url.bucket).and_then(|b| Ok((b.list(&url.prefix)?, b)));
            let (objects, bucket) = match listed {
                Ok(l) => l,
                Err(error) => {
                    let first = reported.unreachable.insert(inbox.root.clone());
                    ObjectStoreFailed { error: &error.context(format!("inbox {url}")), first }.emit(self.metrics);
                    continue;
                }
            };
            if reported.unreachable.remove(&inbox.root) {
                tracing::info!("inbox {url} is reachable again");
            }
            let known = buckets.recorded.remove(&inbox.root).unwrap_or_default();
            let mut recorded = HashMap::new();
            for o in objects {
                // Keys ending in `/` are the folder markers some tools create.
                let Some(rel) = o.key.strip_prefix(&url.prefix).filter(|r| !r.ends_with('/')) else { continue };
                if !filters.wanted(inbox, Path::new(rel)) {
                    continue;
                }
                if known.get(&o.key) == Some(&o.version) {
                    recorded.insert(o.key, o.version);
                    continue;
                }
                FileNoticed { source: listing.source, missed_by_watcher: false }.emit(self.metrics);
                match self.record_object(ledger, &inbox.pipeline, &bucket, url, rel, &o) {
                    Ok(true) => {
                        recorded.insert(o.key, o.version);
                    }
                    // Replaced or removed since the listing: the next one shows what is there.
                    Ok(false) => {}
                    Err(error) if storage::refused(&error) => {
                        let first = reported.unreachable.insert(inbox.root.clone());
                        ObjectStoreFailed { error: &error, first }.emit(self.metrics);
                        break;
                    }
                    Err(e) => tracing::warn!("{}: {e:#}", url.object(&o.key)),
                }
            }
            buckets.recorded.insert(inbox.root.clone(), recorded);
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
        self.discover(ledger, p, &c.inbox, &c.rel, &sha, size)
    }

    /// Hashes an object as it streams from the store (unless this version's hash is known) and
    /// records it; `Ok(false)` when the object changed or went away since it was listed.
    fn record_object(
        &self,
        ledger: &mut dyn Ledger,
        pipeline: &str,
        bucket: &Bucket,
        url: &BucketUrl,
        rel: &str,
        o: &Listed,
    ) -> Result<bool> {
        let p = self.cfg.pipeline(pipeline)?;
        let source = PathBuf::from(url.object(&o.key));
        // The hash cache is keyed by size and modification time; an object's version is its
        // modification, and 64 bits of its digest tell versions apart.
        let version = i64::from_le_bytes(Sha256::digest(o.version.as_bytes())[..8].try_into().expect("8 bytes"));
        let sha = match ledger.cached_hash(p.name(), &source, o.size, version)? {
            Some(s) => s,
            None => {
                if o.size >= BIG_OBJECT {
                    tracing::info!("{}: hashing {} MiB as it downloads", source.display(), o.size >> 20);
                }
                let Some(read) = bucket.read(&o.key, Some(&o.version), u64::MAX, &mut std::io::sink())? else {
                    return Ok(false);
                };
                let s = read.sha256;
                ledger.remember_hash(p.name(), &source, o.size, version, &s)?;
                s
            }
        };
        self.discover(ledger, p, Path::new(&url.to_string()), Path::new(rel), &sha, o.size)?;
        Ok(true)
    }

    /// Records a document of `inbox` in the ledger: a new job, a duplicate, or known already.
    fn discover(&self, ledger: &mut dyn Ledger, p: &Pipeline, inbox: &Path, rel: &Path, sha: &str, size: u64) -> Result<()> {
        let key = inbox::job_key(sha, p.name(), p.spec.version, self.model);
        let job = NewJob {
            key: &key,
            pipeline: p.name(),
            priority: p.spec.priority,
            inbox,
            rel_path: rel,
            sha256: sha,
            size,
            reprocess_duplicates: p.spec.duplicates == DuplicatePolicy::Reprocess,
        };
        let discovery = ledger.discover(&job)?;
        FileRecorded { path: &inbox.join(rel), pipeline: p.name(), discovery }.emit(self.metrics);
        Ok(())
    }
}

/// Which bucket inboxes a listing covers, and why it happens (a metrics label).
struct Listing<'a> {
    /// Only inboxes of these buckets; `None`: all.
    only: Option<&'a BTreeSet<String>>,
    source: Seen,
}

/// Objects this size or larger get a log line while they are hashed or downloaded.
pub(super) const BIG_OBJECT: u64 = 64 << 20;

/// The bucket inboxes' stores, and what each inbox's last listing recorded (key → version), so
/// that a rescan hashes only what is new.
struct Buckets<'a> {
    stores: &'a Stores,
    recorded: HashMap<Location, HashMap<String, String>>,
}
