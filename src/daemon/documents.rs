//! Where a job's document is read and its result and quarantine entry are written: folders, or
//! buckets of an object store (`src/bucket/mod.rs`), with the same guarantees.
//!
//! - An object is downloaded into `<state_dir>/downloads/<job>/` before extraction, at most
//!   `limits.max_file_bytes`, and its SHA-256 must be the one the job was recorded with: a key
//!   re-uploaded with other bytes since is another document (the ingest records it), and this
//!   job's bytes are gone.
//! - A result is created with `If-None-Match: *`; one already there is replaced only with
//!   `If-Match` on the version read, and never when a later lease of the same job wrote it
//!   (`output::written_later`), as the folder's exclusive rename does (`output.rs`).
//! - Quarantine writes the copy and the error JSON beside it, never over another document's
//!   copy; with `quarantine_mode: move` the source goes only once the copy is read back, and an
//!   object only if it is still the version that was downloaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};

use crate::bucket::{Bucket, BucketUrl, OverLimit, Stores};
use crate::config::{DaemonConfig, Location};
use crate::failure::{Failure, Reason};
use crate::ledger::Job;
use crate::output::{self, DocResult, ErrorReport, JobRef};

/// A job's document, where the pipeline reads it.
pub(crate) enum Document {
    /// A file of a folder inbox, read where it is.
    File,
    /// An object, downloaded.
    Object {
        /// The download.
        local: PathBuf,
        /// The version downloaded.
        version: String,
    },
}

impl Document {
    /// The file the pipeline reads.
    pub fn local<'a>(&'a self, job: &'a Job) -> &'a Path {
        match self {
            Document::File => &job.source,
            Document::Object { local, .. } => local,
        }
    }
}

/// The folders and buckets of one worker.
pub(crate) struct Places {
    stores: Arc<Stores>,
    downloads: PathBuf,
    max_bytes: u64,
}

/// [`Places::write_result`] into a bucket: `bytes` of a result of `job` as `key`.
fn write_once_in(bucket: &Bucket, key: &str, bytes: &[u8], job: Option<JobRef>) -> Result<bool> {
    // Each turn either writes, or finds that another writer changed the object between the read
    // and the write; a few turns settle any race of two workers.
    for _ in 0..8 {
        match bucket.get(key)? {
            None if bucket.create(key, bytes.to_vec())? => return Ok(true),
            None => continue,
            Some((existing, _)) if output::written_later(&existing, job) => return Ok(false),
            Some((_, version)) if bucket.replace(key, bytes.to_vec(), &version)? => return Ok(true),
            Some(_) => continue,
        }
    }
    bail!("s3://{}/{key}: other writers kept changing the result while it was written", bucket.name)
}

/// An `s3://bucket/key` source: its bucket and key.
fn object_of(source: &Path) -> Option<(String, String)> {
    BucketUrl::split_object(source.to_str()?)
}

impl Places {
    /// Through the daemon's bucket clients; downloads go under `state_dir`. Downloads a stopped
    /// daemon left behind are removed (each daemon has its own `state_dir`).
    pub fn new(cfg: &DaemonConfig, stores: Arc<Stores>) -> Self {
        let downloads = cfg.state_dir.join("downloads");
        let _ = std::fs::remove_dir_all(&downloads);
        Self { stores, downloads, max_bytes: cfg.limits.max_file_bytes.0 }
    }

    fn bucket(&self, name: &str) -> Result<Bucket> {
        self.stores.bucket(name)
    }

    /// The job's document: the file itself, or the object downloaded. `Ok(Err)` is the
    /// document's failure (gone, replaced, too large); `Err` is the store's or the disk's, for
    /// the caller to wait out.
    pub fn fetch(&self, job: &Job) -> Result<Result<Document, Failure>> {
        let Some((bucket, key)) = object_of(&job.source) else { return Ok(Ok(Document::File)) };
        let dir = self.downloads.join(job.id.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the download folder", dir.display()))?;
        let name = Path::new(&key).file_name().map_or_else(|| "document".into(), |n| n.to_os_string());
        let local = dir.join(name);
        let mut file = std::fs::File::create(&local).with_context(|| format!("{}: cannot create", local.display()))?;
        let shown = job.source.display();
        if job.size >= super::ingest::BIG_OBJECT {
            tracing::info!("{shown}: downloading {} MiB", job.size >> 20);
        }
        let fail = |reason, msg: String| -> Result<Result<Document, Failure>> {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(Err(Failure::new(reason, "detect", msg)))
        };
        let read = match self.bucket(&bucket)?.read(&key, None, self.max_bytes, &mut file) {
            Ok(r) => r,
            Err(e) if e.is::<OverLimit>() => return fail(Reason::TooLarge, format!("{e:#}")),
            Err(e) => return Err(e),
        };
        let Some(read) = read else {
            return fail(Reason::Io, format!("{shown}: the object is gone from the bucket (deleted or moved away)"));
        };
        if read.sha256 != job.sha256 {
            return fail(
                Reason::Io,
                format!(
                    "{shown}: the object was replaced by other bytes after it was found; the new upload is a document of \
                     its own"
                ),
            );
        }
        file.sync_all().with_context(|| format!("{}: cannot write", local.display()))?;
        Ok(Ok(Document::Object { local, version: read.version }))
    }

    /// Removes the job's download, if any.
    pub fn done(&self, job: &Job) {
        let _ = std::fs::remove_dir_all(self.downloads.join(job.id.to_string()));
    }

    /// Writes the job's result for the document `rel` into `output` unless a later lease of the
    /// job wrote one: `Ok(false)` then (`output::write_result_once`).
    pub fn write_result(&self, output: &Location, rel: &Path, r: &DocResult) -> Result<bool> {
        let at = output.join(rel, ".json");
        let Location::Bucket(url) = output else { return output::write_result_once(&at, r) };
        let key = format!("{}.json", url.key(rel));
        write_once_in(&self.bucket(&url.bucket)?, &key, &output::result_bytes(r)?, r.job)
    }

    /// Quarantines the job's document into `place` (a copy, and the error JSON beside it), and
    /// with `move_it` removes the source once the copy is confirmed. `doc` is the document as
    /// fetched, if the job got that far. Returns where the copy is.
    pub fn quarantine(
        &self,
        job: &Job,
        doc: Option<&Document>,
        place: &Location,
        move_it: bool,
        report: &ErrorReport,
    ) -> Result<PathBuf> {
        let object = object_of(&job.source);
        // The bytes to keep: the file, or the object's download (made now when the job failed
        // before it: a daemon that died under the document).
        let fetched;
        let doc = match doc {
            Some(d) => Some(d),
            None if object.is_some() => {
                fetched = self.fetch(job)?.ok();
                fetched.as_ref()
            }
            None => None,
        };
        let local = doc.map_or(job.source.as_path(), |d| d.local(job));
        let at = match place {
            // A download is moved, not copied: it is this daemon's own.
            Location::Folder(dir) => output::quarantine(local, dir, &job.rel_path, move_it || object.is_some(), report)?,
            Location::Bucket(url) => self.quarantine_in_bucket(url, &job.rel_path, local, report)?,
        };
        if !move_it {
            return Ok(at);
        }
        match (object, doc) {
            (Some((bucket, key)), Some(Document::Object { version, .. })) => {
                let bucket = self.bucket(&bucket)?;
                match bucket.head(&key)? {
                    Some((_, now)) if &now == version => bucket.delete(&key)?,
                    Some(_) => tracing::info!(
                        "{}: left in the inbox: a newer upload replaced the quarantined version",
                        job.source.display()
                    ),
                    None => {}
                }
            }
            (Some(_), _) => {}
            // A file moved into a folder is moved already; one copied into a bucket goes now.
            (None, _) => {
                if matches!(place, Location::Bucket(_)) && job.source.exists() {
                    std::fs::remove_file(&job.source).with_context(|| {
                        format!("{}: cannot remove after copying it to {}", job.source.display(), at.display())
                    })?;
                }
            }
        }
        Ok(at)
    }

    /// [`Places::quarantine`] into a bucket: `<prefix><rel>`, or `<prefix><rel>.N` when another
    /// document's copy has the name; `local` is copied when it exists.
    fn quarantine_in_bucket(&self, url: &BucketUrl, rel: &Path, local: &Path, report: &ErrorReport) -> Result<PathBuf> {
        let bucket = self.bucket(&url.bucket)?;
        let bytes = match std::fs::read(local) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{}: cannot read", local.display()))),
        };
        let base = url.key(rel);
        let mut n = 0;
        let key = loop {
            let key = if n == 0 { base.clone() } else { format!("{base}.{n}") };
            n += 1;
            // The copy first, created only where nothing is: a call that fails after it is made
            // again and finds its own copy (the same bytes) under the name. (In a folder the
            // error JSON goes first, `output::quarantine`; a bucket cannot create a name and
            // check what is there in one step, so the name is taken by the copy.)
            let taken = match &bytes {
                Some(b) => !bucket.create(&key, b.clone())? && bucket.get(&key)?.is_none_or(|(there, _)| &there != b),
                None => bucket.head(&key)?.is_some(),
            };
            if !taken {
                break key;
            }
        };
        if let Some(b) = &bytes {
            match bucket.head(&key)? {
                Some((s, _)) if s == b.len() as u64 => {}
                other => bail!("{}: the copy reads back as {other:?}, not {} bytes", url.object(&key), b.len()),
            }
        }
        bucket.overwrite(&format!("{key}.error.json"), report.bytes()?)?;
        Ok(PathBuf::from(url.object(&key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::tests::server;

    #[test]
    fn a_result_in_a_bucket_is_written_once_per_lease_and_never_over_a_later_one() {
        let Some((_s3, bucket)) = server("results") else { return };
        let key = "out/a.pdf.json";
        let result = |id: i64, lease: i64| {
            let job = JobRef { id, lease };
            (serde_json::to_vec(&serde_json::json!({ "job": job, "n": lease })).unwrap(), Some(job))
        };
        let (bytes, job) = result(7, 2);
        assert!(write_once_in(&bucket, key, &bytes, job).unwrap(), "nothing there: created");
        let (stale, stale_job) = result(7, 1);
        assert!(!write_once_in(&bucket, key, &stale, stale_job).unwrap(), "an earlier lease of the job writes nothing");
        assert_eq!(bucket.get(key).unwrap().unwrap().0, bytes);
        let (retried, retried_job) = result(7, 3);
        assert!(write_once_in(&bucket, key, &retried, retried_job).unwrap(), "a later lease replaces it (`deltadoc retry`)");
        let (other, other_job) = result(9, 1);
        assert!(write_once_in(&bucket, key, &other, other_job).unwrap(), "another job's result (changed content) is replaced");
        assert_eq!(bucket.get(key).unwrap().unwrap().0, other);
    }

    #[test]
    fn quarantine_in_a_bucket_keeps_other_documents_copies_and_writes_the_error_beside() {
        let Some((_s3, bucket)) = server("quarantine") else { return };
        let dir = tempfile::tempdir().unwrap();
        let places =
            Places { stores: Arc::new(Stores::seeded(bucket.clone())), downloads: dir.path().join("d"), max_bytes: 1 << 20 };
        let url = BucketUrl::parse("s3://quarantine/q/").unwrap();
        let f = Failure::new(Reason::Parse, "extract", "broken");
        let report = |source: &'static Path| ErrorReport {
            failure: &f,
            attempts: 1,
            pipeline: "p",
            source,
            sha256: "00",
            quarantined_at: output::now_rfc3339(),
            deltadoc_version: "test",
        };
        let (a, b) = (dir.path().join("a.pdf"), dir.path().join("b.pdf"));
        std::fs::write(&a, b"first document").unwrap();
        std::fs::write(&b, b"another document of the same name").unwrap();
        let rel = Path::new("sub/x.pdf");
        let at = places.quarantine_in_bucket(&url, rel, &a, &report(Path::new("s3://in/sub/x.pdf"))).unwrap();
        assert_eq!(at, Path::new("s3://quarantine/q/sub/x.pdf"));
        // Again (a call made after a kill): the same place, the copy unchanged.
        let again = places.quarantine_in_bucket(&url, rel, &a, &report(Path::new("s3://in/sub/x.pdf"))).unwrap();
        assert_eq!(again, at);
        let other = places.quarantine_in_bucket(&url, rel, &b, &report(Path::new("s3://in/sub/x.pdf"))).unwrap();
        assert_eq!(other, Path::new("s3://quarantine/q/sub/x.pdf.1"), "another document's copy is kept");
        assert_eq!(bucket.get("q/sub/x.pdf").unwrap().unwrap().0, b"first document");
        assert_eq!(bucket.get("q/sub/x.pdf.1").unwrap().unwrap().0, b"another document of the same name");
        let error: serde_json::Value =
            serde_json::from_slice(&bucket.get("q/sub/x.pdf.1.error.json").unwrap().unwrap().0).unwrap();
        assert_eq!(error["reason"], "parse", "{error}");
        // A document that is gone: the error JSON alone, under a free name.
        let gone =
            places.quarantine_in_bucket(&url, rel, &dir.path().join("gone"), &report(Path::new("s3://in/sub/x.pdf"))).unwrap();
        assert_eq!(gone, Path::new("s3://quarantine/q/sub/x.pdf.2"));
        assert!(bucket.get("q/sub/x.pdf.2").unwrap().is_none() && bucket.get("q/sub/x.pdf.2.error.json").unwrap().is_some());
    }
}
