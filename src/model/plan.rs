//! Memory plan of a job: what a context of N tokens costs before it runs, so a job that cannot
//! fit the configured budget is refused (or chunked smaller) instead of being OOM-killed hours
//! into a prefill.
//!
//! The terms follow what the current graph allocates: weights (the external-data file, plus
//! prepacked copies for int8/int4), the f32 KV cache of the attention layers twice over during
//! a prefill call (ONNX Runtime writes the grown cache into a new buffer while the old one is
//! alive), the DeltaNet conv and recurrent state, the per-call activations, whose largest part
//! is the attention score matrix `[heads, chunk, context]` in f32, and a state snapshot when
//! stages share a document prefix. Calibrated on the 0.8B shape (fp32, 4,096-token prompt in
//! chunks of 512, no snapshot): 3.81 GiB peak RSS measured by `deltadoc bench`, 3.91 GiB planned.

use serde::Serialize;

use super::config::TextConfig;
use super::quant::Precision;

/// ONNX Runtime, tokenizer, allocator arenas and the process itself.
const RUNTIME_BYTES: u64 = 768 << 20;

/// Bytes a job of one context needs.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Tokens in the context (prompt + generated).
    pub context_tokens: usize,
    /// Prompt tokens per prefill call.
    pub prefill_chunk: usize,
    /// Weights as loaded (int8/int4 include their prepacked copies).
    pub weights_bytes: u64,
    /// Runtime and process overhead.
    pub runtime_bytes: u64,
    /// KV cache at the full context, counted twice (old and grown buffer during a call).
    pub kv_bytes: u64,
    /// DeltaNet conv + recurrent state.
    pub state_bytes: u64,
    /// Largest per-call activations (attention scores, MLP, hidden states, logits).
    pub activation_bytes: u64,
    /// Copy of KV + state kept for prefix reuse across stages.
    pub snapshot_bytes: u64,
    /// Sum of the above.
    pub total_bytes: u64,
}

/// Plans a context of `context` tokens prefilled `chunk` tokens per call; `snapshot` when the
/// document's state is kept for further stages.
pub fn plan(
    cfg: &TextConfig,
    precision: Precision,
    weights_file: u64,
    context: usize,
    chunk: usize,
    snapshot: bool,
) -> MemoryPlan {
    let chunk = chunk.min(context).max(1) as u64;
    let t = context as u64;
    let weights_bytes = match precision {
        // Prepacking keeps a second, reordered copy of the quantised blocks.
        Precision::Int8 | Precision::Int4 => weights_file * 2,
        Precision::Fp32 | Precision::Fp16 => weights_file,
    };
    let kv = cfg.kv_bytes_per_token() as u64 * t;
    let state_bytes = cfg.linear_state_bytes() as u64;
    let scores = 2 * cfg.num_attention_heads as u64 * chunk * t * 4;
    let mlp = 3 * chunk * cfg.intermediate_size as u64 * 4;
    let hidden = 12 * chunk * cfg.hidden_size as u64 * 4;
    let logits = 2 * cfg.vocab_size as u64 * 4;
    let activation_bytes = scores.max(mlp) + hidden + logits;
    let snapshot_bytes = if snapshot { kv + state_bytes } else { 0 };
    let kv_bytes = 2 * kv;
    let total_bytes = weights_bytes + RUNTIME_BYTES + kv_bytes + state_bytes + activation_bytes + snapshot_bytes;
    MemoryPlan {
        context_tokens: context,
        prefill_chunk: chunk as usize,
        weights_bytes,
        runtime_bytes: RUNTIME_BYTES,
        kv_bytes,
        state_bytes,
        activation_bytes,
        snapshot_bytes,
        total_bytes,
    }
}

/// The longest context (up to `max`) whose plan fits `budget`, or `None` when not even a
/// context of one chunk does.
pub fn max_context_within(
    cfg: &TextConfig,
    precision: Precision,
    weights_file: u64,
    budget: u64,
    max: usize,
    chunk: usize,
    snapshot: bool,
) -> Option<usize> {
    let fits = |t: usize| plan(cfg, precision, weights_file, t, chunk, snapshot).total_bytes <= budget;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Shape;

    #[test]
    fn plan_grows_with_context_and_the_search_finds_the_edge() {
        let cfg = Shape::B0_8.config();
        let w = 2_800_000_000;
        let small = plan(&cfg, Precision::Fp32, w, 4096, 512, false);
        let big = plan(&cfg, Precision::Fp32, w, 262_144, 512, true);
        assert!(big.total_bytes > small.total_bytes);
        assert!(small.total_bytes > w && small.total_bytes < 4 << 30, "{small:?}");
        let budget = 20u64 << 30;
        let t = max_context_within(&cfg, Precision::Fp32, w, budget, 262_144, 512, true).unwrap();
        assert!(plan(&cfg, Precision::Fp32, w, t, 512, true).total_bytes <= budget);
        assert!(t == 262_144 || plan(&cfg, Precision::Fp32, w, t + 1, 512, true).total_bytes > budget);
        assert_eq!(max_context_within(&cfg, Precision::Fp32, w, 1 << 30, 262_144, 512, false), None);
    }
}
