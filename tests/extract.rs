//! Text extraction against poppler's pdftotext on every text PDF of the corpus (references in
//! tests/data/pdftotext, made by tests/data/make_pdftotext_refs.sh), plus text formats and
//! encrypted files. The extractor runs isolated (`deltadoc extract --json`), as in the daemon.
//!
//! Similarity is the F1 of character-bigram multisets after dropping whitespace and case:
//! insensitive to line breaks, column order and spacing (where extractors legitimately differ),
//! sensitive to missing, extra or wrongly decoded text. Words (runs between ASCII spaces and
//! line breaks, as the tokenizer splits them) are counted apart from it: a text whose word gaps
//! are no-break spaces reads the same but costs far more prompt tokens.

mod common;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

fn extract_json(path: &Path) -> Value {
    let out = common::deltadoc_output(&["extract", "--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn bigrams(s: &str) -> HashMap<(char, char), usize> {
    let chars: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect();
    let mut m = HashMap::new();
    for w in chars.windows(2) {
        *m.entry((w[0], w[1])).or_insert(0) += 1;
    }
    m
}

fn words(s: &str) -> usize {
    s.split([' ', '\n', '\t', '\r', '\u{c}']).filter(|w| !w.is_empty()).count()
}

fn similarity(a: &str, b: &str) -> f64 {
    let (x, y) = (bigrams(a), bigrams(b));
    let (nx, ny): (usize, usize) = (x.values().sum(), y.values().sum());
    if nx + ny == 0 {
        return 1.0;
    }
    let common: usize = x.iter().map(|(k, &n)| n.min(*y.get(k).unwrap_or(&0))).sum();
    2.0 * common as f64 / (nx + ny) as f64
}

/// Files where pdftotext and deltadoc legitimately disagree, with the reason (kept short).
const KNOWN_LOW: &[(&str, &str)] = &[
    ("pdfminer__issue-625-identity-cmap.pdf", "pdf-extract decodes no text from its Identity-H fonts: pages go to OCR"),
    ("pdfjs__issue11656.pdf", "Hebrew: poppler adds bidi embedding marks and mirrors brackets differently"),
];

#[test]
fn pdf_text_matches_pdftotext() {
    let Some(_corpus) = common::corpus() else { return };
    let refs = common::root().join("tests/data/pdftotext");
    let corpus = common::corpus_path();
    let mut rows = Vec::new();
    let mut stack = vec![refs.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&refs).unwrap().to_string_lossy().trim_end_matches(".txt").to_string();
            let want = std::fs::read_to_string(&p).unwrap();
            let got = extract_json(&corpus.join(&rel));
            let text = match got.get("ok") {
                Some(ok) => {
                    ok["pages"].as_array().unwrap().iter().map(|p| p["text"].as_str().unwrap()).collect::<Vec<_>>().join("\n")
                }
                None => String::new(),
            };
            let ocr_pages = got["ok"]["pages"].as_array().map(|p| p.iter().filter(|p| p["method"] == "ocr").count()).unwrap_or(0);
            rows.push((
                rel,
                similarity(&text, &want),
                want.chars().filter(|c| !c.is_whitespace()).count(),
                ocr_pages,
                got.get("error").cloned(),
                (words(&text), words(&want)),
            ));
        }
    }
    rows.sort_by(|a, b| a.1.total_cmp(&b.1));
    eprintln!("{:>6} {:>8} {:>4} {:>13}  file", "sim", "chars", "ocr", "words/theirs");
    for (rel, sim, chars, ocr, err, (ours, theirs)) in &rows {
        let error = err.as_ref().map(|e| format!("  ERROR {e}")).unwrap_or_default();
        eprintln!("{sim:>6.3} {chars:>8} {ocr:>4} {:>13}  {rel}{error}", format!("{ours}/{theirs}"));
    }
    let mean = rows.iter().map(|r| r.1).sum::<f64>() / rows.len() as f64;
    eprintln!("{} files, mean similarity {mean:.3}", rows.len());
    assert!(rows.len() >= 40, "references missing: run tests/data/make_pdftotext_refs.sh");
    for (rel, sim, chars, _, err, (ours, theirs)) in &rows {
        // Long texts only: in a short one a heading split or joined differently moves the ratio.
        if *theirs >= 1000 {
            let ratio = *ours as f64 / *theirs as f64;
            assert!((0.9..=1.1).contains(&ratio), "{rel}: {ours} words against pdftotext's {theirs}");
        }
        if let Some((_, why)) = KNOWN_LOW.iter().find(|(f, _)| rel.ends_with(f)) {
            eprintln!("known: {rel}: {why}");
            continue;
        }
        // Pages with almost no text (forms, scans) make the ratio meaningless.
        if *chars < 50 {
            continue;
        }
        assert!(err.is_none(), "{rel}: extraction failed: {err:?}");
        assert!(*sim >= 0.80, "{rel}: similarity {sim:.3} with pdftotext");
    }
    assert!(mean >= 0.90, "mean similarity {mean:.3}");
}

#[test]
fn encrypted_pdfs_open_with_the_empty_password_and_others_are_refused() {
    let Some(_corpus) = common::corpus() else { return };
    let c = common::corpus_path();
    for f in ["pdf/lopdf__encrypted.pdf", "pdf/pdfjs__issue7665.pdf", "pdf/pdfjs__bug1815476.pdf"] {
        let v = extract_json(&c.join(f));
        let ok = v.get("ok").unwrap_or_else(|| panic!("{f}: {v}"));
        assert!(ok["warnings"].to_string().contains("empty user password"), "{f}: {ok}");
    }
    // No file identifier in the trailer: the key is derived from an empty one, as readers do.
    let v = extract_json(&c.join("scanned/pdfminer__encrypted_doc_no_id.pdf"));
    let ok = v.get("ok").unwrap_or_else(|| panic!("{v}"));
    assert!(ok["warnings"].to_string().contains("without a file identifier"), "{ok}");
    assert_eq!(ok["pages"].as_array().unwrap().len(), 3, "{ok}");
    let v = extract_json(&c.join("pdf/pdfminer__aes-256.pdf"));
    assert_eq!(v["error"]["reason"], "encrypted", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("pdfminer__aes-256.pdf"));
}

#[test]
fn text_files_in_legacy_encodings_and_html_fragments() {
    let Some(_corpus) = common::corpus() else { return };
    let c = common::corpus_path();
    let mut seen = 0;
    for e in std::fs::read_dir(c.join("text")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let v = extract_json(&e.path());
        let ok = v.get("ok").unwrap_or_else(|| panic!("{name}: {v}"));
        let text = ok["pages"][0]["text"].as_str().unwrap();
        assert!(!text.contains('\u{fffd}'), "{name}: replacement characters, wrong encoding {}", ok["encoding"]);
        if name.ends_with(".html") {
            assert!(!text.contains("<p>") && !text.contains("</"), "{name}: tags left in text");
        }
        seen += 1;
    }
    assert!(seen >= 10);
    // The Russian control file and its windows-1251 twin read the same.
    let find = |needle: &str| -> String {
        std::fs::read_dir(c.join("text"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains(needle))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let cp1251 = extract_json(Path::new(&find("1251")));
    assert_eq!(cp1251["ok"]["encoding"], "windows-1251");
}

/// PDFs whose cross-reference table or trailer is broken are read from a table rebuilt by
/// scanning the file for objects (and streams by their `endstream` when their `/Length` misses
/// it), as poppler and pdf.js do, and the result says so.
#[test]
fn damaged_pdfs_are_repaired_and_the_result_says_so() {
    let Some(_corpus) = common::corpus() else { return };
    let c = common::corpus_path();
    for (f, pages, needle) in [
        ("malformed/qpdf__bad-xref.pdf", 1, "Potato"),
        ("malformed/pdfjs__xref_command_missing.pdf", 1, "Reduced test-case"),
        ("malformed/qpdf__append-xref-loop.pdf", 30, "Potato 0 new"),
        ("malformed/qpdf__issue-202.pdf", 10, "How to compile a .tex"),
        // Junk before the header, no startxref value, and a stream /Length shorter than the
        // stream: the true length is found at its `endstream`.
        ("malformed/pdfjs__issue6069.pdf", 1, "Missing value for startxref and junk before magic header"),
        ("pdf/pdfa20__pdf20-utf8-test.pdf", 1, "PDF 2.0 with UTF-8 test file"),
    ] {
        let v = extract_json(&c.join(f));
        let ok = v.get("ok").unwrap_or_else(|| panic!("{f}: {v}"));
        let got = ok["pages"].as_array().unwrap();
        let text: String = got.iter().map(|p| p["text"].as_str().unwrap()).collect();
        assert_eq!(got.len(), pages, "{f}: pages");
        assert!(text.contains(needle), "{f}: {needle:?} not in {text:?}");
        assert!(ok["warnings"].to_string().contains("damaged PDF repaired"), "{f}: {}", ok["warnings"]);
    }
    // An intact file is not "repaired".
    let v = extract_json(&c.join("contracts/NELNETINC_04_08_2020-EX-1-JOINT FILING AGREEMENT.PDF"));
    assert!(!v["ok"]["warnings"].to_string().contains("repaired"), "{v}");
}

/// Real UTF-16 and UTF-32 files without a byte order mark (tests/data/encodings) are text in
/// their encoding, characters outside the Basic Multilingual Plane included.
#[test]
fn utf16_and_utf32_without_a_byte_order_mark_are_text() {
    let dir = common::root().join("tests/data/encodings");
    for (f, encoding, needle) in [
        ("nobom-utf16le.txt", "UTF-16LE", "DateTime,Bid,Ask\n07/19/2015 21:00:15.469,1.083,1.08332"),
        ("nobom-utf32le.txt", "UTF-32LE", "DateTime,Bid,Ask\n07/19/2015 21:00:15.469,1.083,1.08332"),
        ("plane1-utf-16be.html", "UTF-16BE", "Unicode Plane 1 Example Usage For Business Applications"),
        ("plane1-utf-32be.html", "UTF-32BE", "Unicode Plane 1 Example Usage For Business Applications"),
    ] {
        let v = extract_json(&dir.join(f));
        let ok = v.get("ok").unwrap_or_else(|| panic!("{f}: {v}"));
        assert_eq!(ok["encoding"], encoding, "{f}");
        let text = ok["pages"][0]["text"].as_str().unwrap();
        assert!(text.contains(needle), "{f}: {needle:?} not in {:?}", &text[..text.len().min(300)]);
        assert!(!text.contains('\u{fffd}') && !text.contains('\0'), "{f}: wrongly decoded");
        if f.ends_with(".html") {
            assert_eq!(ok["mime"], "text/html", "{f}");
            assert!(text.contains('\u{10313}'), "{f}: the Gothic letters of plane 1 are missing");
        }
    }
}
