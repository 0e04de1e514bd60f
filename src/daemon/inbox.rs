//! What an inbox admits: filters (include/exclude globs, ignored temp and hidden names, no
//! symlinks or special files), the stability check that keeps half-written files out until
//! their size and mtime settle and they open, and the inotify watcher that reports new files
//! between rescans.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use globset::{GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};

use crate::config::{GlobPattern, Location, Pipeline};

/// How a file was noticed (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Seen {
    /// A filesystem event.
    Event,
    /// A periodic or start-up scan.
    Scan,
    /// A listing of a bucket its store's notification asked for (`POST /notify/s3`).
    Notification,
}

impl Seen {
    /// Label value.
    pub fn name(self) -> &'static str {
        match self {
            Seen::Event => "inotify",
            Seen::Scan => "rescan",
            Seen::Notification => "notification",
        }
    }
}

/// One inbox of one pipeline, with its filters compiled.
pub struct Inbox {
    /// The pipeline's name.
    pub pipeline: String,
    /// The folder (absolute) or bucket prefix.
    pub root: Location,
    include: Option<GlobSet>,
    exclude: GlobSet,
    /// Sub-folders are watched and scanned.
    pub recursive: bool,
}

/// A file that passed the filters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The pipeline's name.
    pub pipeline: String,
    /// Inbox folder.
    pub inbox: PathBuf,
    /// Path relative to the inbox.
    pub rel: PathBuf,
}

impl Candidate {
    /// Absolute path.
    pub fn path(&self) -> PathBuf {
        self.inbox.join(&self.rel)
    }
}

fn globset(globs: &[GlobPattern]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(g.glob.clone());
    }
    Ok(b.build()?)
}

/// The inboxes of all pipelines.
pub fn inboxes(pipelines: &[Pipeline]) -> Result<Vec<Inbox>> {
    let mut out = Vec::new();
    for p in pipelines {
        for (spec, root) in p.spec.inboxes.iter().zip(&p.inboxes) {
            out.push(Inbox {
                pipeline: p.name().to_string(),
                root: root.clone(),
                include: if spec.include.is_empty() { None } else { Some(globset(&spec.include)?) },
                exclude: globset(&spec.exclude)?,
                recursive: spec.recursive,
            });
        }
    }
    Ok(out)
}

/// Filters shared by all inboxes: ignored names.
pub struct Filters {
    ignore: GlobSet,
}

impl Filters {
    /// From the daemon's `ingest.ignore` list.
    pub fn new(ignore: &[GlobPattern]) -> Result<Self> {
        Ok(Self { ignore: globset(ignore)? })
    }

    /// True when any component of `rel` is an ignored name (e.g. inside a `.sync/` folder).
    fn ignored(&self, rel: &Path) -> bool {
        rel.components().any(|c| self.ignore.is_match(Path::new(c.as_os_str())))
    }

    /// Whether the name `rel` (relative to the inbox, a file's or an object's) passes the
    /// inbox's filters.
    pub fn wanted(&self, inbox: &Inbox, rel: &Path) -> bool {
        !(rel.as_os_str().is_empty()
            || (!inbox.recursive && rel.components().count() > 1)
            || self.ignored(rel)
            || inbox.include.as_ref().is_some_and(|g| !g.is_match(rel))
            || inbox.exclude.is_match(rel))
    }

    /// The candidate for `path` if it belongs to the folder inbox `inbox` and passes its
    /// filters; `Err` names a refused file (symlink, special file) worth a warning.
    pub fn admit(&self, inbox: &Inbox, path: &Path) -> Result<Option<Candidate>, String> {
        let Location::Folder(root) = &inbox.root else { return Ok(None) };
        let Ok(rel) = path.strip_prefix(root) else { return Ok(None) };
        if !self.wanted(inbox, rel) {
            return Ok(None);
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(None) };
        let ft = meta.file_type();
        if ft.is_symlink() {
            return Err(format!("{}: symbolic link refused (documents must be regular files in the inbox)", path.display()));
        }
        if ft.is_dir() {
            return Ok(None);
        }
        if !ft.is_file() {
            return Err(format!("{}: not a regular file (device, socket or FIFO); refused", path.display()));
        }
        Ok(Some(Candidate { pipeline: inbox.pipeline.clone(), inbox: root.clone(), rel: rel.to_path_buf() }))
    }

    /// Every admissible file under the folder inbox `root`; refusals go to `refused`.
    pub fn scan(&self, inbox: &Inbox, root: &Path, out: &mut Vec<Candidate>, refused: &mut Vec<String>) -> Result<()> {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).with_context(|| format!("{}: cannot read inbox folder", dir.display()))?;
            for e in entries.flatten() {
                let path = e.path();
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    if inbox.recursive && path.strip_prefix(root).is_ok_and(|r| !self.ignored(r)) {
                        stack.push(path);
                    }
                    continue;
                }
                match self.admit(inbox, &path) {
                    Ok(Some(c)) => out.push(c),
                    Ok(None) => {}
                    Err(why) => refused.push(why),
                }
            }
        }
        Ok(())
    }
}

/// Size and modification time of a file, the stability signature.
pub fn signature(path: &Path) -> Option<(u64, i64)> {
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_file().then(|| (m.len(), m.mtime() * 1_000_000_000 + m.mtime_nsec()))
}

/// True when the file opens for reading and no writer holds an exclusive lock on it.
pub fn opens(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else { return false };
    // SAFETY: flock on a descriptor we own; a shared non-blocking lock only probes.
    let locked = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0;
    !locked
}

struct Pending {
    sig: (u64, i64),
    since: Instant,
}

/// Files waiting for a stable size and mtime.
pub struct Stability {
    window: Duration,
    pending: HashMap<Candidate, Pending>,
    /// Files already handed on, with the signature they had: unchanged ones are not re-checked.
    settled: HashMap<Candidate, (u64, i64)>,
}

impl Stability {
    /// With the configured window.
    pub fn new(window: Duration) -> Self {
        Self { window, pending: HashMap::new(), settled: HashMap::new() }
    }

    /// Notes a sighting; returns true when the file is new to the tracker (not pending, and
    /// not settled with the same signature).
    pub fn observe(&mut self, c: Candidate, now: Instant) -> bool {
        let Some(sig) = signature(&c.path()) else {
            self.pending.remove(&c);
            return false;
        };
        if self.settled.get(&c) == Some(&sig) {
            return false;
        }
        match self.pending.get_mut(&c) {
            Some(p) => {
                if p.sig != sig {
                    p.sig = sig;
                    p.since = now;
                }
                false
            }
            None => {
                self.pending.insert(c, Pending { sig, since: now });
                true
            }
        }
    }

    /// Files whose signature held for the whole window and that open; they leave the pending set.
    pub fn take_ready(&mut self, now: Instant) -> Vec<(Candidate, (u64, i64))> {
        let mut ready = Vec::new();
        let mut gone = Vec::new();
        for (c, p) in self.pending.iter_mut() {
            match signature(&c.path()) {
                None => gone.push(c.clone()),
                Some(sig) if sig != p.sig => {
                    p.sig = sig;
                    p.since = now;
                }
                Some(sig) if now.duration_since(p.since) >= self.window && opens(&c.path()) => ready.push((c.clone(), sig)),
                Some(_) => {}
            }
        }
        for c in gone {
            self.pending.remove(&c);
        }
        for (c, sig) in &ready {
            self.pending.remove(c);
            self.settled.insert(c.clone(), *sig);
        }
        ready
    }

    /// Files still waiting, per pipeline.
    pub fn waiting(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for c in self.pending.keys() {
            *m.entry(c.pipeline.clone()).or_default() += 1;
        }
        m
    }

    /// Forgets a settled file (it moved away or must be looked at again).
    pub fn forget(&mut self, c: &Candidate) {
        self.settled.remove(c);
    }
}

/// The idempotency key of a job: content, pipeline, its version, and the model.
pub fn job_key(sha256: &str, pipeline: &str, version: u32, model: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("{sha256}\n{pipeline}\n{version}\n{model}").as_bytes());
    crate::util::hex(&h.finalize())
}

/// What the watcher reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Noticed {
    /// A file was created, written or renamed in.
    File(PathBuf),
    /// An inbox folder itself was removed or moved away: its watch is gone.
    Gone(PathBuf),
}

/// The inotify watcher over the inboxes. An inbox that is missing at start, or removed or moved
/// away while watched, has no watch; [`Watch::rewatch`] gives it one again once it is back.
pub struct Watch {
    watcher: notify::RecommendedWatcher,
    roots: Vec<(PathBuf, bool)>,
    /// Inboxes without a watch.
    lost: HashSet<PathBuf>,
    /// Inboxes that are folders but could not be watched, said once.
    refused: HashSet<PathBuf>,
    last_try: Instant,
}

impl Watch {
    /// Starts the watcher and watches every inbox that can be watched now; events go to `tx`.
    /// `Err` (the reason) when the platform refuses a watcher at all: the periodic rescan then
    /// does all the work.
    pub fn start(roots: &[(PathBuf, bool)], tx: Sender<Noticed>) -> Result<Self, String> {
        use notify::EventKind;
        use notify::event::{ModifyKind, RenameMode};
        let inboxes: HashSet<PathBuf> = roots.iter().map(|(r, _)| r.clone()).collect();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            let gone = matches!(ev.kind, EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)));
            let file = matches!(ev.kind, EventKind::Create(_) | EventKind::Modify(_));
            for p in ev.paths {
                let _ = tx.send(if gone && inboxes.contains(&p) {
                    Noticed::Gone(p)
                } else if file {
                    Noticed::File(p)
                } else {
                    continue;
                });
            }
        })
        .map_err(|e| format!("cannot start the file watcher: {e}"))?;
        let lost = roots.iter().map(|(r, _)| r.clone()).collect();
        let mut w = Self { watcher, roots: roots.to_vec(), lost, refused: HashSet::new(), last_try: Instant::now() };
        w.watch_lost();
        Ok(w)
    }

    /// Drops the watch of an inbox that is gone.
    pub fn lost(&mut self, root: &Path) {
        use notify::Watcher;
        // inotify has already dropped the watch of a removed folder; a moved one still has it.
        let _ = self.watcher.unwatch(root);
        self.lost.insert(root.to_path_buf());
    }

    /// Watches the inboxes without a watch that are folders again (at most once a second);
    /// returns whether one was.
    pub fn rewatch(&mut self) -> bool {
        if self.lost.is_empty() || self.last_try.elapsed() < Duration::from_secs(1) {
            return false;
        }
        self.last_try = Instant::now();
        self.watch_lost()
    }

    fn watch_lost(&mut self) -> bool {
        use notify::{RecursiveMode, Watcher};
        let before = self.lost.len();
        for (root, recursive) in &self.roots {
            if self.lost.contains(root) && root.is_dir() {
                let mode = if *recursive { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
                match self.watcher.watch(root, mode) {
                    Ok(()) => {
                        self.lost.remove(root);
                    }
                    Err(e) => {
                        if self.refused.insert(root.clone()) {
                            tracing::warn!("{}: cannot watch ({e}); the periodic rescan finds its files", root.display());
                        }
                    }
                }
            }
        }
        self.lost.len() < before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stability_waits_for_the_window_and_restarts_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let c = Candidate { pipeline: "p".into(), inbox: dir.path().into(), rel: "a.txt".into() };
        std::fs::write(c.path(), "part").unwrap();
        let mut s = Stability::new(Duration::from_millis(200));
        let t0 = Instant::now();
        assert!(s.observe(c.clone(), t0));
        assert!(s.take_ready(t0 + Duration::from_millis(100)).is_empty());
        std::fs::write(c.path(), "partial write").unwrap();
        assert!(s.take_ready(t0 + Duration::from_millis(250)).is_empty(), "changed size restarts the window");
        let ready = s.take_ready(t0 + Duration::from_millis(500));
        assert_eq!(ready.len(), 1);
        assert!(!s.observe(c, t0 + Duration::from_millis(600)), "settled and unchanged");
    }
}
