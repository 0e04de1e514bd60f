//! Causal grouped-query attention over a growing KV cache, computed blockwise (flash-style).
//!
//! ONNX Runtime's CPU attention materialises the probabilities `[heads, S, T]` of a call: with
//! 512-token calls at 262,144 tokens of context that is 4.3 GB per layer call in f32, twice over
//! with the softmax input. Here a worker holds one tile of query rows and walks the keys in
//! blocks of [`KEY_BLOCK`], keeping a running maximum and sum per row (online softmax), so the
//! scratch is `O(tile · (head_dim + KEY_BLOCK))` whatever the context length.
//!
//! The cache stores keys and values in a [`CacheElem`] (f32, or f16 or bf16 to halve the largest
//! buffer of a long context; with bf16 on CPUs that multiply it natively the tile computes in bf16,
//! [`dpbf16`]). Attention always reads them back from the cache, this call's new rows
//! included, so a token sees the same rounded keys whether it was prefilled in the same call as
//! they were or later.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::gemm::gemm;
use crate::simd;

mod dpbf16;

pub use dpbf16::applies as bf16_arithmetic;

/// Keys per block of the online softmax. Each block re-packs the query tile for the GEMM, so
/// longer blocks pack less; past 256 the block's scores and widened keys and values fall out of
/// L2 (`cargo bench --bench ops` at 32K of context: 128 → 1.63 s, 256 → 1.53 s, 512 → 1.73 s).
pub const KEY_BLOCK: usize = 256;
/// Query positions per work item; with a group of 4 query heads per KV head a tile is 256 rows,
/// large enough for efficient GEMMs, small enough to give both cores work on a 512-token call.
pub const QUERY_TILE: usize = 64;
/// Tiles of at most this many rows (decode: one position times the query group) take scores and
/// outputs as dot products and row updates that stream the key block once: a GEMM would pack the
/// whole block for a handful of rows, which made decode of a small model 2× slower.
const DIRECT_ROWS: usize = 8;

/// Element type of the KV cache.
pub trait CacheElem: Copy + Default + Send + Sync + 'static {
    /// Widens `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);
    /// Rounds `src` into `dst` (same length).
    fn store(src: &[f32], dst: &mut [Self]);
    /// Computes [`tile`] in this element type's own arithmetic where the CPU has it, returning
    /// false (nothing done) where the f32 path must run.
    fn tile_native(
        _q: &[f32],
        _keys: &[Self],
        _values: &[Self],
        _d: &Dims,
        _h: usize,
        _rows: Range<usize>,
        _sc: &mut TileScratch,
    ) -> bool {
        false
    }
}

impl CacheElem for f32 {
    fn load(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl CacheElem for f16 {
    // `half` converts with F16C instructions when the CPU has them (detected at run time).
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl CacheElem for bf16 {
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn tile_native(
        q: &[f32],
        keys: &[Self],
        values: &[Self],
        d: &Dims,
        h: usize,
        rows: Range<usize>,
        sc: &mut TileScratch,
    ) -> bool {
        dpbf16::tile(q, keys, values, d, h, rows, sc)
    }
}

/// Sizes of one batch row of a call, and its score scale.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; query head `i` reads KV head `i / (q_heads / kv_heads)`.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Tokens already in the cache.
    pub past: usize,
    /// Tokens of this call.
    pub new: usize,
    /// Multiplies `q·k` before the softmax.
    pub scale: f32,
}

impl Dims {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Cache rows after this call.
    pub fn total(&self) -> usize {
        self.past + self.new
    }
}

/// Writes the cache after this call, `[Hkv, P + S, D]`: the past rows, then this call's keys (or
/// values) `new: [S, Hkv, D]` (token-major, as the projections produce them) rounded to `T`.
pub fn append<T: CacheElem>(past: &[T], new: &[f32], present: &mut [T], d: &Dims) {
    let (hd, t) = (d.head_dim, d.total());
    for h in 0..d.kv_heads {
        let dst = &mut present[h * t * hd..(h + 1) * t * hd];
        dst[..d.past * hd].copy_from_slice(&past[h * d.past * hd..(h + 1) * d.past * hd]);
        for s in 0..d.new {
            let src = (s * d.kv_heads + h) * hd;
            T::store(&new[src..src + hd], &mut dst[(d.past + s) * hd..(d.past + s + 1) * hd]);
        }
    }
}

/// Buffers of one work item, reused from call to call.
#[derive(Default)]
pub struct TileScratch {
    /// Scaled queries, row `g · n + i` = group head g, query position i of the tile.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
    /// Unnormalised output rows; normalised at the end of [`tile`].
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    rows: usize,
    dpbf16: dpbf16::Scratch,
}

impl TileScratch {
    /// Output of group head `g` (0-based within the KV head's group) at tile position `i`.
    pub fn output(&self, g: usize, i: usize, head_dim: usize) -> &[f32] {
        let r = g * self.rows + i;
        &self.acc[r * head_dim..(r + 1) * head_dim]
    }
}

/// Attention of this call's query positions `rows` for the query heads of KV head `h`.
///
/// `q` is one batch row `[S, Hq, D]`; `keys` and `values` are that KV head's cache `[P + S, D]`
/// after [`append`]. Query position `i` of the call sits at absolute position `P + i` and sees
/// keys `0..=P + i`. The result is left in `sc` ([`TileScratch::output`]).
pub fn tile<T: CacheElem>(q: &[f32], keys: &[T], values: &[T], d: &Dims, h: usize, rows: Range<usize>, sc: &mut TileScratch) {
    let (hd, group, n) = (d.head_dim, d.group(), rows.len());
    let r = group * n;
    // A few rows (decode) stream the keys once in f32 either way; bf16 pays off in the products.
    if r > DIRECT_ROWS && T::tile_native(q, keys, values, d, h, rows.clone(), sc) {
        return;
    }
    sc.rows = n;
    sc.q.resize(r * hd, 0.0);
    for g in 0..group {
        for (i, s) in rows.clone().enumerate() {
            let src = (s * d.q_heads + h * group + g) * hd;
            let dst = &mut sc.q[(g * n + i) * hd..(g * n + i + 1) * hd];
            for (o, &x) in dst.iter_mut().zip(&q[src..src + hd]) {
                *o = x * d.scale;
            }
        }
    }
    sc.acc.clear();
    sc.acc.resize(r * hd, 0.0);
    sc.max.clear();
    sc.max.resize(r, f32::NEG_INFINITY);
    sc.sum.clear();
    sc.sum.resize(r, 0.0);
    sc.k.resize(KEY_BLOCK * hd, 0.0);
    sc.v.resize(KEY_BLOCK * hd, 0.0);
    sc.scores.resize(r * KEY_BLOCK, 0.0);

    let first = d.past + rows.start;
    // Keys up to the last query position of the tile; block 0 holds key 0, which every row sees,
    // so each row's maximum is finite after the first block.
    let end = d.past + rows.end;
    for kb in (0..end).step_by(KEY_BLOCK) {
        let kn = KEY_BLOCK.min(end - kb);
        T::load(&keys[kb * hd..(kb + kn) * hd], &mut sc.k[..kn * hd]);
        T::load(&values[kb * hd..(kb + kn) * hd], &mut sc.v[..kn * hd]);
        if r <= DIRECT_ROWS {
            rows_times_keys(&sc.q, &sc.k[..kn * hd], hd, &mut sc.scores[..r * kn]);
        } else {
            gemm(r, hd, kn, 1.0, &sc.q, hd, 1, &sc.k, 1, hd, 0.0, &mut sc.scores, kn);
        }
        for row in 0..r {
            let pos = first + row % n;
            let visible = (pos + 1).saturating_sub(kb).min(kn);
            let srow = &mut sc.scores[row * kn..(row + 1) * kn];
            if visible == 0 {
                srow.fill(0.0);
                continue;
            }
            let block_max = srow[..visible].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let m = sc.max[row].max(block_max);
            let s = simd::exp_sub_sum(&mut srow[..visible], m);
            srow[visible..].fill(0.0);
            let correction = (sc.max[row] - m).exp();
            if correction != 1.0 {
                sc.acc[row * hd..(row + 1) * hd].iter_mut().for_each(|a| *a *= correction);
            }
            sc.sum[row] = sc.sum[row] * correction + s;
            sc.max[row] = m;
        }
        if r <= DIRECT_ROWS {
            accumulate_rows(&sc.scores[..r * kn], &sc.v[..kn * hd], hd, &mut sc.acc);
        } else {
            gemm(r, kn, hd, 1.0, &sc.scores, kn, 1, &sc.v, hd, 1, 1.0, &mut sc.acc, hd);
        }
    }
    for (row, out) in sc.acc.chunks_exact_mut(hd).enumerate() {
        let inv = 1.0 / sc.sum[row];
        out.iter_mut().for_each(|a| *a *= inv);
    }
}

simd::dispatch!(
    /// `scores[row][j] = q[row] · keys[j]` for every query row against every key of a block.
    rows_times_keys(q: &[f32], keys: &[f32], hd: usize, scores: &mut [f32]) -> () = rows_times_keys_lanes
);

#[inline(always)]
fn rows_times_keys_lanes<const FMA: bool>(q: &[f32], keys: &[f32], hd: usize, scores: &mut [f32]) {
    let kn = keys.len() / hd;
    // Key-major, so each key is read once while the few query rows stay in L1.
    for (j, key) in keys.chunks_exact(hd).enumerate() {
        for (row, qr) in q.chunks_exact(hd).enumerate() {
            scores[row * kn + j] = simd::dot_lanes::<FMA>(qr, key);
        }
    }
}

simd::dispatch!(
    /// `acc[row] += Σ_j p[row][j] · values[j]`, each value row read once.
    accumulate_rows(p: &[f32], values: &[f32], hd: usize, acc: &mut [f32]) -> () = accumulate_rows_lanes
);

#[inline(always)]
fn accumulate_rows_lanes<const FMA: bool>(p: &[f32], values: &[f32], hd: usize, acc: &mut [f32]) {
    let kn = values.len() / hd;
    for (j, value) in values.chunks_exact(hd).enumerate() {
        for (row, out) in acc.chunks_exact_mut(hd).enumerate() {
            let w = p[row * kn + j];
            if w != 0.0 {
                simd::axpy_lanes::<FMA>(w, value, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention in f64 over explicit keys/values `[T, Hkv, D]`; queries
    /// `[S, Hq, D]` at positions `past..past + S`; output `[S, Hq, D]`.
    fn reference(q: &[f32], k: &[f32], v: &[f32], d: &Dims) -> Vec<f32> {
        let (hd, g) = (d.head_dim, d.group());
        let mut out = vec![0f32; d.new * d.q_heads * hd];
        for s in 0..d.new {
            for hq in 0..d.q_heads {
                let h = hq / g;
                let qr = &q[(s * d.q_heads + hq) * hd..][..hd];
                let seen = d.past + s + 1;
                let logits: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kr = &k[(j * d.kv_heads + h) * hd..][..hd];
                        qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * d.scale as f64
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for c in 0..hd {
                    let acc: f64 = (0..seen).map(|j| w[j] * v[(j * d.kv_heads + h) * hd + c] as f64).sum();
                    out[(s * d.q_heads + hq) * hd + c] = (acc / z) as f32;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 * 4.0 - 2.0)
            .collect()
    }

    /// Runs the op's two steps for calls of the given lengths and compares every call's output
    /// with the plain definition; returns the largest difference.
    fn split_calls<T: CacheElem>(calls: &[usize], round: impl Fn(&[f32]) -> Vec<f32>) -> f32 {
        let (qh, kvh, hd) = (4, 2, 16);
        let total: usize = calls.iter().sum();
        let q = values(total * qh * hd, 1);
        let k = values(total * kvh * hd, 2);
        let v = values(total * kvh * hd, 3);
        let (kr, vr) = (round(&k), round(&v));
        let mut cache_k: Vec<T> = Vec::new();
        let mut cache_v: Vec<T> = Vec::new();
        let mut worst = 0f32;
        let mut past = 0;
        for &s in calls {
            let d = Dims { q_heads: qh, kv_heads: kvh, head_dim: hd, past, new: s, scale: (hd as f32).powf(-0.5) };
            let rows = past * kvh * hd..(past + s) * kvh * hd;
            let (mut nk, mut nv) = (vec![T::default(); d.total() * kvh * hd], vec![T::default(); d.total() * kvh * hd]);
            append(&cache_k, &k[rows.clone()], &mut nk, &d);
            append(&cache_v, &v[rows], &mut nv, &d);
            (cache_k, cache_v) = (nk, nv);
            let qc = &q[past * qh * hd..(past + s) * qh * hd];
            let want = reference(qc, &kr[..d.total() * kvh * hd], &vr[..d.total() * kvh * hd], &d);
            let mut sc = TileScratch::default();
            for h in 0..kvh {
                let t = d.total();
                let (ck, cv) = (&cache_k[h * t * hd..(h + 1) * t * hd], &cache_v[h * t * hd..(h + 1) * t * hd]);
                // Tiles of 3 positions (6 rows) take the direct path, tiles of 5 (10 rows) the GEMMs.
                for (start, len) in (0..s).step_by(3).map(|x| (x, 3)).chain((0..s).step_by(5).map(|x| (x, 5))) {
                    let tile_rows = start..(start + len).min(s);
                    tile(qc, ck, cv, &d, h, tile_rows.clone(), &mut sc);
                    for g in 0..d.group() {
                        for (i, pos) in tile_rows.clone().enumerate() {
                            let w = &want[(pos * qh + h * d.group() + g) * hd..][..hd];
                            for (a, b) in sc.output(g, i, hd).iter().zip(w) {
                                worst = worst.max((a - b).abs());
                            }
                        }
                    }
                }
            }
            past += s;
        }
        worst
    }

    #[test]
    fn blockwise_attention_matches_the_plain_definition_across_calls_and_key_blocks() {
        // 300 tokens: two key blocks, a prefill call, single tokens (decode) and a call that
        // starts mid-block and crosses into the next one.
        let calls = [1, 140, 1, 1, 157];
        let worst = split_calls::<f32>(&calls, |x| x.to_vec());
        assert!(worst < 2e-6, "f32 cache: max |Δ| {worst}");
        // With an f16 cache the reference sees the same rounded keys and values: only the
        // accumulation order differs.
        let worst = split_calls::<f16>(&calls, |x| x.iter().map(|&a| f16::from_f32(a).to_f32()).collect());
        assert!(worst < 2e-6, "f16 cache: max |Δ| {worst}");
    }

    #[test]
    fn bf16_arithmetic_stays_within_its_rounding_of_the_plain_definition() {
        let calls = [1, 140, 1, 1, 157];
        let worst = split_calls::<bf16>(&calls, |x| x.iter().map(|&a| bf16::from_f32(a).to_f32()).collect());
        if !bf16_arithmetic(16) {
            // Widened to f32 like the f16 cache: only the accumulation order differs.
            assert!(worst < 2e-6, "bf16 cache, f32 arithmetic: max |Δ| {worst}");
            return;
        }
        // bf16 keeps 8 significant bits (rounding error ≤ 2⁻⁹ relative). Rounding the
        // probabilities moves an output by at most 2⁻⁹ · max|v − o| ≤ 7.8e-3 here (|v| ≤ 2);
        // rounding the queries moves each score by about 2⁻⁹ · scale · |q|·|k| on top. Measured
        // 4.3e-3 on a Zen 4.
        assert!(worst < 1e-2, "bf16 arithmetic: max |Δ| {worst}");
    }
}
