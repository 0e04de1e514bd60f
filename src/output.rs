//! Results and quarantine: one JSON file per document written atomically (temp file, fsync,
//! rename, fsync of the folder) into the output folder mirroring the inbox layout; failed
//! documents moved or copied to the quarantine folder next to an error JSON.
//!
//! The result's shape is `DocResult`, described for consumers by `config/result.schema.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::chunk::Chunk;
use crate::extract::Method;
use crate::failure::Failure;
use crate::llm::ModelInfo;

/// The JSON Schema of the result JSON (draft 2020-12).
pub const RESULT_SCHEMA: &str = include_str!("../config/result.schema.json");

/// One document's result.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DocResult {
    /// deltadoc version that wrote it.
    pub deltadoc_version: String,
    /// Pipeline name and version.
    pub pipeline: PipelineRef,
    /// The input file.
    pub source: Source,
    /// Pages with how their text was obtained.
    pub pages: Vec<PageResult>,
    /// Tokens of the whole document text.
    pub document_tokens: usize,
    /// How the document was cut for the model.
    pub chunks: Vec<Chunk>,
    /// Whether any text was left out of a model call (documents are chunked, never cut; only a
    /// part answer longer than a whole context in the reduce step could be, and it is then
    /// named in `warnings`).
    pub truncated: bool,
    /// Model stage outputs by stage name.
    pub stages: BTreeMap<String, StageResult>,
    /// The model that produced them.
    pub model: ModelInfo,
    /// Seconds per step (`detect`, `extract`, `ocr`, `chunk`, each stage, `total`).
    pub timings: BTreeMap<String, f64>,
    /// Token totals over all stages.
    pub tokens: TokenTotals,
    /// Things the reader should know.
    pub warnings: Vec<String>,
    /// RFC 3339 time the result was written.
    pub processed_at: String,
    /// The ledger job that wrote it (absent from `deltadoc process`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRef>,
}

/// A result's job in the ledger, and the lease it was written under.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct JobRef {
    /// Ledger id.
    pub id: i64,
    /// Lease generation of the attempt that wrote it (`ledger/mod.rs`).
    pub lease: i64,
}

/// Pipeline identity.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PipelineRef {
    /// The pipeline's name.
    pub name: String,
    /// Declared version.
    pub version: u32,
}

/// The input file.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Source {
    /// Where it was read.
    pub path: PathBuf,
    /// Path relative to its inbox.
    pub relative_path: PathBuf,
    /// sha256 of the bytes.
    pub sha256: String,
    /// Size of the file in bytes.
    pub size: u64,
    /// Detected media type.
    pub mime: String,
    /// Text encoding of a text file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

/// One page.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PageResult {
    /// 1-based number.
    pub number: u32,
    /// How the text was obtained.
    pub method: Method,
    /// Why OCR was needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ocr_reason: Option<String>,
    /// Tokens the page contributes to the document's token stream (what the model is fed).
    pub tokens: usize,
    /// The text.
    pub text: String,
}

/// One model stage's output.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct StageResult {
    /// `summarize`, `prompt`, `ocr` or `extract`.
    pub kind: String,
    /// The answer (after map-reduce for long documents): text, or for `extract` the fields.
    pub output: serde_json::Value,
    /// Per-chunk answers when the document took several chunks (the map step).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<serde_json::Value>,
    /// `extract`: the JSON Schema `output` and every part were validated against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// `extract`: chunk and pages of every value, by JSON pointer into `output`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance: Option<serde_json::Value>,
    /// `extract` with `thinking` and `keep_reasoning`: the think blocks, one per call.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasoning: Vec<String>,
    /// `extract`: mean time of a constraint mask per generated token, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_ms_per_token: Option<f64>,
    /// Prompt tokens over all calls of the stage.
    pub prompt_tokens: usize,
    /// Generated tokens over all calls.
    pub generated_tokens: usize,
    /// Model calls.
    pub calls: usize,
    /// Why the final call stopped.
    pub stopped_by: String,
    /// Wall seconds.
    pub duration_s: f64,
    /// Seconds to the first generated token of the stage's first call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_s: Option<f64>,
    /// Seconds spent prefilling, over all calls.
    pub prefill_s: f64,
    /// Seconds spent generating, over all calls.
    pub decode_s: f64,
    /// Largest KV cache + DeltaNet state of any call, in bytes.
    pub state_bytes: usize,
}

/// Token totals.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct TokenTotals {
    /// Prompt tokens of all calls (a shared prefix counts once per call).
    pub prompt: usize,
    /// Prompt tokens actually prefilled (prefix reuse makes this smaller).
    pub prefilled: usize,
    /// Generated tokens.
    pub generated: usize,
}

/// The error JSON written next to a quarantined document.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ErrorReport<'a> {
    /// What failed.
    #[serde(flatten)]
    pub failure: &'a Failure,
    /// Attempts made.
    pub attempts: u32,
    /// The pipeline that failed it.
    pub pipeline: &'a str,
    /// Where the file was found.
    pub source: &'a Path,
    /// sha256 of the bytes.
    pub sha256: &'a str,
    /// RFC 3339 time.
    pub quarantined_at: String,
    /// deltadoc version.
    pub deltadoc_version: &'static str,
}

impl ErrorReport<'_> {
    /// The error JSON's bytes.
    pub(crate) fn bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// Fills a temporary file beside `path` with `fill`, syncs it, renames it to `path` and syncs
/// the folder: readers see the old file or the whole new one, even after a kill or a power cut.
/// Temporary files of `path` that killed writers left behind go at once ([`temp_beside`]): each
/// path has one writer at a time (the job's lease holder), or writers of the same bytes (a
/// journal entry), for whom a lost write only costs time.
fn replace_atomically(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().context("the path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let tmp = temp_beside(path, Duration::ZERO)?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the folder itself is synced.
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("{}: cannot write", path.display()))
    })
}

/// Writes `bytes` to `path` atomically: readers see the old file or the whole new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomically(path, |f| f.write_all(bytes))
}

/// Writes a job's result unless a later lease of the same job wrote one already: `Ok(false)`
/// then. When no result is there the file is created exclusively (the finished temporary file
/// renamed without replacing, [`rename_new`]), so two workers of one job never both write it; an older result under the name
/// (an earlier version of the document, another job) is replaced atomically.
pub(crate) fn write_result_once(path: &Path, r: &DocResult) -> Result<bool> {
    write_once(path, &result_bytes(r)?, r.job)
}

/// The result file's bytes.
pub(crate) fn result_bytes(r: &DocResult) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(r)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Whether the result `existing` was written by a later lease of `job` than its own: then a
/// worker of `job` must not replace it (it lost its lease, and the later one wrote).
pub(crate) fn written_later(existing: &[u8], job: Option<JobRef>) -> bool {
    #[derive(serde::Deserialize)]
    struct Written {
        job: Option<JobRef>,
    }
    let theirs = serde_json::from_slice::<Written>(existing).ok().and_then(|w| w.job);
    matches!((theirs, job), (Some(t), Some(m)) if t.id == m.id && t.lease > m.lease)
}

/// [`write_result_once`] of serialised bytes written by `job`.
fn write_once(path: &Path, bytes: &[u8], job: Option<JobRef>) -> Result<bool> {
    let later = |path: &Path| -> Result<bool> {
        match std::fs::read(path) {
            Ok(existing) => Ok(written_later(&existing, job)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(anyhow::Error::new(e).context(format!("{}: cannot read", path.display()))),
        }
    };
    if later(path)? {
        return Ok(false);
    }
    let dir = path.parent().context("the path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let tmp = temp_beside(path, Duration::ZERO)?;
    let write = || -> std::io::Result<bool> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        match rename_new(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if later(path).map_err(std::io::Error::other)? {
                    std::fs::remove_file(&tmp)?;
                    return Ok(false);
                }
                std::fs::rename(&tmp, path)?;
            }
            Err(e) => return Err(e),
        }
        std::fs::File::open(dir)?.sync_all()?;
        Ok(true)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("{}: cannot write", path.display()))
    })
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), in one step
/// (`renameat2` with `RENAME_NOREPLACE`), so no reader sees both names. File systems without it
/// (NFS, some FUSE mounts) get a hard link and the removal of `from`; those without hard links
/// either (some SMB mounts), a plain rename.
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let (f, t) = (std::ffi::CString::new(from.as_os_str().as_bytes())?, std::ffi::CString::new(to.as_os_str().as_bytes())?);
    // SAFETY: two NUL-terminated paths, valid for the call.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) {
        return Err(e);
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => std::fs::rename(from, to),
    }
}

/// How long a snapshot's temporary file stays untouched before it counts as a killed writer's:
/// a writer keeps writing until it renames it, and a kill is the only way to stop for this long.
/// (Two daemons of a fleet may checkpoint one prompt into a shared folder at once, for seconds.)
pub(crate) const STALE_TEMP: Duration = Duration::from_secs(60);

/// The temporary file a writer fills before renaming it to `path`: `.<name>.<pid>-<nonce>.tmp`
/// beside it, after removing those of killed writers untouched for `idle` ([`remove_leftovers`]).
/// In a fleet, writers on other machines write into the same folders (a shared output or resume
/// folder), and process ids repeat across machines (every container's first process is 1),
/// hence the random part.
pub(crate) fn temp_beside(path: &Path, idle: Duration) -> Result<PathBuf> {
    let dir = path.parent().context("the path has no folder")?;
    let name = path.file_name().context("the path has no file name")?.to_string_lossy();
    remove_leftovers(path, idle);
    Ok(dir.join(format!(".{name}.{}-{:016x}.tmp", std::process::id(), rand::random::<u64>())))
}

/// Removes the temporary files of `path` ([`temp_beside`]) that killed writers left, among
/// those untouched for `idle`: a live writer keeps writing (a result, at once; a checkpoint of
/// gigabytes, for seconds), and one that is removed under it fails and writes nothing.
fn remove_leftovers(path: &Path, idle: Duration) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let n = e.file_name();
        // `.<name>.<pid>-<nonce>.tmp`, `.<name>.<pid>.tmp` and `.<name>.tmp` of older versions:
        // nothing else of the folder.
        let rest = n.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|r| r.strip_suffix("tmp"));
        let ours = rest.is_some_and(|r| r.is_empty() || r.strip_suffix('.').is_some_and(is_writer_tag));
        let idle_for = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if ours && idle_for.is_some_and(|t| t >= idle) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `<pid>` or `<pid>-<hex nonce>`.
fn is_writer_tag(tag: &str) -> bool {
    let (pid, nonce) = tag.split_once('-').unwrap_or((tag, "0"));
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !nonce.is_empty()
        && nonce.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Copies `src` to `dest` through a temporary file: a kill mid-copy leaves no partial copy under
/// the document's name.
fn copy_atomically(src: &Path, dest: &Path) -> Result<()> {
    let mut from = std::fs::File::open(src).with_context(|| format!("{}: cannot open", src.display()))?;
    replace_atomically(dest, |to| std::io::copy(&mut from, to).map(drop))
        .with_context(|| format!("{}: cannot copy to {}", src.display(), dest.display()))
}

/// Moves (or copies) a failed document into `quarantine` mirroring `rel`, and writes
/// `<name>.error.json` beside it. Returns where the document now is.
pub(crate) fn quarantine(src: &Path, quarantine: &Path, rel: &Path, move_it: bool, report: &ErrorReport) -> Result<PathBuf> {
    let mut dest = quarantine.join(rel);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create quarantine folder", dir.display()))?;
    }
    // Never overwrite an earlier quarantined file of the same name with other content.
    let mut n = 1;
    while dest.exists() && !same_file_content(&dest, src) {
        let mut name = quarantine.join(rel).into_os_string();
        name.push(format!(".{n}"));
        dest = PathBuf::from(name);
        n += 1;
    }
    // The error JSON first: a call that fails after it (a full disk, a kill) is simply made
    // again, and finds the same `dest` free because the document is not there yet.
    let mut err = dest.clone().into_os_string();
    err.push(".error.json");
    write_atomic(Path::new(&err), &report.bytes()?)?;
    if src.exists() && src != dest {
        if move_it {
            if std::fs::rename(src, &dest).is_err() {
                // Another filesystem: copy, sync, then remove the original.
                copy_atomically(src, &dest)?;
                std::fs::remove_file(src).with_context(|| format!("{}: cannot remove after copy", src.display()))?;
            }
        } else {
            copy_atomically(src, &dest)?;
        }
    }
    Ok(dest)
}

fn same_file_content(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Current time in RFC 3339 (UTC).
pub(crate) fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_write_leaves_nothing_behind_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pdf.json");
        // What processes killed between create and rename left.
        for name in [".a.pdf.json.tmp", ".a.pdf.json.77-00ff.tmp", ".b.pdf.json.tmp"] {
            std::fs::write(dir.path().join(name), b"{\"half").unwrap();
        }
        write_atomic(&path, b"{}\n").unwrap();
        let names = || {
            let mut n: Vec<String> =
                std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            n.sort();
            n
        };
        assert_eq!(names(), [".b.pdf.json.tmp", "a.pdf.json"], "only this file's leftovers go");
        // A snapshot's leftovers go once untouched for a while: a live writer's stays.
        let old = std::time::SystemTime::now() - 2 * STALE_TEMP;
        std::fs::File::create(dir.path().join(".a.pdf.json.5-ab.tmp")).unwrap().set_modified(old).unwrap();
        std::fs::write(dir.path().join(".a.pdf.json.1-abcd.tmp"), b"{\"being written").unwrap();
        remove_leftovers(&path, STALE_TEMP);
        assert_eq!(names(), [".a.pdf.json.1-abcd.tmp", ".b.pdf.json.tmp", "a.pdf.json"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
        let copy = dir.path().join("q/a.pdf");
        copy_atomically(&path, &copy).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"{}\n");
    }

    #[test]
    fn a_result_is_written_once_per_lease_and_never_over_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pdf.json");
        let result = |id: i64, lease: i64| {
            let job = JobRef { id, lease };
            (serde_json::to_vec(&serde_json::json!({ "job": job, "n": lease })).unwrap(), Some(job))
        };
        // Leftovers of killed writers of this name go, whatever process left them; others stay.
        for leftover in
            [".a.pdf.json.4242.tmp", ".a.pdf.json.1-9f3c.tmp", ".a.pdf.json.tmp", ".a.pdf.json.x.json.7.tmp", ".a.pdf.json.notes"]
        {
            std::fs::write(dir.path().join(leftover), b"{\"half").unwrap();
        }
        let (bytes, job) = result(7, 2);
        assert!(write_once(&path, &bytes, job).unwrap(), "nothing there: created");
        let (stale, stale_job) = result(7, 1);
        assert!(!write_once(&path, &stale, stale_job).unwrap(), "an earlier lease of the job writes nothing");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let (retried, retried_job) = result(7, 3);
        assert!(write_once(&path, &retried, retried_job).unwrap(), "a later lease replaces it (`deltadoc retry`)");
        let (other, other_job) = result(9, 1);
        assert!(write_once(&path, &other, other_job).unwrap(), "another job's result (changed content) is replaced");
        assert_eq!(std::fs::read(&path).unwrap(), other);
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, [".a.pdf.json.notes", ".a.pdf.json.x.json.7.tmp", "a.pdf.json"]);
    }
}
