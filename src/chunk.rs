//! Token-exact chunking: a document that fits the context goes in whole; a longer one is split
//! on page, heading and paragraph boundaries with an overlap, and every chunk's token range and
//! count is recorded so nothing is ever truncated silently.
//!
//! The document's token stream is the concatenation of its paragraphs' tokens, each paragraph
//! tokenised on its own; those exact ids are what the model is fed, so the counts are exact.

use anyhow::Result;
use serde::Serialize;

use crate::tokenizer::Tokenizer;

/// One chunk of a document.
#[derive(Clone, Debug, Serialize)]
pub struct Chunk {
    /// 0-based index.
    pub index: usize,
    /// First token (in the document's token stream).
    pub token_start: usize,
    /// One past the last token.
    pub token_end: usize,
    /// Tokens in the chunk (`token_end - token_start`).
    pub tokens: usize,
    /// Leading tokens repeated from the previous chunk.
    pub overlap_tokens: usize,
    /// First page the chunk covers.
    pub first_page: u32,
    /// Last page the chunk covers.
    pub last_page: u32,
    /// The ids.
    #[serde(skip)]
    pub ids: Vec<u32>,
}

/// A document cut into chunks.
#[derive(Clone, Debug, Serialize)]
pub struct Chunked {
    /// Tokens of the whole document.
    pub total_tokens: usize,
    /// Chunks in order (one when the document fits).
    pub chunks: Vec<Chunk>,
    /// Paragraphs longer than a whole chunk, cut between tokens rather than at a boundary.
    pub split_paragraphs: usize,
    /// Tokens each page contributes to the document's token stream.
    #[serde(skip)]
    pub page_tokens: std::collections::BTreeMap<u32, usize>,
}

struct Unit {
    page: u32,
    ids: Vec<u32>,
    /// A good place to start a chunk: a new page or a heading.
    boundary: bool,
}

/// Chunks `pages` (number, text) so that every chunk has at most `budget` tokens, repeating up
/// to `overlap` tokens of whole paragraphs between neighbours.
pub fn chunk(tok: &Tokenizer, pages: &[(u32, &str)], budget: usize, overlap: usize) -> Result<Chunked> {
    let budget = budget.max(1);
    let units = paragraphs(tok, pages)?;
    let total_tokens = units.iter().map(|u| u.ids.len()).sum();
    let mut page_tokens = std::collections::BTreeMap::new();
    for u in &units {
        *page_tokens.entry(u.page).or_insert(0) += u.ids.len();
    }
    let (pieces, split_paragraphs) = pieces(units, budget, overlap);
    let chunks = pack(&pieces, budget, overlap);
    Ok(Chunked { total_tokens, chunks, split_paragraphs, page_tokens })
}

/// The document's paragraphs in order, each tokenised on its own.
fn paragraphs(tok: &Tokenizer, pages: &[(u32, &str)]) -> Result<Vec<Unit>> {
    let mut units = Vec::new();
    let texts: Vec<(u32, &str)> = pages.iter().copied().filter(|(_, t)| !t.trim().is_empty()).collect();
    for (pi, (page, text)) in texts.iter().enumerate() {
        let paras: Vec<&str> = text.split("\n\n").filter(|p| !p.trim().is_empty()).collect();
        for (i, p) in paras.iter().enumerate() {
            let last_of_doc = pi + 1 == texts.len() && i + 1 == paras.len();
            let piece = if last_of_doc { p.to_string() } else { format!("{p}\n\n") };
            units.push(Unit { page: *page, ids: tok.encode(&piece)?, boundary: i == 0 || is_heading(p) });
        }
    }
    Ok(units)
}

/// Paragraphs longer than a chunk cut into chunk-sized pieces; how many were cut.
fn pieces(units: Vec<Unit>, budget: usize, overlap: usize) -> (Vec<Unit>, usize) {
    let mut split_paragraphs = 0;
    let mut pieces: Vec<Unit> = Vec::with_capacity(units.len());
    for u in units {
        if u.ids.len() <= budget {
            pieces.push(u);
            continue;
        }
        split_paragraphs += 1;
        let step = budget.saturating_sub(overlap).max(1).min(budget);
        for (k, part) in u.ids.chunks(step).enumerate() {
            pieces.push(Unit { page: u.page, ids: part.to_vec(), boundary: u.boundary && k == 0 });
        }
    }
    (pieces, split_paragraphs)
}

/// Packs consecutive pieces into chunks of at most `budget` tokens, preferring to end a chunk
/// at a page or heading once it is reasonably full, and opening each next chunk with whole
/// trailing pieces of the last, up to `overlap` tokens.
fn pack(pieces: &[Unit], budget: usize, overlap: usize) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    // Start/end offsets of every piece in the token stream.
    let mut offsets = Vec::with_capacity(pieces.len() + 1);
    let mut acc = 0;
    for p in pieces {
        offsets.push(acc);
        acc += p.ids.len();
    }
    offsets.push(acc);
    let mut start = 0;
    let mut carried = 0usize;
    while start < pieces.len() {
        // Pieces [start, end) go in this chunk.
        let mut end = start;
        let mut used = 0;
        while end < pieces.len() && used + pieces[end].ids.len() <= budget {
            if end > start && pieces[end].boundary && used * 10 >= budget * 7 && end > start + carried {
                break;
            }
            used += pieces[end].ids.len();
            end += 1;
        }
        if end == start || end <= start + carried {
            // The carried overlap left no room for new text: drop the overlap.
            start += carried;
            carried = 0;
            continue;
        }
        let ids: Vec<u32> = pieces[start..end].iter().flat_map(|p| p.ids.iter().copied()).collect();
        let overlap_tokens = pieces[start..start + carried].iter().map(|p| p.ids.len()).sum();
        chunks.push(Chunk {
            index: chunks.len(),
            token_start: offsets[start],
            token_end: offsets[end],
            tokens: ids.len(),
            overlap_tokens,
            first_page: pieces[start].page,
            last_page: pieces[end - 1].page,
            ids,
        });
        if end == pieces.len() {
            break;
        }
        let mut back = end;
        let mut o = 0;
        while back > start + 1 && o + pieces[back - 1].ids.len() <= overlap {
            o += pieces[back - 1].ids.len();
            back -= 1;
        }
        carried = end - back;
        start = back;
    }
    chunks
}

/// A short line that looks like a heading: Markdown `#`, a numbered clause, an article or
/// section title, or an all-capitals line.
fn is_heading(p: &str) -> bool {
    let first = p.trim_start().lines().next().unwrap_or("").trim();
    if first.is_empty() || first.chars().count() > 80 {
        return false;
    }
    let lower = first.to_lowercase();
    let letters: Vec<char> = first.chars().filter(|c| c.is_alphabetic()).collect();
    first.starts_with('#')
        || ["article ", "section ", "schedule ", "exhibit ", "annex ", "appendix "].iter().any(|w| lower.starts_with(w))
        || first.split_whitespace().next().is_some_and(|w| {
            let w = w.trim_end_matches('.');
            !w.is_empty() && w.split('.').all(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
        || (letters.len() >= 3 && letters.iter().all(|c| c.is_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::is_heading;

    #[test]
    fn headings() {
        assert!(is_heading("# Terms"));
        assert!(is_heading("12.3 Termination"));
        assert!(is_heading("ARTICLE 5"));
        assert!(is_heading("CONFIDENTIALITY"));
        assert!(!is_heading("The parties agree that the supplier delivers."));
    }
}
