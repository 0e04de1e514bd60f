//! Memory plan of a job: what a context of N tokens costs before it runs, so a job that cannot
//! fit the configured budget is refused (or chunked smaller) instead of being OOM-killed hours
//! into a prefill.
//!
//! The terms follow what the graph allocates: weights (the external-data file, mapped once and
//! read in place: nothing is prepacked, src/generate/decoder.rs) and the
//! vision tower's once it has read a page, the KV cache of the attention layers (f32, f16 or
//! bf16) once (the decoder reserves it for the whole context and appends each call's rows in
//! place), the DeltaNet conv and recurrent state, the per-call activations (the MLP's and the
//! hidden states'; attention is blockwise, so its scratch does not grow with the context), and a
//! copy of the state: a snapshot kept while stages share a document prefix, or a resumable
//! prefill's checkpoint. Measured against `deltadoc bench` peak RSS in benches/RESULTS.md.

use serde::Serialize;

use super::ModelDir;
use super::config::TextConfig;
use super::graph::KvCache;
use deltadoc_kernels::attention::{KEY_BLOCK, QUERY_TILE};

/// ONNX Runtime, tokenizer, allocator arenas and the process itself.
const RUNTIME_BYTES: u64 = 768 << 20;

/// Bytes a job of one context needs.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Tokens in the context (prompt + generated).
    pub context_tokens: usize,
    /// Prompt tokens per prefill call.
    pub prefill_chunk: usize,
    /// Weights as loaded.
    pub weights_bytes: u64,
    /// The vision tower's weights: its encoder opens on the first page image and stays loaded.
    pub vision_bytes: u64,
    /// Runtime and process overhead.
    pub runtime_bytes: u64,
    /// KV cache at the full context.
    pub kv_bytes: u64,
    /// DeltaNet conv + recurrent state.
    pub state_bytes: u64,
    /// Largest per-call activations (MLP, hidden states, attention tiles, rule buffers, logits).
    pub activation_bytes: u64,
    /// Copy of KV + state kept for prefix reuse across stages or written as a prefill
    /// checkpoint, at the context length it covers.
    pub snapshot_bytes: u64,
    /// Peak: the sum of the above, except that a checkpoint ([`StateCopy::Checkpoint`]) is
    /// dropped once written, so it is counted beside the cache it copies rather than the whole
    /// context's.
    pub total_bytes: u64,
}

/// A copy of the decoder state that a job holds beside its live state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateCopy {
    /// No copy.
    None,
    /// A snapshot of the first `n` tokens kept while the context grows past them (prefix reuse
    /// across stages): held beside the whole context's cache.
    Kept(usize),
    /// The largest checkpoint of a resumable prefill, taken at `n` tokens and freed once on
    /// disk: held beside the cache of those `n` tokens only.
    Checkpoint(usize),
}

/// What a model folder brings to every plan.
#[derive(Clone, Debug)]
pub struct Footprint {
    /// Text decoder configuration.
    pub cfg: TextConfig,
    /// Element type of the KV cache.
    pub kv_cache: KvCache,
    /// Bytes of the weights file.
    pub weights_file: u64,
    /// Bytes of the vision tower's weights file (0: none, or never opened by this job).
    pub vision_file: u64,
}

impl Footprint {
    /// The footprint of an opened model folder.
    pub fn of(dir: &ModelDir) -> Self {
        let m = &dir.manifest;
        Self {
            cfg: m.config.clone(),
            kv_cache: m.kv_cache,
            weights_file: dir.weights_bytes(),
            vision_file: dir.vision_weights_bytes(),
        }
    }

    /// KV cache bytes per token of context.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.cfg.kv_elements_per_token() * self.kv_cache.elem().width()) as u64
    }

    /// Bytes each sequence of a batched decode holds beside a single sequence's plan at a context
    /// of `context` tokens: its own cache rows for the whole context and its DeltaNet state
    /// (src/generate/batch.rs; before the batch forms, the snapshot it joins from, which is no
    /// larger and is freed as it is copied in).
    pub fn sequence_bytes(&self, context: usize) -> u64 {
        self.kv_bytes_per_token() * context as u64 + self.cfg.linear_state_bytes() as u64
    }

    /// Plans a context of `context` tokens prefilled `chunk` tokens per call, with `copy` of the
    /// state held beside it. A document kept for further stages is snapshotted whole; a
    /// resumable prefill's largest checkpoint is taken before the prompt's end
    /// ([`crate::generate::last_checkpoint`]) and freed before the cache grows further: counting
    /// it as a kept whole-context snapshot would overstate a 262K plan with a bf16 cache and a
    /// checkpoint every 32,768 tokens by 0.8 GB.
    pub fn plan(&self, context: usize, chunk: usize, copy: StateCopy) -> MemoryPlan {
        let cfg = &self.cfg;
        let chunk = chunk.min(context).max(1) as u64;
        let t = context as u64;
        // Measured 2026-11-25 (0.8B shape, peak RSS after a 512-token prefill, file size):
        // fp32 3.25 / 2.9 GB, int8 1.51 / 1.2 GB, int4 in blocks of 128 1.15 / 0.87 GB; since
        // format 5 nothing is prepacked (2026-12-05: int8 1.36 / 1.3 GB, int4 0.92 / 1.0 GB,
        // benches/RESULTS.md "Prefill on `QuantMatMul`").
        let weights_bytes = self.weights_file;
        let kv = self.kv_bytes_per_token() * t;
        let state_bytes = cfg.linear_state_bytes() as u64;
        // One scratch per (KV head, query tile): queries and accumulator rows, a key and a value
        // block widened to f32, and the block's scores.
        let (hd, group) = (cfg.head_dim as u64, (cfg.num_attention_heads / cfg.num_key_value_heads) as u64);
        let tiles = cfg.num_key_value_heads as u64 * chunk.div_ceil(QUERY_TILE as u64);
        let rows = group * QUERY_TILE.min(chunk as usize) as u64;
        let block = KEY_BLOCK as u64;
        let attention = tiles * (2 * rows * hd + 2 * block * hd + rows * block) * 4;
        // The DeltaNet rule's call buffers (normalised q and k, per-head v and output), one set
        // shared by all layers (ops::Pool).
        let rule = 2 * chunk * (cfg.key_dim() + cfg.value_dim()) as u64 * 4;
        let mlp = 3 * chunk * cfg.intermediate_size as u64 * 4;
        let hidden = 12 * chunk * cfg.hidden_size as u64 * 4;
        let logits = 2 * cfg.vocab_size as u64 * 4;
        let activation_bytes = mlp + attention + rule + hidden + logits;
        let copy_of = |n: usize| match n.min(context) {
            0 => 0,
            n => self.kv_bytes_per_token() * n as u64 + state_bytes,
        };
        let (snapshot_bytes, caches) = match copy {
            StateCopy::None => (0, kv),
            StateCopy::Kept(n) => (copy_of(n), kv + copy_of(n)),
            StateCopy::Checkpoint(n) => {
                let at = self.kv_bytes_per_token() * n.min(context) as u64;
                (copy_of(n), kv.max(at + copy_of(n)))
            }
        };
        let kv_bytes = kv;
        let vision_bytes = self.vision_file;
        let total_bytes = weights_bytes + vision_bytes + RUNTIME_BYTES + caches + state_bytes + activation_bytes;
        MemoryPlan {
            context_tokens: context,
            prefill_chunk: chunk as usize,
            weights_bytes,
            vision_bytes,
            runtime_bytes: RUNTIME_BYTES,
            kv_bytes,
            state_bytes,
            activation_bytes,
            snapshot_bytes,
            total_bytes,
        }
    }

    /// The longest context (up to `max`) whose plan fits `budget`, or `None` when not even a
    /// context of one chunk does; `copy` says what copy of the state a context of `t` tokens
    /// holds (its size must not shrink as `t` grows: the search bisects).
    pub fn max_context_within(&self, budget: u64, max: usize, chunk: usize, copy: impl Fn(usize) -> StateCopy) -> Option<usize> {
        let fits = |t: usize| self.plan(t, chunk, copy(t)).total_bytes <= budget;
        let lo = chunk.min(max).max(1);
        if !fits(lo) {
            return None;
        }
        let (mut lo, mut hi) = (lo, max);
        if fits(hi) {
            return Some(hi);
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) { lo = mid } else { hi = mid }
        }
        Some(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Shape;

    fn footprint(kv_cache: KvCache) -> Footprint {
        Footprint { cfg: Shape::B0_8.config(), kv_cache, weights_file: 2_800_000_000, vision_file: 0 }
    }

    #[test]
    fn plan_grows_with_context_and_the_search_finds_the_edge() {
        let f = footprint(KvCache::F32);
        let w = f.weights_file;
        let small = f.plan(4096, 512, StateCopy::None);
        let big = f.plan(262_144, 512, StateCopy::Kept(262_144));
        assert!(big.total_bytes > small.total_bytes);
        assert!(small.total_bytes > w && small.total_bytes < 4 << 30, "{small:?}");
        let budget = 20u64 << 30;
        let t = f.max_context_within(budget, 262_144, 512, StateCopy::Kept).unwrap();
        assert!(f.plan(t, 512, StateCopy::Kept(t)).total_bytes <= budget);
        assert!(t == 262_144 || f.plan(t + 1, 512, StateCopy::Kept(t + 1)).total_bytes > budget);
        assert_eq!(f.max_context_within(1 << 30, 262_144, 512, |_| StateCopy::None), None);
    }

    #[test]
    fn a_full_context_with_a_snapshot_fits_12_gib_with_a_16_bit_cache_only() {
        // 0.8B shape, 262,144 tokens in chunks of 512, snapshot kept: the f32 cache is 6.4 GB,
        // held twice (the cache and the snapshot).
        let budget = 12u64 << 30;
        assert!(footprint(KvCache::F32).plan(262_144, 512, StateCopy::Kept(262_144)).total_bytes > budget);
        let p = footprint(KvCache::F16).plan(262_144, 512, StateCopy::Kept(262_144));
        assert!(p.total_bytes < budget, "{p:?}");
        assert_eq!(p.kv_bytes, 262_144 * 6 * 2 * 2 * 256 * 2);
        // The attention scratch does not grow with the context.
        assert_eq!(p.activation_bytes, footprint(KvCache::F16).plan(4096, 512, StateCopy::None).activation_bytes);
    }

    #[test]
    fn a_snapshot_costs_the_kv_of_the_tokens_it_covers_plus_the_state() {
        let f = footprint(KvCache::Bf16);
        let (none, part, whole) = (
            f.plan(8192, 512, StateCopy::None),
            f.plan(8192, 512, StateCopy::Kept(4096)),
            f.plan(8192, 512, StateCopy::Kept(8192)),
        );
        assert_eq!(part.snapshot_bytes, 4096 * f.kv_bytes_per_token() + none.state_bytes);
        assert_eq!(whole.snapshot_bytes - part.snapshot_bytes, 4096 * f.kv_bytes_per_token());
        assert_eq!(whole.total_bytes - none.total_bytes, whole.snapshot_bytes);
        // A snapshot cannot cover more than the context.
        assert_eq!(f.plan(8192, 512, StateCopy::Kept(1 << 20)), whole);
    }

    #[test]
    fn a_checkpoint_is_counted_beside_the_cache_it_copies_not_the_whole_context() {
        let f = footprint(KvCache::Bf16);
        let per = f.kv_bytes_per_token();
        let none = f.plan(262_144, 512, StateCopy::None);
        // The last checkpoint of a 262,144-token prefill every 32,768 tokens: the cache and its
        // copy at 229,376 tokens outweigh the whole context's cache.
        let late = f.plan(262_144, 512, StateCopy::Checkpoint(229_376));
        assert_eq!(late.snapshot_bytes, 229_376 * per + none.state_bytes);
        assert_eq!(late.total_bytes - none.total_bytes, 2 * 229_376 * per + none.state_bytes - none.kv_bytes);
        // An early checkpoint is freed long before the cache peaks.
        assert_eq!(f.plan(262_144, 512, StateCopy::Checkpoint(32_768)).total_bytes, none.total_bytes);
        // Never more than keeping the same copy for the whole run.
        assert!(late.total_bytes < f.plan(262_144, 512, StateCopy::Kept(229_376)).total_bytes);
    }

    #[test]
    fn a_vision_tower_adds_its_weights() {
        let text = footprint(KvCache::Bf16);
        let both = Footprint { vision_file: 340_000_000, ..text.clone() };
        let (a, b) = (text.plan(8192, 512, StateCopy::Kept(8192)), both.plan(8192, 512, StateCopy::Kept(8192)));
        assert_eq!((a.vision_bytes, b.vision_bytes), (0, 340_000_000));
        assert_eq!(b.total_bytes - a.total_bytes, 340_000_000);
    }
}
