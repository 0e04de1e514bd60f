//! Plain text, Markdown and HTML: encoding detection (UTF-32 and BOM-less UTF-16, a BOM, UTF-8,
//! a declared charset, then Firefox's detector) and HTML to text.

use encoding_rs::Encoding;

use super::{Extracted, Method, Page};
use crate::failure::Reason;

/// Width HTML text is wrapped at: wide enough not to split sentences, narrow enough to read.
const HTML_WIDTH: usize = 200;

/// True when the bytes start with a UTF-16 byte order mark (text that contains NUL bytes).
pub fn has_utf16_bom(head: &[u8]) -> bool {
    head.starts_with(b"\xff\xfe") || head.starts_with(b"\xfe\xff")
}

/// Bytes of the start of a file that the wide-encoding sniffing looks at.
const SNIFF_BYTES: usize = 4096;

/// Unicode encoding forms that encoding_rs's BOM sniffing and the UTF-8 check do not find: UTF-32
/// (with or without a byte order mark; encoding_rs does not decode it) and UTF-16 without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wide {
    /// UTF-16, little-endian.
    Utf16Le,
    /// UTF-16, big-endian.
    Utf16Be,
    /// UTF-32, little-endian.
    Utf32Le,
    /// UTF-32, big-endian.
    Utf32Be,
}

impl Wide {
    fn name(self) -> &'static str {
        match self {
            Self::Utf16Le => "UTF-16LE",
            Self::Utf16Be => "UTF-16BE",
            Self::Utf32Le => "UTF-32LE",
            Self::Utf32Be => "UTF-32BE",
        }
    }

    /// Code points of `bytes`; `None` for a unit that is no character (an unpaired surrogate,
    /// a value past U+10FFFF). A unit cut off at the end is dropped.
    fn chars(self, bytes: &[u8]) -> impl Iterator<Item = Option<char>> + '_ {
        let four = matches!(self, Self::Utf32Le | Self::Utf32Be);
        let units = bytes.chunks_exact(if four { 4 } else { 2 }).map(move |u| match self {
            Self::Utf16Le => u32::from(u16::from_le_bytes([u[0], u[1]])),
            Self::Utf16Be => u32::from(u16::from_be_bytes([u[0], u[1]])),
            Self::Utf32Le => u32::from_le_bytes([u[0], u[1], u[2], u[3]]),
            Self::Utf32Be => u32::from_be_bytes([u[0], u[1], u[2], u[3]]),
        });
        let mut units = units.peekable();
        std::iter::from_fn(move || {
            let u = units.next()?;
            if four || !(0xD800..0xDC00).contains(&u) {
                return Some(char::from_u32(u));
            }
            // A high surrogate pairs with the low one after it.
            match units.peek() {
                Some(&lo) if (0xDC00..0xE000).contains(&lo) => {
                    units.next();
                    Some(char::from_u32(0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00)))
                }
                Some(_) => Some(None),
                None => None,
            }
        })
    }

    /// Text in this form: only characters a text file holds (no NUL, no controls besides tab,
    /// line and form feed, no unpaired surrogates), and some ASCII, whose zero bytes are what
    /// tells UTF-16 and UTF-32 text from a legacy multi-byte encoding.
    fn plausible(self, sample: &[u8]) -> bool {
        let (mut ascii, mut total) = (0usize, 0usize);
        for c in self.chars(sample) {
            let Some(c) = c else { return false };
            if (c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\x0c')) || matches!(c, '\u{fffe}' | '\u{ffff}') {
                return false;
            }
            ascii += usize::from(c.is_ascii());
            total += 1;
        }
        total >= 2 && ascii > 0
    }

    fn decode(self, bytes: &[u8]) -> String {
        self.chars(bytes).map(|c| c.unwrap_or('\u{fffd}')).collect()
    }
}

/// The wide Unicode form of a file starting with `head`, and the length of its byte order mark.
pub fn sniff_wide(head: &[u8]) -> Option<(Wide, usize)> {
    // UTF-32LE's mark starts like UTF-16LE's, so it is looked for first.
    if head.starts_with(b"\xff\xfe\0\0") {
        return Some((Wide::Utf32Le, 4));
    }
    if head.starts_with(b"\0\0\xfe\xff") {
        return Some((Wide::Utf32Be, 4));
    }
    // Without a NUL byte there is no ASCII in UTF-16 or UTF-32, and UTF-16 with a mark is
    // encoding_rs's.
    if has_utf16_bom(head) || !head.contains(&0) {
        return None;
    }
    let sample = &head[..head.len().min(SNIFF_BYTES)];
    [Wide::Utf32Le, Wide::Utf32Be, Wide::Utf16Le, Wide::Utf16Be].into_iter().find(|w| w.plausible(sample)).map(|w| (w, 0))
}

/// True when the start of a file looks like HTML whatever its extension.
pub fn sniff_html(head: &[u8]) -> bool {
    let s = String::from_utf8_lossy(&head[..head.len().min(512)]).trim_start().to_ascii_lowercase();
    s.starts_with("<!doctype html") || s.starts_with("<html")
}

/// Decodes text bytes: UTF-32 or BOM-less UTF-16 first, then a BOM, then strict UTF-8, then a charset declared in HTML, then
/// detection. Returns the text and the encoding's name.
pub fn decode(bytes: &[u8], html: bool) -> (String, &'static str) {
    if let Some((wide, bom)) = sniff_wide(bytes) {
        return (wide.decode(&bytes[bom..]), wide.name());
    }
    if let Some((enc, bom)) = Encoding::for_bom(bytes) {
        let (text, _) = enc.decode_without_bom_handling(&bytes[bom..]);
        return (text.into_owned(), enc.name());
    }
    if let Ok(s) = std::str::from_utf8(bytes) {
        return (s.to_string(), "UTF-8");
    }
    let declared = if html { declared_charset(bytes) } else { None };
    let enc = declared.unwrap_or_else(|| {
        let mut det = chardetng::EncodingDetector::new(chardetng::Iso2022JpDetection::Allow);
        det.feed(bytes, true);
        det.guess(None, chardetng::Utf8Detection::Allow)
    });
    let (text, _, _) = enc.decode(bytes);
    (text.into_owned(), enc.name())
}

/// `<meta charset=...>` or `content="...; charset=..."` in the first 4 KiB.
fn declared_charset(bytes: &[u8]) -> Option<&'static Encoding> {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).to_ascii_lowercase();
    let at = head.find("charset=")? + "charset=".len();
    let label: String = head[at..]
        .trim_start_matches(['"', '\''])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "-_:.".contains(*c))
        .collect();
    Encoding::for_label(label.as_bytes())
}

/// Elements nested deeper than this make the HTML parser's work quadratic (200,000 levels take
/// minutes); no real page comes near it.
const MAX_HTML_DEPTH: usize = 10_000;

/// Elements the HTML parser closes implicitly or that have no content: they do not nest.
const FLAT_ELEMENTS: &[&str] = &[
    "area", "base", "br", "col", "colgroup", "dd", "dt", "embed", "hr", "img", "input", "keygen", "li", "link", "meta", "option",
    "optgroup", "p", "param", "rb", "rp", "rt", "source", "tbody", "td", "tfoot", "th", "thead", "tr", "track", "wbr", "html",
    "head", "body",
];

/// The deepest element nesting of an HTML text, counted up to `limit` (comments, scripts and
/// styles skipped; elements that never nest not counted).
fn html_depth(html: &str, limit: usize) -> usize {
    let (mut depth, mut deepest, mut rest) = (0usize, 0usize, html);
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix("!--") {
            rest = after.find("-->").map_or("", |e| &after[e + 3..]);
            continue;
        }
        let closing = rest.starts_with('/');
        let name: String = rest[usize::from(closing)..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let end = rest.find('>').unwrap_or(rest.len());
        let self_closing = rest[..end].ends_with('/');
        if name.is_empty() || FLAT_ELEMENTS.contains(&name.as_str()) || self_closing {
            continue;
        }
        if closing {
            depth = depth.saturating_sub(1);
        } else if name == "script" || name == "style" {
            rest = closing_tag(rest, &name).map_or("", |e| &rest[e..]);
        } else {
            depth += 1;
            deepest = deepest.max(depth);
            if deepest > limit {
                break;
            }
        }
    }
    deepest
}

/// Where `</name` (any case) starts in `s`.
fn closing_tag(s: &str, name: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("</") {
        let at = from + i;
        if s.as_bytes().get(at + 2..at + 2 + name.len()).is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes())) {
            return Some(at);
        }
        from = at + 2;
    }
    None
}

/// One page of text for `text/plain` and `text/markdown`, converted text for `text/html`;
/// HTML nested absurdly deep is refused (`parse`).
pub fn extract(bytes: &[u8], mime: &str) -> Result<Extracted, (Reason, String)> {
    let html = mime == "text/html";
    let (text, encoding) = decode(bytes, html);
    if html && html_depth(&text, MAX_HTML_DEPTH) > MAX_HTML_DEPTH {
        return Err((Reason::Parse, format!("HTML elements nested more than {MAX_HTML_DEPTH} deep (hostile or broken markup)")));
    }
    let mut warnings = Vec::new();
    let (text, method) = if html {
        match html2text::from_read(text.as_bytes(), HTML_WIDTH) {
            Ok(t) => (t, Method::Html),
            Err(e) => {
                warnings.push(format!("HTML could not be converted ({e}); its text is given with tags"));
                (text, Method::Html)
            }
        }
    } else {
        (text, Method::Text)
    };
    // Normalise line ends so token counts do not depend on the platform that wrote the file.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    if text.trim().is_empty() {
        warnings.push("the file contains no text".into());
    }
    Ok(Extracted {
        mime: mime.into(),
        pages: vec![Page { number: 1, text, method, ocr_reason: None }],
        encoding: Some(encoding.into()),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_encodings_are_detected() {
        let (bytes, _, _) = encoding_rs::WINDOWS_1251.encode("Договор поставки между сторонами. Настоящий договор заключён.");
        let (text, enc) = decode(&bytes, false);
        assert_eq!(enc, "windows-1251");
        assert!(text.starts_with("Договор"));
        let (text, enc) = decode("\u{feff}bom".as_bytes(), false);
        assert_eq!((text.as_str(), enc), ("bom", "UTF-8"));
    }

    #[test]
    fn wide_unicode_forms_are_found_without_a_mark_and_nothing_else_is() {
        let text = "Ústava 𐌰 — договор\n";
        let utf16le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let utf16be: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let utf32be: Vec<u8> = text.chars().flat_map(|c| (c as u32).to_be_bytes()).collect();
        let mut utf32le_bom = vec![0xff, 0xfe, 0, 0];
        utf32le_bom.extend(text.chars().flat_map(|c| (c as u32).to_le_bytes()));
        for (bytes, name) in [(&utf16le, "UTF-16LE"), (&utf16be, "UTF-16BE"), (&utf32be, "UTF-32BE"), (&utf32le_bom, "UTF-32LE")]
        {
            assert_eq!(decode(bytes, false), (text.to_string(), name));
        }
        // Legacy multi-byte text has no NUL bytes; binary data has controls; a lone surrogate is
        // no text.
        let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode("契約書の条項について説明します。");
        assert_eq!(sniff_wide(&sjis), None);
        assert_eq!(sniff_wide(b"\0\x01\x02\x03binary\0\0"), None);
        assert_eq!(sniff_wide(&[b'a', 0, 0x00, 0xd8, b'b', 0]), None);
        // A unit cut off at the end of the sample does not count against the file.
        assert_eq!(sniff_wide(&utf16le[..utf16le.len() - 1]), Some((Wide::Utf16Le, 0)));
    }

    #[test]
    fn html_nesting_is_measured_without_parsing() {
        assert_eq!(html_depth("<div><div><span>x</span></div><div>y</div></div>", 100), 3);
        // Paragraphs and list items close themselves; comments and scripts hold no elements.
        assert_eq!(html_depth(&"<p>para<li>item<br>".repeat(50_000), 100), 0);
        assert_eq!(html_depth("<!-- <div><div> --><script>if (a<b) {'<div>'}</SCRIPT><b/>", 100), 0);
        let deep = format!("{}x{}", "<div>".repeat(20_000), "</div>".repeat(20_000));
        assert_eq!(html_depth(&deep, 1000), 1001, "counting stops past the limit");
        let (reason, msg) = extract(deep.as_bytes(), "text/html").unwrap_err();
        assert_eq!(reason, Reason::Parse, "{msg}");
    }

    #[test]
    fn html_becomes_text() {
        let e = extract(b"<html><head><title>t</title></head><body><h1>Terms</h1><p>You agree.</p></body></html>", "text/html")
            .unwrap();
        assert!(e.pages[0].text.contains("Terms") && e.pages[0].text.contains("You agree."), "{:?}", e.pages[0].text);
        assert!(!e.pages[0].text.contains("<p>"));
    }
}
