//! Plain text, Markdown and HTML: encoding detection (BOM, UTF-8, declared charset, then
//! Firefox's detector) and HTML to text.

use encoding_rs::Encoding;

use super::{Extracted, Method, Page};

/// Width HTML text is wrapped at: wide enough not to split sentences, narrow enough to read.
const HTML_WIDTH: usize = 200;

/// True when the bytes start with a UTF-16 byte order mark (text that contains NUL bytes).
pub fn has_utf16_bom(head: &[u8]) -> bool {
    head.starts_with(b"\xff\xfe") || head.starts_with(b"\xfe\xff")
}

/// True when the start of a file looks like HTML whatever its extension.
pub fn sniff_html(head: &[u8]) -> bool {
    let s = String::from_utf8_lossy(&head[..head.len().min(512)]).trim_start().to_ascii_lowercase();
    s.starts_with("<!doctype html") || s.starts_with("<html")
}

/// Decodes text bytes: BOM first, then strict UTF-8, then a charset declared in HTML, then
/// detection. Returns the text and the encoding's name.
pub fn decode(bytes: &[u8], html: bool) -> (String, &'static str) {
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

/// One page of text for `text/plain` and `text/markdown`, converted text for `text/html`.
pub fn extract(bytes: &[u8], mime: &str) -> Extracted {
    let html = mime == "text/html";
    let (text, encoding) = decode(bytes, html);
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
    Extracted {
        mime: mime.into(),
        pages: vec![Page { number: 1, text, method, ocr_reason: None }],
        encoding: Some(encoding.into()),
        warnings,
    }
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
    fn html_becomes_text() {
        let e = extract(b"<html><head><title>t</title></head><body><h1>Terms</h1><p>You agree.</p></body></html>", "text/html");
        assert!(e.pages[0].text.contains("Terms") && e.pages[0].text.contains("You agree."), "{:?}", e.pages[0].text);
        assert!(!e.pages[0].text.contains("<p>"));
    }
}
