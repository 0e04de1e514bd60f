//! Recovery of PDFs whose cross-reference table or trailer is broken (wrong offsets, a
//! truncated or missing table, no trailer, a looping `/Prev` chain), the way poppler and pdf.js
//! do it: scan the whole file for `N G obj` headers, keep the last definition of each object
//! (incremental updates append newer ones), and find the trailer's keys in the last `trailer`
//! dictionary or cross-reference stream, or else the document catalog among the objects.
//!
//! The result is the file with a fresh cross-reference section and trailer appended, which
//! lopdf then loads as it loads any incrementally updated file; nothing before it moves.

use std::collections::BTreeMap;
use std::fmt::Write;

use memchr::memmem;

/// The file (`data`, from its `%PDF-` header on) with a rebuilt cross-reference section
/// appended, and how many objects were found.
pub fn rebuild(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let objects = scan_objects(data);
    let root = trailer_keys(data, &objects).filter(|t| objects.contains_key(&t.root.0)).or_else(|| {
        // No usable trailer: the catalog is the last object that says it is one.
        let (&num, &(gen_, _)) = objects.iter().rev().find(|(_, (_, at))| dictionary_of(data, *at).is_some_and(is_catalog))?;
        Some(Trailer { root: (num, gen_), info: None, encrypt: None, id: None })
    })?;
    let mut out = Vec::with_capacity(data.len() + objects.len() * 20 + 256);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n");
    // Streams whose `/Length` misses their `endstream` are written again after the file with
    // their true length, and the table points at the new copy.
    let fixed: Vec<(u32, Vec<u8>)> =
        objects.iter().filter_map(|(&num, &entry)| Some((num, with_true_length(data, &objects, num, entry)?))).collect();
    let mut objects = objects;
    for (num, copy) in fixed {
        objects.entry(num).and_modify(|e| e.1 = out.len());
        out.extend_from_slice(&copy);
    }
    let xref_at = out.len();
    let mut table = String::from("xref\n0 1\n0000000000 65535 f \n");
    // One subsection per run of consecutive object numbers, so a hostile number costs nothing.
    let nums: Vec<u32> = objects.keys().copied().collect();
    let mut i = 0;
    while i < nums.len() {
        let mut j = i + 1;
        while j < nums.len() && nums[j] == nums[j - 1] + 1 {
            j += 1;
        }
        let _ = writeln!(table, "{} {}", nums[i], j - i);
        for n in &nums[i..j] {
            let (gen_, at) = objects[n];
            let _ = writeln!(table, "{at:010} {gen_:05} n ");
        }
        i = j;
    }
    let size = nums.last().map_or(1, |n| n + 1);
    let _ = write!(table, "trailer\n<< /Size {size} /Root {} {} R", root.root.0, root.root.1);
    for (key, value) in [("Info", root.info), ("Encrypt", root.encrypt)] {
        if let Some((n, g)) = value.filter(|(n, _)| objects.contains_key(n)) {
            let _ = write!(table, " /{key} {n} {g} R");
        }
    }
    if let Some(id) = &root.id {
        let _ = write!(table, " /ID {id}");
    }
    let _ = write!(table, " >>\nstartxref\n{xref_at}\n%%EOF\n");
    out.extend_from_slice(table.as_bytes());
    Some((out, objects.len()))
}

/// True when every entry of a loaded cross-reference table that gives an offset points at the
/// header of the object it names (`data` starts at the `%PDF-` header, as offsets count from it).
pub fn offsets_hold(data: &[u8], entries: impl Iterator<Item = (u32, u16, u32)>) -> bool {
    entries.into_iter().all(|(num, gen_, at)| header_at(data, at as usize) == Some((num, gen_)))
}

/// The largest object number PDF allows (ISO 32000 implementation limits); beyond it a number
/// is junk, and the table's size stays a valid `u32`.
const MAX_OBJECT_NUMBER: u32 = 8_388_607;

/// Object number → (generation, offset of its header) for every `N G obj` in the file; a later
/// definition replaces an earlier one.
fn scan_objects(data: &[u8]) -> BTreeMap<u32, (u16, usize)> {
    let mut out = BTreeMap::new();
    for kw in memmem::find_iter(data, b"obj") {
        // `obj` must end a token: `objx` or `endobj` are something else.
        if data.get(kw + 3).is_some_and(|&c| !is_delimiter(c)) {
            continue;
        }
        if let Some(start) = header_start(data, kw)
            && let Some((num, gen_)) = header_at(data, start)
            && num <= MAX_OBJECT_NUMBER
        {
            out.insert(num, (gen_, start));
        }
    }
    out
}

/// Where the `N G` before the `obj` keyword at `kw` starts, if that is what precedes it.
fn header_start(data: &[u8], kw: usize) -> Option<usize> {
    let mut i = kw;
    let skip_space = |i: &mut usize| -> bool {
        let end = *i;
        while *i > 0 && data[*i - 1].is_ascii_whitespace() {
            *i -= 1;
        }
        *i < end
    };
    let skip_digits = |i: &mut usize| -> bool {
        let end = *i;
        while *i > 0 && data[*i - 1].is_ascii_digit() && end - *i < 10 {
            *i -= 1;
        }
        *i < end
    };
    let ok = skip_space(&mut i) && skip_digits(&mut i) && skip_space(&mut i) && skip_digits(&mut i);
    // The number must start a token too (`12 0 obj`, not `x12 0 obj`).
    (ok && (i == 0 || is_delimiter(data[i - 1]))).then_some(i)
}

/// The object number and generation of an `N G obj` header at `at` (leading whitespace allowed).
fn header_at(data: &[u8], at: usize) -> Option<(u32, u16)> {
    let rest = data.get(at..)?;
    let (num, a) = number_at(rest)?;
    let (gen_, b) = number_at(&rest[a..])?;
    let rest = rest[a + b..].trim_ascii_start();
    let header = rest.starts_with(b"obj") && rest.get(3).is_none_or(|&c| is_delimiter(c));
    header.then_some((u32::try_from(num).ok()?, u16::try_from(gen_).ok()?))
}

/// The unsigned number that `s` starts with after white space, and where it ends.
fn number_at(s: &[u8]) -> Option<(u64, usize)> {
    let start = s.iter().position(|c| !c.is_ascii_whitespace())?;
    let len = s[start..].iter().take_while(|c| c.is_ascii_digit()).count();
    Some((std::str::from_utf8(&s[start..start + len]).ok()?.parse().ok()?, start + len))
}

fn is_delimiter(c: u8) -> bool {
    c.is_ascii_whitespace() || b"()<>[]{}/%".contains(&c)
}

/// The keys of a trailer this module carries over.
struct Trailer {
    root: (u32, u16),
    info: Option<(u32, u16)>,
    encrypt: Option<(u32, u16)>,
    /// The `/ID` array as written.
    id: Option<String>,
}

/// The keys of the last `trailer` dictionary, or of the last cross-reference stream's dictionary.
fn trailer_keys(data: &[u8], objects: &BTreeMap<u32, (u16, usize)>) -> Option<Trailer> {
    let classic = memmem::rfind_iter(data, b"trailer").find_map(|at| {
        let open = at + 7 + data[at + 7..].iter().position(|c| !c.is_ascii_whitespace())?;
        data[open..].starts_with(b"<<").then(|| balanced_dictionary(&data[open..]))?
    });
    let stream = || {
        let mut xref_streams: Vec<usize> = objects.values().map(|&(_, at)| at).collect();
        xref_streams.sort_unstable();
        xref_streams.into_iter().rev().filter_map(|at| dictionary_of(data, at)).find(|d| has_name(d, b"/Type", b"/XRef"))
    };
    let dict = classic.filter(|d| reference(d, b"/Root").is_some()).or_else(stream)?;
    let id = memmem::find(dict, b"/ID").and_then(|at| {
        let rest = &dict[at + 3..];
        let open = rest.iter().position(|&c| c == b'[')?;
        let close = open + rest[open..].iter().position(|&c| c == b']')?;
        std::str::from_utf8(&rest[open..=close]).ok().map(str::to_string)
    });
    Some(Trailer { root: reference(dict, b"/Root")?, info: reference(dict, b"/Info"), encrypt: reference(dict, b"/Encrypt"), id })
}

/// The dictionary that opens the object whose header is at `at`.
fn dictionary_of(data: &[u8], at: usize) -> Option<&[u8]> {
    dictionary_span(data, at).map(|(open, end)| &data[open..end])
}

/// Where the dictionary that opens the object whose header is at `at` starts and ends.
fn dictionary_span(data: &[u8], at: usize) -> Option<(usize, usize)> {
    let kw = at + memmem::find(&data[at..(at + 32).min(data.len())], b"obj")?;
    let open = kw + 3 + data[kw + 3..].iter().take(64).position(|c| !c.is_ascii_whitespace())?;
    let dict = data[open..].starts_with(b"<<").then(|| balanced_dictionary(&data[open..]))??;
    Some((open, open + dict.len()))
}

/// The object `num` (generation and header offset in `entry`) written again with its stream's
/// true `/Length`, when the length it declares (a number, or an object of `objects` holding one)
/// does not end at its `endstream`, as pdf.js and poppler read such streams; `None` when it has
/// no stream or its length holds.
fn with_true_length(data: &[u8], objects: &BTreeMap<u32, (u16, usize)>, num: u32, (gen_, at): (u16, usize)) -> Option<Vec<u8>> {
    let (open, end) = dictionary_span(data, at)?;
    let dict = &data[open..end];
    let after = &data[end..];
    let keyword = after.len() - after.trim_ascii_start().len();
    if !after[keyword..].starts_with(b"stream") {
        return None;
    }
    let mut start = end + keyword + 6;
    start +=
        if data[start..].starts_with(b"\r\n") { 2 } else { usize::from(data.get(start).is_some_and(|c| b"\r\n".contains(c))) };
    let key = memmem::find(dict, b"/Length")? + 7;
    let (declared, value) = declared_length(data, objects, &dict[key..])?;
    let holds = data.get(start.checked_add(declared)?..).is_some_and(|rest| rest.trim_ascii_start().starts_with(b"endstream"));
    if holds {
        return None;
    }
    let mut stop = start + memmem::find(&data[start..], b"endstream")?;
    // The end-of-line before `endstream` belongs to the syntax, not to the data.
    stop -= if data[..stop].ends_with(b"\r\n") {
        2
    } else {
        usize::from(data[..stop].ends_with(b"\n") || data[..stop].ends_with(b"\r"))
    };
    let stop = stop.max(start);
    let mut out = format!("{num} {gen_} obj\n").into_bytes();
    out.extend_from_slice(&dict[..key]);
    out.extend_from_slice(format!(" {}", stop - start).as_bytes());
    out.extend_from_slice(&dict[key + value..]);
    out.extend_from_slice(b"\nstream\n");
    out.extend_from_slice(&data[start..stop]);
    out.extend_from_slice(b"\nendstream\nendobj\n");
    Some(out)
}

/// The length a `/Length` value declares (`v` starts after the key) and how many bytes the value
/// takes: a number, or a reference (`5 0 R`) to an object of `objects` that holds one.
fn declared_length(data: &[u8], objects: &BTreeMap<u32, (u16, usize)>, v: &[u8]) -> Option<(usize, usize)> {
    let (first, a) = number_at(v)?;
    if let Some((gen_, b)) = number_at(&v[a..])
        && let r = v[a + b..].trim_ascii_start()
        && r.starts_with(b"R")
    {
        let &(g, at) = objects.get(&u32::try_from(first).ok()?)?;
        if u64::from(g) != gen_ {
            return None;
        }
        let body = data.get(at..)?;
        let value = memmem::find(&body[..body.len().min(64)], b"obj")? + 3;
        // Up to and with the `R`.
        let written = v.len() - r.len() + 1;
        return Some((usize::try_from(number_at(&body[value..])?.0).ok()?, written));
    }
    Some((usize::try_from(first).ok()?, a))
}

/// `<< … >>` at the start of `s`, nested dictionaries and literal strings included; `None` when
/// it does not close within 64 KiB.
fn balanced_dictionary(s: &[u8]) -> Option<&[u8]> {
    let (mut depth, mut paren, mut i) = (0usize, 0usize, 0usize);
    while i + 1 < s.len().min(64 << 10) {
        match (s[i], s[i + 1]) {
            (b'\\', _) if paren > 0 => i += 1,
            (b'(', _) => paren += 1,
            (b')', _) if paren > 0 => paren -= 1,
            (b'<', b'<') if paren == 0 => {
                depth += 1;
                i += 1;
            }
            (b'>', b'>') if paren == 0 => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Some(&s[..=i]);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// `key N G R` in a dictionary's text.
fn reference(dict: &[u8], key: &[u8]) -> Option<(u32, u16)> {
    memmem::find_iter(dict, key).find_map(|at| {
        let rest = &dict[at + key.len()..];
        // `/Root` must not be the start of a longer name.
        if rest.first().is_some_and(|&c| !is_delimiter(c)) {
            return None;
        }
        let text = String::from_utf8_lossy(&rest[..rest.len().min(40)]);
        let mut words = text.split_ascii_whitespace();
        let (n, g, r) = (words.next()?, words.next()?, words.next()?);
        (r.starts_with('R')).then_some(())?;
        Some((n.parse().ok()?, g.parse().ok()?))
    })
}

fn has_name(dict: &[u8], key: &[u8], value: &[u8]) -> bool {
    memmem::find_iter(dict, key).any(|at| dict[at + key.len()..].trim_ascii_start().starts_with(value))
}

fn is_catalog(dict: &[u8]) -> bool {
    has_name(dict, b"/Type", b"/Catalog")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-page PDF written by hand; its cross-reference table is damaged by each test.
    fn pdf(objects: &[&str]) -> (Vec<u8>, Vec<usize>) {
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, body) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
        }
        (out, offsets)
    }

    const OBJECTS: [&str; 4] = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] /Contents 4 0 R >>",
        "<< /Length 8 >>\nstream\n(endobj)\nendstream",
    ];

    #[test]
    fn objects_are_found_and_the_catalog_stands_in_for_a_missing_trailer() {
        let (bytes, offsets) = pdf(&OBJECTS);
        let found = scan_objects(&bytes);
        assert_eq!(
            found.into_iter().map(|(n, (_, at))| (n, at)).collect::<Vec<_>>(),
            vec![(1, offsets[0]), (2, offsets[1]), (3, offsets[2]), (4, offsets[3])]
        );
        let (fixed, n) = rebuild(&bytes).unwrap();
        assert_eq!(n, 4);
        let tail = String::from_utf8_lossy(&fixed[bytes.len()..]).into_owned();
        assert!(tail.contains("/Root 1 0 R") && tail.contains(&format!("{:010} 00000 n \n", offsets[2])), "{tail}");
        let doc = pdf_extract::Document::load_mem(&fixed).unwrap();
        assert_eq!(doc.get_pages().len(), 1);
    }

    #[test]
    fn the_last_definition_wins_and_the_trailer_keys_carry_over() {
        let (mut bytes, offsets) = pdf(&OBJECTS);
        let newer = bytes.len();
        bytes.extend_from_slice(b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>\nendobj\n");
        bytes.extend_from_slice(b"5 0 obj\n<< /Producer (x>>y) >>\nendobj\n");
        bytes.extend_from_slice(
            b"xref\n0 1\n0000000000 65535 f \ntrailer\n<< /Size 6 /Root 1 0 R /Info 5 0 R /ID [<AB> <CD>] >>\n",
        );
        let (fixed, _) = rebuild(&bytes).unwrap();
        let tail = String::from_utf8_lossy(&fixed[bytes.len()..]).into_owned();
        let entries: Vec<&str> = tail.lines().skip_while(|l| *l != "1 5").skip(1).take(5).collect();
        assert_eq!(entries[2], format!("{newer:010} 00000 n "), "object 3 is its newer definition: {tail}");
        assert_eq!(entries[0], format!("{:010} 00000 n ", offsets[0]), "{tail}");
        assert!(tail.contains("/Info 5 0 R") && tail.contains("/ID [<AB> <CD>]"), "{tail}");
    }

    #[test]
    fn a_stream_whose_length_misses_its_end_is_written_again_with_its_true_length() {
        let text = "BT /F1 12 Tf 10 10 Td (the whole line of text) Tj ET";
        let short = format!("<< /Length 12 /Filter [] >>\nstream\r\n{text}\r\nendstream");
        let (bytes, _) = pdf(&[OBJECTS[0], OBJECTS[1], OBJECTS[2], &short]);
        let (fixed, _) = rebuild(&bytes).unwrap();
        let tail = String::from_utf8_lossy(&fixed[bytes.len()..]).into_owned();
        let copy = format!("4 0 obj\n<< /Length {} /Filter [] >>\nstream\n{text}\nendstream\nendobj\n", text.len());
        assert!(tail.contains(&copy), "{tail}");
        let doc = pdf_extract::Document::load_mem(&fixed).unwrap();
        let content = doc.get_object((4, 0)).unwrap().as_stream().unwrap().content.clone();
        assert_eq!(content, text.as_bytes());
        // A length in an object of its own that misses too.
        let indirect = format!("<< /Length 5 0 R >>\nstream\n{text}\nendstream");
        let (bytes, _) = pdf(&[OBJECTS[0], OBJECTS[1], OBJECTS[2], &indirect, "12"]);
        let (fixed, _) = rebuild(&bytes).unwrap();
        let tail = String::from_utf8_lossy(&fixed[bytes.len()..]).into_owned();
        assert!(tail.contains(&format!("4 0 obj\n<< /Length {} >>\nstream\n{text}\n", text.len())), "{tail}");
        let (bytes, _) = pdf(&[OBJECTS[0], OBJECTS[1], OBJECTS[2], &indirect, &text.len().to_string()]);
        let (fixed, _) = rebuild(&bytes).unwrap();
        assert!(!String::from_utf8_lossy(&fixed[bytes.len()..]).contains("obj"), "an indirect length that holds");
        // A length that holds is left alone.
        let (bytes, _) = pdf(&OBJECTS);
        let (fixed, _) = rebuild(&bytes).unwrap();
        assert!(!String::from_utf8_lossy(&fixed[bytes.len()..]).contains("obj"), "no object written again");
    }

    #[test]
    fn offsets_are_checked_against_the_headers() {
        let (bytes, offsets) = pdf(&OBJECTS);
        assert!(offsets_hold(&bytes, [(1, 0, offsets[0] as u32), (4, 0, offsets[3] as u32)].into_iter()));
        assert!(!offsets_hold(&bytes, [(1, 0, offsets[0] as u32 + 3)].into_iter()));
        assert!(!offsets_hold(&bytes, [(2, 0, offsets[0] as u32)].into_iter()), "the header names another object");
    }

    #[test]
    fn hostile_numbers_and_lookalikes_are_not_objects() {
        let bytes = b"%PDF-1.4\n4294967295 0 obj\nendobj x12 0 obj 99999999999 0 obj 7 0 objx 8 0 obj<<>>endobj";
        let found = scan_objects(bytes);
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), vec![8]);
        assert!(rebuild(bytes).is_none(), "no catalog, no document");
    }
}
