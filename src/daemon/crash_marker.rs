//! Where the running job is, kept in `<state_dir>/running` as the job goes: its id, the step,
//! and how many model steps (prefill chunks and tokens) the attempt has made. The file is
//! overwritten in place without fsync (it must survive the process, not a power cut: a power
//! cut is never the document's fault).
//!
//! After a crash the next start reads it to tell an interruption from a document that brings the
//! daemon down. A kill from outside lands at a random point; a document that crashes the process
//! does so at the same point every time, down to the model step. So an interrupted attempt is
//! never counted, and a job is quarantined (`crashed`) only when the daemon died under it
//! `max_attempts` times (at least twice) in a row at the same place (`ledger::Ledger::recover`).
//! A death while a child process decodes the document (extraction, page images) is never the
//! document's fault: the daemon only waits then, and the child, not the daemon, would crash.
//! The record says so, and such a death counts as an interruption only.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Bytes of the record: the step name is cut to fit.
const RECORD: usize = 256;

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
}

impl Place {
    /// The place as the ledger keeps it (step and model steps), or `None` when the daemon was
    /// only waiting for a child there.
    pub fn blame(&self) -> Option<String> {
        (!self.waiting).then(|| format!("{} after {} model steps", self.step, self.beats))
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

    /// A job's attempt starts.
    pub fn start(&self, job: i64) {
        *self.now.borrow_mut() = Some(Place { job, beats: 0, step: String::new(), waiting: false });
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
        rec.truncate(rec.floor_char_boundary(RECORD - 1));
        let mut bytes = rec.into_bytes();
        bytes.resize(RECORD - 1, b' ');
        bytes.push(b'\n');
        if let Err(e) = self.file.write_at(&bytes, 0) {
            tracing::warn!("{}: cannot update the crash marker: {e}", self.path.display());
        }
    }
}

fn parse(bytes: &[u8]) -> Option<Place> {
    let text = std::str::from_utf8(bytes).ok()?.trim_end();
    let mut parts = text.splitn(4, ' ');
    let job = parts.next()?.parse().ok()?;
    let beats = parts.next()?.parse().ok()?;
    let waiting = parts.next()? == "W";
    Some(Place { job, beats, waiting, step: parts.next().unwrap_or("").to_string() })
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
        let (m, left) = CrashMarker::open(dir.path()).unwrap();
        let place = left.unwrap();
        assert_eq!(place, Place { job: 7, beats: 3, step: "summary".into(), waiting: false });
        assert_eq!(place.blame().as_deref(), Some("summary after 3 model steps"));
        let (_, left) = CrashMarker::open(dir.path()).unwrap();
        assert_eq!(left, None, "opening clears it");
        m.start(8);
        m.step("transcription");
        m.waiting(true);
        let (m, left) = CrashMarker::open(dir.path()).unwrap();
        assert_eq!(left.unwrap().blame(), None, "a death while a child decodes is not the document's fault");
        m.start(9);
        m.step(&"ä".repeat(300));
        m.clear();
        assert_eq!(CrashMarker::open(dir.path()).unwrap().1, None);
    }
}
