//! PDF text layer per page through pdf-extract (font encodings, ToUnicode CMaps, CID fonts,
//! spacing from glyph positions) on lopdf, and the decision which pages need OCR.

use std::panic::{AssertUnwindSafe, catch_unwind};

use memchr::memmem;
use pdf_extract::{Document, ObjectId, PlainTextOutput};

use super::{ExtractLimits, Extracted, Method, Page, garbage_ratio, nesting, unicode_maps, xref_rebuild};
use crate::failure::Reason;

/// Fewer visible characters than this on a page with an image: a scan, not text.
const MIN_TEXT_CHARS: usize = 16;
/// More than this share of unmappable characters: the text layer is unusable.
const MAX_GARBAGE: f64 = 0.3;

/// Extracts every page; errors carry the failure reason and a message without the file name.
pub fn extract(bytes: &[u8], limits: ExtractLimits) -> Result<Extracted, (Reason, String)> {
    let mut warnings = Vec::new();
    let doc = open(bytes, &mut warnings)?;
    // lopdf decrypts with the empty password while loading; the trailer still says it was needed.
    let encrypted = doc.trailer.has(b"Encrypt") || bytes.windows(8).any(|w| w == b"/Encrypt");
    let pages = doc.get_pages();
    if encrypted && pages.is_empty() {
        return Err((Reason::Encrypted, "encrypted PDF: the empty password does not open it".into()));
    }
    if encrypted {
        warnings.push("encrypted PDF opened with the empty user password".into());
    }
    if pages.is_empty() {
        return Err((Reason::Parse, "damaged PDF: no pages could be found".into()));
    }
    if pages.len() > limits.max_pages as usize {
        return Err((Reason::TooLarge, format!("{} pages, over the limit of {}", pages.len(), limits.max_pages)));
    }
    let mut out = Vec::with_capacity(pages.len());
    for (&number, &id) in &pages {
        let mut text = String::new();
        let problem = match nesting::text_forms_fit(&doc, id) {
            Err(why) => Some(why),
            Ok(()) => {
                let run = catch_unwind(AssertUnwindSafe(|| {
                    let mut sink = PlainTextOutput::new(&mut text);
                    pdf_extract::output_doc_page(&doc, &mut sink, number)
                }));
                match run {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(p) => Some(panic_message(&p)),
                }
            }
        };
        if let Some(p) = &problem {
            warnings.push(format!("page {number}: text layer could not be read ({p})"));
        }
        let visible = text.chars().filter(|c| !c.is_whitespace()).count();
        let ocr_reason = if visible < MIN_TEXT_CHARS && shows_text(&doc, id) {
            Some("text layer could not be decoded (font without a usable Unicode mapping)".to_string())
        } else if visible < MIN_TEXT_CHARS && !super::page_image::image_xobjects(&doc, id).is_empty() {
            Some("no text layer (page image)".to_string())
        } else if visible >= MIN_TEXT_CHARS && garbage_ratio(&text) > MAX_GARBAGE {
            Some("text layer is unmapped glyphs".to_string())
        } else {
            None
        };
        if ocr_reason.is_none() && visible == 0 && problem.is_none() {
            warnings.push(format!("page {number} has no text"));
        }
        let method = if ocr_reason.is_some() { Method::Ocr } else { Method::PdfText };
        let text = if ocr_reason.is_some() { String::new() } else { tidy(&text) };
        out.push(Page { number, text, method, ocr_reason });
    }
    Ok(Extracted { mime: "application/pdf".into(), pages: out, encoding: None, warnings })
}

/// Opens (and decrypts) a PDF for its page images, without extracting its text.
pub fn open_document(bytes: &[u8]) -> Result<Document, (Reason, String)> {
    open(bytes, &mut Vec::new())
}

/// Loads the document and decrypts it with the empty user password when it is encrypted.
fn open(bytes: &[u8], warnings: &mut Vec<String>) -> Result<Document, (Reason, String)> {
    let mut doc = load(bytes, warnings)?;
    if doc.is_encrypted() && !doc.trailer.has(b"ID") {
        // The key derivation hashes the first file identifier, and lopdf loads nothing of a file
        // without one. Readers (pdf.js, pypdf) take an empty identifier; so does this retry.
        if let Some(patched) = with_empty_file_id(bytes)
            && let Ok(d) = load(&patched, &mut Vec::new())
        {
            warnings.push("encrypted PDF without a file identifier (/ID): decrypted with an empty one".into());
            doc = d;
        }
    }
    if doc.is_encrypted() {
        doc.decrypt("").map_err(|e| (Reason::Encrypted, format!("encrypted PDF: the empty password does not open it ({e})")))?;
    }
    let cut = nesting::cut_parent_loops(&mut doc);
    if cut > 0 {
        warnings
            .push(format!("damaged PDF repaired: {cut} /Parent links of the page tree that loop or lead too far up were cut"));
    }
    if let Some(d) = unicode_maps::drop_oversized(&mut doc) {
        let (n, codes) = (d.fonts, d.largest);
        let what = if n == 1 {
            format!("1 font names a ToUnicode map of {codes} codes")
        } else {
            format!("{n} fonts name ToUnicode maps of up to {codes} codes")
        };
        warnings.push(format!("damaged PDF: {what} (a font has at most 65,536); their text is read through their encodings"));
    }
    Ok(doc)
}

/// The file with `/ID [() ()]` added to its last classic trailer dictionary. The trailer follows
/// the cross-reference table, so no object offset moves.
fn with_empty_file_id(bytes: &[u8]) -> Option<Vec<u8>> {
    let at = bytes.windows(7).rposition(|w| w == b"trailer")?;
    let open = at + bytes[at..].windows(2).position(|w| w == b"<<")? + 2;
    let mut out = Vec::with_capacity(bytes.len() + 12);
    out.extend_from_slice(&bytes[..open]);
    out.extend_from_slice(b"/ID [() ()]");
    out.extend_from_slice(&bytes[open..]);
    Some(out)
}

/// Loads the document; data that starts after leading junk is retried from its `%PDF-` header,
/// and a file whose cross-reference table or trailer is broken is loaded from a table rebuilt by
/// scanning it for objects ([`xref_rebuild`]), with a warning saying so.
fn load(bytes: &[u8], warnings: &mut Vec<String>) -> Result<Document, (Reason, String)> {
    let mut notes = Vec::new();
    let header = memmem::find(bytes, b"%PDF-");
    let loaded = load_as_written(bytes, header, &mut notes);
    let damage = match &loaded {
        // An encrypted file shows no pages until decrypted: that is a password, not damage.
        Ok(doc) if doc.get_pages().is_empty() && !doc.trailer.has(b"Encrypt") && !doc.is_encrypted() => {
            "no pages could be found".to_string()
        }
        Ok(doc) if !xref_offsets_hold(&bytes[header.unwrap_or(0)..], doc) => {
            "the cross-reference table points at the wrong offsets".to_string()
        }
        Ok(_) => {
            warnings.append(&mut notes);
            return loaded.map_err(|e| (Reason::Parse, e));
        }
        Err(e) => e.clone(),
    };
    if let Some(at) = header
        && let Some((fixed, objects)) = xref_rebuild::rebuild(&bytes[at..])
        && let Ok(Ok(doc)) = catch_unwind(|| Document::load_mem(&fixed))
        && !doc.get_pages().is_empty()
    {
        warnings.push(format!(
            "damaged PDF repaired ({damage}): the cross-reference table was rebuilt from the {objects} objects found in the file"
        ));
        return Ok(doc);
    }
    warnings.append(&mut notes);
    loaded.map_err(|e| (Reason::Parse, format!("damaged PDF: {e}")))
}

/// The file as its own cross-reference table describes it (`header`: where `%PDF-` is).
fn load_as_written(bytes: &[u8], header: Option<usize>, warnings: &mut Vec<String>) -> Result<Document, String> {
    let first = match catch_unwind(|| Document::load_mem(bytes)) {
        Ok(Ok(d)) => return Ok(d),
        Ok(Err(e)) => e.to_string(),
        Err(p) => panic_message(&p),
    };
    if let Some(at) = header.filter(|&at| at > 0)
        && let Ok(Ok(d)) = catch_unwind(|| Document::load_mem(&bytes[at..]))
    {
        warnings.push(format!("{at} bytes before the PDF header were skipped"));
        return Ok(d);
    }
    Err(first)
}

/// Whether every in-file entry of the loaded table points at its object's header (lopdf skips an
/// object it cannot find, so a table with wrong offsets loads with objects silently missing).
/// `data` starts at the `%PDF-` header, where offsets count from.
fn xref_offsets_hold(data: &[u8], doc: &Document) -> bool {
    let entries = doc.reference_table.entries.iter().filter_map(|(&num, e)| match *e {
        pdf_extract::xref::XrefEntry::Normal { offset, generation } => Some((num, generation, offset)),
        _ => None,
    });
    xref_rebuild::offsets_hold(data, entries)
}

/// True when the page's content draws text (`Tj`/`TJ`/`'`/`"` operators) with fonts in use.
fn shows_text(doc: &Document, page: ObjectId) -> bool {
    let Ok(content) = doc.get_page_content(page) else { return false };
    let Ok(ops) = pdf_extract::content::Content::decode(&content) else { return false };
    ops.operations.iter().filter(|o| matches!(o.operator.as_str(), "Tj" | "TJ" | "'" | "\"")).take(MIN_TEXT_CHARS).count()
        >= MIN_TEXT_CHARS
}

/// Trims trailing spaces, collapses runs of blank lines that glyph positioning produces, puts
/// right-to-left lines drawn in visual order back into reading order, and makes Unicode spaces
/// plain ones.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.lines() {
        let spaced: String = line.chars().map(|c| if is_layout_space(c) { ' ' } else { c }).collect();
        let fixed = logical_order(spaced.trim_end());
        let line = fixed.as_str();
        if line.is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim_matches('\n').to_string()
}

/// A space other than U+0020 that a PDF's fonts map glyphs to: producers that convert HTML set
/// every word gap and indentation in no-break spaces (U+00A0), others put U+2029 between the
/// words of figure labels. The tokenizer reads such a gap as a token of its own, where a plain
/// space joins the next word's token: a contract in no-break spaces costs up to 1.7 times the
/// prompt tokens (benches/RESULTS.md). The ideographic space (U+3000) stays: in Chinese and
/// Japanese text it is a full-width character of its own.
fn is_layout_space(c: char) -> bool {
    !c.is_ascii() && c.is_whitespace() && c != '\u{3000}'
}

/// Hebrew and Arabic letters, including Arabic presentation forms.
fn is_rtl(c: char) -> bool {
    matches!(c as u32, 0x0590..=0x08FF | 0xFB1D..=0xFDFF | 0xFE70..=0xFEFF)
}

/// Evidence that a line of RTL text is in visual (left-to-right drawing) order: word-final
/// letter forms at the start of words. Hebrew has final letters (ך ם ן ף ץ); Arabic
/// presentation forms encode final and initial shapes.
fn visual_order_score(line: &str) -> i32 {
    fn final_form(c: char) -> bool {
        matches!(c, 'ך' | 'ם' | 'ן' | 'ף' | 'ץ') || arabic_form(c) == Some(Form::Final)
    }
    fn initial_form(c: char) -> bool {
        arabic_form(c) == Some(Form::Initial)
    }
    let mut score = 0;
    for w in line.split(|c: char| !is_rtl(c) || c.is_whitespace()).filter(|w| w.chars().count() > 1) {
        let (first, last) = (w.chars().next().unwrap_or(' '), w.chars().last().unwrap_or(' '));
        score += i32::from(final_form(first)) + i32::from(initial_form(last));
        score -= i32::from(final_form(last)) + i32::from(initial_form(first));
    }
    score
}

#[derive(PartialEq)]
enum Form {
    Initial,
    Final,
}

/// Shape of an Arabic presentation-form letter (U+FE70–U+FEFC): letters come in groups of
/// isolated, final, initial, medial (2-form letters: isolated, final).
fn arabic_form(c: char) -> Option<Form> {
    let u = c as u32;
    if !(0xFE80..=0xFEFC).contains(&u) {
        return None;
    }
    // Two-form letters (alef, dal, thal, ra, zain, waw, teh marbuta, alef maksura variants).
    const TWO: &[(u32, u32)] = &[(0xFE81, 0xFE8E), (0xFE93, 0xFE94), (0xFEA9, 0xFEB0), (0xFEED, 0xFEF0), (0xFEF5, 0xFEFC)];
    if let Some(&(start, _)) = TWO.iter().find(|(a, b)| (*a..=*b).contains(&u)) {
        return ((u - start) % 2 == 1).then_some(Form::Final);
    }
    match (u - 0xFE80) % 4 {
        2 if u > 0xFE8E => Some(Form::Final),
        3 if u > 0xFE8E => Some(Form::Initial),
        _ => None,
    }
}

/// Reverses a visual-order RTL line into reading order, keeping left-to-right runs (Latin,
/// digits) in their own order.
fn logical_order(line: &str) -> String {
    if !line.chars().any(is_rtl) || visual_order_score(line) <= 0 {
        return line.to_string();
    }
    let rev: Vec<char> = line.chars().rev().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < rev.len() {
        if rev[i].is_alphanumeric() && !is_rtl(rev[i]) {
            let mut j = i;
            while j < rev.len() && !is_rtl(rev[j]) && (rev[j].is_alphanumeric() || ".,:/-".contains(rev[j])) {
                j += 1;
            }
            out.extend(rev[i..j].iter().rev());
            i = j;
        } else {
            out.push(match rev[i] {
                '(' => ')',
                ')' => '(',
                c => c,
            });
            i += 1;
        }
    }
    out
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    format!("parser panicked: {}", msg.unwrap_or_else(|| "unknown cause".into()))
}

#[cfg(test)]
mod tests {
    use super::{logical_order, tidy};

    #[test]
    fn unicode_spaces_become_plain_ones_but_the_ideographic_space_stays() {
        let layered = "\u{a0}\u{a0}1.\u{a0}Appointment.\u{a0}NETGEAR\u{a0}appoints\u{a0}\u{a0}\nTrunk\u{2029}Trace\u{202f}Anchor";
        assert_eq!(tidy(layered), "  1. Appointment. NETGEAR appoints\nTrunk Trace Anchor");
        assert_eq!(tidy("第一条\u{3000}目的"), "第一条\u{3000}目的");
    }

    #[test]
    fn visual_rtl_lines_are_reordered_and_logical_ones_kept() {
        // "שלום עולם" drawn left to right: final mem first.
        assert_eq!(logical_order("םלוע םולש"), "שלום עולם");
        assert_eq!(logical_order("שלום עולם"), "שלום עולם");
        assert_eq!(logical_order(" 15 ףיעס"), "סעיף 15 ");
        assert_eq!(logical_order("plain text"), "plain text");
    }
}
