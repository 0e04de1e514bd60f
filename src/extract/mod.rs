//! Text extraction: the file's type from its bytes, then text per page (PDF text layer, plain
//! text and Markdown in any common encoding, HTML), and which pages need OCR.
//!
//! Parsers of hostile files crash, hang or allocate without bound, and a stack overflow cannot be
//! caught in-process; the daemon therefore runs `extract_file` in a child process
//! (`deltadoc extract --json`) under a time and address-space limit (`isolated`).

pub mod image;
pub mod isolated;
mod nesting;
pub(crate) mod page_image;
pub(crate) mod pdf;
pub(crate) mod text;
mod unicode_maps;
mod xref_rebuild;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::failure::{Failure, Reason};

/// How a page's text was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Method {
    /// Plain text or Markdown file.
    Text,
    /// HTML converted to text.
    Html,
    /// The PDF's text layer.
    PdfText,
    /// Needs (or got) OCR by the vision model: an image, or a PDF page without usable text.
    Ocr,
}

/// One page (text files and HTML are one page).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Page {
    /// 1-based page number.
    pub number: u32,
    /// Extracted text (empty until OCR for `ocr` pages).
    pub text: String,
    /// How the text was obtained.
    pub method: Method,
    /// Why the page needs OCR.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ocr_reason: Option<String>,
}

/// Everything extraction learnt about a document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Extracted {
    /// Detected media type.
    pub mime: String,
    /// Pages in order.
    pub pages: Vec<Page>,
    /// Character encoding of a text file, as detected.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub encoding: Option<String>,
    /// Things a reader of the result should know (recovered damage, empty pages...).
    pub warnings: Vec<String>,
}

/// Limits that apply inside the extractor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExtractLimits {
    /// More pages than this: `too_large`.
    pub max_pages: u32,
}

/// Media type from the first bytes, falling back to the extension for text formats.
pub(crate) fn detect_mime(path: &Path, bytes: &[u8]) -> Option<&'static str> {
    let head = &bytes[..bytes.len().min(1024)];
    // PDF readers accept a header anywhere in the first KiB (some producers prepend junk).
    if head.windows(5).any(|w| w == b"%PDF-") {
        return Some("application/pdf");
    }
    let magic: [(&[u8], &str); 7] = [
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"II*\0", "image/tiff"),
        (b"MM\0*", "image/tiff"),
        (b"GIF8", "image/gif"),
        (b"BM", "image/bmp"),
        (b"RIFF", "image/webp"),
    ];
    if let Some((_, m)) = magic.iter().find(|(sig, _)| head.starts_with(sig)) {
        return Some(m);
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let looks_textual = !head.contains(&0) || text::has_utf16_bom(head) || text::sniff_wide(head).is_some();
    match ext.as_str() {
        "html" | "htm" | "xhtml" if looks_textual => Some("text/html"),
        "md" | "markdown" if looks_textual => Some("text/markdown"),
        _ if looks_textual && text::sniff_html(head) => Some("text/html"),
        _ if looks_textual => Some("text/plain"),
        _ => None,
    }
}

/// Extracts the text of one file (in this process: call it through [`isolated`] for untrusted
/// input).
pub(crate) fn extract_file(path: &Path, limits: ExtractLimits) -> Result<Extracted, Failure> {
    extract_bytes(path, &read(path)?, limits)
}

/// The bytes of the document at `path`.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::new(Reason::Io, "extract", format!("{}: {e}", path.display())))
}

/// Extracts from bytes already read; `path` names the file in errors and gives the extension.
pub(crate) fn extract_bytes(path: &Path, bytes: &[u8], limits: ExtractLimits) -> Result<Extracted, Failure> {
    let fail = |reason, msg: String| Failure::new(reason, "extract", format!("{}: {msg}", path.display()));
    let Some(mime) = detect_mime(path, bytes) else {
        return Err(fail(Reason::Unsupported, "not a PDF, image, HTML or text file (binary content of an unknown type)".into()));
    };
    match mime {
        "application/pdf" => pdf::extract(bytes, limits).map_err(|(r, m)| fail(r, m)),
        m if m.starts_with("image/") => Ok(Extracted {
            mime: m.into(),
            pages: vec![Page { number: 1, text: String::new(), method: Method::Ocr, ocr_reason: Some("image file".into()) }],
            encoding: None,
            warnings: Vec::new(),
        }),
        m => text::extract(bytes, m).map_err(|(r, m)| fail(r, m)),
    }
}

/// Share of characters that are replacement, control or private-use characters: a text layer
/// made of these is a font without a usable Unicode mapping, not text.
pub(crate) fn garbage_ratio(text: &str) -> f64 {
    let mut total = 0usize;
    let mut bad = 0usize;
    for c in text.chars().filter(|c| !c.is_whitespace()) {
        total += 1;
        let u = c as u32;
        if c == '\u{fffd}' || c.is_control() || (0xE000..=0xF8FF).contains(&u) {
            bad += 1;
        }
    }
    if total == 0 { 0.0 } else { bad as f64 / total as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_from_bytes_then_extension() {
        let p = Path::new("x.bin");
        assert_eq!(detect_mime(p, b"junk\n%PDF-1.4\n"), Some("application/pdf"));
        assert_eq!(detect_mime(p, b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(detect_mime(Path::new("a.HTM"), b"<p>hi</p>"), Some("text/html"));
        assert_eq!(detect_mime(Path::new("a.txt"), b"<!DOCTYPE html><html>"), Some("text/html"));
        assert_eq!(detect_mime(Path::new("a.md"), b"# Title"), Some("text/markdown"));
        assert_eq!(detect_mime(p, b"\0\x01\x02binary"), None);
    }

    #[test]
    fn garbage_is_measured_on_visible_characters() {
        assert_eq!(garbage_ratio("plain words"), 0.0);
        assert!(garbage_ratio("\u{e001}\u{e002}\u{e003}a") > 0.7);
    }
}
