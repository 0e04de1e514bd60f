//! The model calls a job's attempts have completed, kept on disk (`<resume_dir>/journal/<job>/`)
//! until the job ends, so that an attempt after a kill, a crash, a drain or a retry takes them
//! from there instead of computing them again. With resumable prefill inside each call
//! (`generate/resumable.rs`), a document makes progress across restarts however long it is:
//! what is lost to a kill is at most the running call's work since its last checkpoint.
//!
//! A call is found again by a key over everything that decides its answer: the model's identity,
//! the prompt's token ids, the decoding options and the schema (for a transcription, the page's
//! pixels and the OCR options). Changing any of them (a new pipeline version, another model)
//! makes a new key, so a journal can never answer a different question. Journals only save time:
//! one that cannot be written or read is reported and the call is computed.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// One job's journal.
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal of job `job` in `resume_dir` (the daemon's, or a fleet's shared one: job ids
    /// are the ledger's).
    pub fn of_job(resume_dir: &Path, job: i64) -> Self {
        Self { dir: Self::root(resume_dir).join(job.to_string()) }
    }

    /// Where every job's journal lives.
    pub fn root(resume_dir: &Path) -> PathBuf {
        resume_dir.join("journal")
    }

    fn file(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{}.json", key.0))
    }

    /// The answer saved under `key`, if any.
    pub fn get<T: DeserializeOwned>(&self, key: &Key) -> Option<T> {
        let path = self.file(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("{}: cannot read the journal entry ({e}); computing the call again", path.display());
                return None;
            }
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| tracing::warn!("{}: unreadable journal entry ({e}); computing the call again", path.display()))
            .ok()
    }

    /// Saves `answer` under `key` (atomically: a kill leaves the old state or the whole entry).
    pub fn put<T: Serialize>(&self, key: &Key, answer: &T) {
        let path = self.file(key);
        let written =
            serde_json::to_vec(answer).map_err(anyhow::Error::from).and_then(|b| crate::output::write_atomic(&path, &b));
        if let Err(e) = written {
            tracing::warn!("cannot keep a model call for a later attempt: {e:#}");
        }
    }

    /// Forgets every entry: the job has ended.
    pub fn clear(&self) {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{}: cannot remove the journal: {e}", self.dir.display()),
        }
    }
}

/// What identifies a model call: a SHA-256 over its inputs, fed field by field.
pub struct Key(String);

/// Builds a [`Key`].
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    /// A key for a call of `kind` (`complete`, `transcribe`) on model `model`.
    pub fn new(kind: &str, model: &str) -> Self {
        Self(Sha256::new()).text(kind).text(model)
    }

    /// Adds a string (length first, so that neighbouring fields cannot run into each other).
    pub fn text(mut self, s: &str) -> Self {
        self.0.update((s.len() as u64).to_le_bytes());
        self.0.update(s.as_bytes());
        self
    }

    /// Adds a number.
    pub fn number(mut self, n: u64) -> Self {
        self.0.update(n.to_le_bytes());
        self
    }

    /// Adds token ids (count first).
    pub fn ids(mut self, ids: &[u32]) -> Self {
        self.0.update((ids.len() as u64).to_le_bytes());
        for id in ids {
            self.0.update(id.to_le_bytes());
        }
        self
    }

    /// Adds raw bytes (length first).
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }

    /// The key.
    pub fn finish(self) -> Key {
        Key(crate::util::hex(&self.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_found_by_its_key_only_and_goes_with_the_job() {
        let state = tempfile::tempdir().unwrap();
        let j = Journal::of_job(state.path(), 7);
        let key = |ids: &[u32]| KeyBuilder::new("complete", "m").ids(ids).number(4).finish();
        assert_eq!(j.get::<String>(&key(&[1, 2])), None);
        j.put(&key(&[1, 2]), &"answer".to_string());
        assert_eq!(j.get::<String>(&key(&[1, 2])).as_deref(), Some("answer"));
        assert_eq!(j.get::<String>(&key(&[1, 2, 0])), None, "another prompt");
        assert_eq!(j.get::<String>(&KeyBuilder::new("complete", "m").ids(&[1]).ids(&[2]).number(4).finish()), None);
        assert_eq!(Journal::of_job(state.path(), 8).get::<String>(&key(&[1, 2])), None, "another job");
        std::fs::write(j.file(&key(&[3])), b"{half").unwrap();
        assert_eq!(j.get::<String>(&key(&[3])), None, "a damaged entry is computed again");
        j.clear();
        assert_eq!(j.get::<String>(&key(&[1, 2])), None);
        assert!(!state.path().join("journal/7").exists());
    }
}
