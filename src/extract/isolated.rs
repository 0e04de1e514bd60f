//! Everything that decodes a document's bytes runs in a child process (`deltadoc extract --json
//! FILE` for the text, `--page N` for a page image) under a wall-time limit and an address-space
//! cap: a hostile PDF or image can then crash, hang or balloon without taking the daemon (and the
//! loaded model) with it. The daemon only ever receives text and raw pixels. Both sides of the
//! protocol are here: [`Extraction`] starts children and reads their answers, [`child`] and
//! [`page_child`] are what the child runs.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::image::OverDecodeCap;
use super::page_image::{PageImage, PageImages};
use super::{ExtractLimits, Extracted};
use crate::failure::{Failure, Reason};

/// What the child prints on stdout for the text: one JSON object.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// Text was extracted.
    Ok(Extracted),
    /// The file was refused, with the reason.
    Error(Failure),
}

/// What the child prints first for a page image: one JSON line, followed for `Ok` by the
/// `width × height × 3` bytes of the RGB pixels, row by row.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PageOutcome {
    Ok { width: u32, height: u32, note: Option<String> },
    Error(Failure),
}

/// The child's side of the text: extracts `path` and prints the [`Outcome`] as one JSON object.
pub(crate) fn child(path: &Path, limits: ExtractLimits) -> anyhow::Result<()> {
    let o = match super::extract_file(path, limits) {
        Ok(e) => Outcome::Ok(e),
        Err(f) => Outcome::Error(f),
    };
    println!("{}", serde_json::to_string(&o)?);
    Ok(())
}

/// The child's side of a page image: composes page `page` of `path` (an image file is its only
/// page), refusing images over `cap` pixels, and prints the [`PageOutcome`] and the pixels.
pub(crate) fn page_child(path: &Path, page: u32, cap: u64) -> anyhow::Result<()> {
    let image = compose_page(path, page, cap);
    let mut out = std::io::stdout().lock();
    match image {
        Ok(p) => {
            let header = PageOutcome::Ok { width: p.image.width(), height: p.image.height(), note: p.note };
            writeln!(out, "{}", serde_json::to_string(&header)?)?;
            out.write_all(p.image.as_raw())?;
        }
        Err(f) => writeln!(out, "{}", serde_json::to_string(&PageOutcome::Error(f))?)?,
    }
    out.flush()?;
    Ok(())
}

/// Page `page` of `path` composed in this process (the child's work).
fn compose_page(path: &Path, page: u32, cap: u64) -> Result<PageImage, Failure> {
    let bytes = super::read(path)?;
    let mime = super::detect_mime(path, &bytes).unwrap_or("");
    let images = PageImages::from_bytes(bytes, mime)
        .map_err(|(reason, e)| Failure::new(reason, "extract", format!("{}: {e}", path.display())))?;
    images.page(page, cap).map_err(|e| {
        let reason = if e.chain().any(|c| c.is::<OverDecodeCap>()) { Reason::TooLarge } else { Reason::Ocr };
        Failure::new(reason, "extract", format!("{}: {e:#}", path.display()))
    })
}

/// Limits of one isolated child.
#[derive(Clone, Debug)]
pub struct Isolation {
    /// The `deltadoc` executable.
    pub exe: PathBuf,
    /// Killed after this long (`timeout`).
    pub timeout: Duration,
    /// Address-space cap in bytes (`too_large` when hit).
    pub memory: u64,
    /// Page limit passed to the extractor.
    pub max_pages: u32,
}

impl Isolation {
    /// This executable under the daemon's default limits: the commands that read documents
    /// outside the daemon (`deltadoc ocr`, `model logits --messages`).
    pub fn with_defaults() -> anyhow::Result<Self> {
        let l = crate::config::Limits::default();
        Ok(Self {
            exe: std::env::current_exe().map_err(|e| anyhow!("cannot find the deltadoc executable to extract in: {e}"))?,
            timeout: l.extract_timeout.0,
            memory: l.extract_memory.0,
            max_pages: l.max_pages,
        })
    }
}

/// Where a document's bytes are decoded.
pub(crate) enum Extraction {
    /// In a child process under these limits: what the daemon and the commands do, because
    /// hostile files crash, hang or balloon parsers and decoders.
    Isolated(Isolation),
    /// In this process: the orchestration's tests, on files written by the test.
    #[cfg(test)]
    InProcess(ExtractLimits),
}

impl Extraction {
    /// The text of `path` per page, and which pages need OCR.
    pub fn text(&self, path: &Path) -> Result<Extracted, Failure> {
        match self {
            Self::Isolated(iso) => {
                let args = ["extract".into(), "--json".into(), "--max-pages".into(), iso.max_pages.to_string()];
                let out = run(path, iso, &args, "extraction", iso.memory)?;
                match serde_json::from_slice::<Outcome>(&out) {
                    Ok(Outcome::Ok(e)) => Ok(e),
                    Ok(Outcome::Error(f)) => Err(f),
                    Err(e) => Err(unreadable(path, e)),
                }
            }
            #[cfg(test)]
            Self::InProcess(limits) => super::extract_file(path, *limits),
        }
    }

    /// Page `page` (1-based) of `path` as pixels, refusing images over `cap` pixels.
    pub fn page_image(&self, path: &Path, page: u32, cap: u64) -> Result<PageImage, Failure> {
        match self {
            Self::Isolated(iso) => {
                let args = ["extract".into(), "--page".into(), page.to_string(), "--max-decode-pixels".into(), cap.to_string()];
                // Room for the largest image allowed and its header.
                let most = cap.saturating_mul(3).saturating_add(1 << 20);
                let mut out = run(path, iso, &args, &format!("page {page}'s image"), most)?;
                let nl = out.iter().position(|&c| c == b'\n').ok_or_else(|| unreadable(path, "no header line"))?;
                match serde_json::from_slice::<PageOutcome>(&out[..nl]).map_err(|e| unreadable(path, e))? {
                    PageOutcome::Error(f) => Err(f),
                    PageOutcome::Ok { width, height, note } => {
                        out.drain(..=nl);
                        let image = RgbImage::from_raw(width, height, out)
                            .ok_or_else(|| unreadable(path, format!("pixels do not make a {width}×{height} image")))?;
                        Ok(PageImage { image, note })
                    }
                }
            }
            #[cfg(test)]
            Self::InProcess(_) => compose_page(path, page, cap),
        }
    }
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::new(Reason::Parse, "extract", format!("{}: the extractor's answer is unreadable ({e})", path.display()))
}

/// Runs `deltadoc ARGS FILE` under the limits and returns its standard output (at most `most`
/// bytes) when it exits normally; `what` names the work in a timeout's message.
fn run(path: &Path, iso: &Isolation, args: &[String], what: &str, most: u64) -> Result<Vec<u8>, Failure> {
    let fail = |reason, msg: String| Failure::new(reason, "extract", format!("{}: {msg}", path.display()));
    let mut cmd = Command::new(&iso.exe);
    cmd.args(args).arg(path);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its last lines of stderr become the failure's message: no backtrace in them.
    cmd.env("DELTADOC_LOG", "warn").env("RUST_BACKTRACE", "0");
    let memory = iso.memory;
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: memory as libc::rlim_t, rlim_max: memory as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child =
        cmd.spawn().map_err(|e| fail(Reason::Io, format!("cannot start the extractor {}: {e}", iso.exe.display())))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    // A child that writes more than it may is cut off: the daemon never holds more than `most`.
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.take(most.saturating_add(1)).read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.take(1 << 20).read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > iso.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(Reason::Timeout, format!("{what} did not finish within {:?}", iso.timeout)));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(fail(Reason::Io, format!("waiting for the extractor: {e}"))),
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    if out.len() as u64 > most {
        return Err(fail(Reason::TooLarge, format!("the extractor's answer exceeds {most} bytes")));
    }
    if status.success() {
        return Ok(out);
    }
    let tail: String = err.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
    // A decompression bomb or a document beyond the configured memory: retrying cannot help.
    if err.contains("memory allocation of") || err.contains("capacity overflow") {
        let msg = format!("{what} exceeded its memory cap of {} MiB, limits.extract_memory ({tail})", memory >> 20);
        return Err(fail(Reason::TooLarge, msg));
    }
    let how = match status.signal() {
        Some(sig) => format!("extractor crashed (signal {sig})"),
        None => format!("extractor failed ({status})"),
    };
    Err(fail(Reason::Parse, format!("{how}: {tail}")))
}
