//! ToUnicode CMaps, bounded. pdf-extract expands every `bfrange` of a font's ToUnicode CMap into
//! one map entry per code, anew for each page that uses the font, with no bound: one damaged range
//! of 5.2 million codes in a 42 KB file (a fuzzer's find, fuzz/regressions/pdf_text) took 12 s and
//! 1 GB. A real map has at most one entry per code of the font's code space, 65,536 for the
//! two-byte codes of CID fonts, so a CMap that maps more than [`MAX_CODES`] is damage or hostile:
//! the fonts that name it lose their `/ToUnicode` when the file is opened, and pdf-extract reads
//! their text through their encodings instead (what it does for a font without a map).

use std::collections::{HashMap, HashSet};

use adobe_cmap_parser::Value;
use pdf_extract::{Document, Object, ObjectId};

/// Codes one ToUnicode CMap may map: twice the two-byte code space.
const MAX_CODES: u64 = 1 << 17;

/// What [`drop_oversized`] removed: fonts that lost their map, and the largest map's codes.
pub struct Dropped {
    pub fonts: usize,
    pub largest: u64,
}

/// Removes `/ToUnicode` from every dictionary whose CMap maps more than [`MAX_CODES`] codes;
/// `None` when no map is that large.
pub fn drop_oversized(doc: &mut Document) -> Option<Dropped> {
    let mut codes = HashMap::new();
    for id in referenced(doc) {
        if let Some(n) = cmap_codes(doc, id) {
            codes.insert(id, n);
        }
    }
    let oversized: HashSet<ObjectId> = codes.iter().filter(|&(_, &n)| n > MAX_CODES).map(|(&id, _)| id).collect();
    let largest = oversized.iter().map(|id| codes[id]).max()?;
    let mut fonts = 0;
    let mut stack: Vec<&mut Object> = doc.objects.values_mut().collect();
    while let Some(object) = stack.pop() {
        let dict = match object {
            Object::Dictionary(d) => d,
            Object::Stream(s) => &mut s.dict,
            Object::Array(items) => {
                stack.extend(items.iter_mut());
                continue;
            }
            _ => continue,
        };
        if let Ok(Object::Reference(id)) = dict.get(b"ToUnicode")
            && oversized.contains(id)
        {
            dict.remove(b"ToUnicode");
            fonts += 1;
        }
        stack.extend(dict.iter_mut().map(|(_, v)| v));
    }
    Some(Dropped { fonts, largest })
}

/// The objects some dictionary names as its `/ToUnicode`, at any depth of any object.
fn referenced(doc: &Document) -> HashSet<ObjectId> {
    let mut found = HashSet::new();
    let mut stack: Vec<&Object> = doc.objects.values().collect();
    while let Some(object) = stack.pop() {
        let dict = match object {
            Object::Dictionary(d) => d,
            Object::Stream(s) => &s.dict,
            Object::Array(items) => {
                stack.extend(items);
                continue;
            }
            _ => continue,
        };
        if let Ok(Object::Reference(id)) = dict.get(b"ToUnicode") {
            found.insert(*id);
        }
        stack.extend(dict.iter().map(|(_, v)| v));
    }
    found
}

/// The codes the CMap stream `id` maps, as pdf-extract would expand it: its content decoded as
/// pdf-extract decodes it, read by the same lexer. `None` for anything else, which pdf-extract
/// refuses by itself.
fn cmap_codes(doc: &Document, id: ObjectId) -> Option<u64> {
    let Ok(Object::Stream(stream)) = doc.get_object(id) else { return None };
    let content = match stream.filters() {
        Ok(_) => stream.decompressed_content().unwrap_or_else(|_| stream.content.clone()),
        Err(_) => stream.content.clone(),
    };
    let tokens = adobe_cmap_parser::parse(&content).ok()?;
    Some(mapped_codes(&tokens))
}

/// Codes the `bfchar` and `bfrange` sections of `tokens` map, counted as pdf-extract's lexer
/// walks them: `n beginbfrange` then n triples `<lo> <hi> dst`, each range `hi − lo + 1` codes.
fn mapped_codes(tokens: &[Value]) -> u64 {
    let code = |t: Option<&Value>| match t {
        Some(Value::LiteralString(s)) => Some(s.iter().fold(0u32, |c, &b| (c << 8) | u32::from(b))),
        _ => None,
    };
    let mut total = 0u64;
    for (at, t) in tokens.iter().enumerate() {
        let (Value::Operator(op), Some(Value::Integer(count))) = (t, at.checked_sub(1).and_then(|p| tokens.get(p))) else {
            continue;
        };
        let (width, per_entry) = match op.as_str() {
            "beginbfrange" => (3, true),
            "beginbfchar" => (2, false),
            _ => continue,
        };
        for entry in 0..(*count).max(0) as usize {
            let first = at + 1 + entry * width;
            if first >= tokens.len() {
                break;
            }
            total += match (per_entry, code(tokens.get(first)), code(tokens.get(first + 1))) {
                (true, Some(lo), Some(hi)) if hi >= lo => u64::from(hi - lo) + 1,
                (true, ..) => 0,
                (false, ..) => 1,
            };
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(cmap: &str) -> u64 {
        mapped_codes(&adobe_cmap_parser::parse(cmap.as_bytes()).unwrap())
    }

    #[test]
    fn ranges_count_every_code_they_map_and_chars_one_each() {
        let real = "/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n\
            1 begincodespacerange <0000> <FFFF> endcodespacerange\n\
            2 beginbfchar <0003> <0020> <0011> <002E> endbfchar\n\
            2 beginbfrange <0024> <003D> <0041> <0044> <0046> [<0061> <0062> <0063>] endbfrange\n\
            endcmap end end";
        assert_eq!(codes(real), 2 + 26 + 3);
        // The fuzzer's range: over five million codes from one damaged entry.
        assert_eq!(codes("1 beginbfrange <0003> <500000> <0020> endbfrange"), 0x500000 - 3 + 1);
        // A reversed range maps nothing, as pdf-extract's loop over it runs no step.
        assert_eq!(codes("1 beginbfrange <00FF> <0001> <0020> endbfrange"), 0);
        // A count past the entries stops at the end of the tokens.
        assert_eq!(codes("9 beginbfrange <0000> <0009> <0020>"), 10);
    }

    #[test]
    fn the_fuzzers_file_loses_its_oversized_maps_and_extracts_at_once() {
        let bytes = include_bytes!("../../fuzz/regressions/pdf_text/tounicode-range-of-millions.pdf");
        let started = std::time::Instant::now();
        let out = super::super::pdf::extract(bytes, super::super::ExtractLimits { max_pages: 64 }).unwrap();
        // One font names the damaged map; the others keep theirs.
        let warning = out.warnings.iter().find(|w| w.contains("ToUnicode")).expect("a warning names the map");
        assert!(warning.starts_with("damaged PDF: 1 font names a ToUnicode map of 5243001 codes"), "{warning}");
        // 12 s and 1 GB before; well under a second now, so a generous bound cannot flake.
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(!out.pages.is_empty());
    }
}
