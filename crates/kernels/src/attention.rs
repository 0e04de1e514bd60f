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
//! `dpbf16`). Attention always reads them back from the cache, this call's new rows
//! included, so a token sees the same rounded keys whether it was prefilled in the same call as
//! they were or later.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::gemm::gemm;
use crate::simd::{self, LANES};

/// Query rows a direct-path kernel keeps in registers at once: with 16-lane accumulators, four
/// rows are four independent chains of multiply-adds (enough to hide their latency), and on
/// AVX-512 four rows of four output vectors are 16 of the 32 registers, leaving room for the
/// operands.
const ROW_GROUP: usize = 4;

/// Calls `$f::<…, R>(…)` for each group of at most [`ROW_GROUP`] rows of `0..$rows`, with `$row0`
/// the group's first row: the kernels keep a group's accumulators in registers, so the group's
/// size has to be a constant.
macro_rules! in_row_groups {
    ($rows:ident, |$row0:ident| $f:ident::<$($g:tt),*>($($arg:expr),* $(,)?)) => {{
        const _: () = assert!($crate::attention::ROW_GROUP == 4, "one arm per group size");
        for $row0 in (0..$rows).step_by($crate::attention::ROW_GROUP) {
            match ($rows - $row0).min($crate::attention::ROW_GROUP) {
                1 => $f::<$($g,)* 1>($($arg),*),
                2 => $f::<$($g,)* 2>($($arg),*),
                3 => $f::<$($g,)* 3>($($arg),*),
                _ => $f::<$($g,)* 4>($($arg),*),
            }
        }
    }};
}

mod direct;
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
/// Keys per block on the direct path: the block's keys and values, widened to f32, stay in L1
/// (32 KB at width 256). With [`KEY_BLOCK`] they took 512 KB of L2 per block, and writing them
/// out cost more than the products (a decode step at 4K of context spent a fifth of its time
/// widening); the extra rescaling of the output per block is 1/16 of the block's multiply-adds.
const DIRECT_BLOCK: usize = 16;
/// Keys per block on the AVX-512 direct path ([`direct`]), which needs no scratch for them: only
/// the rows' scores (`8 × 64` floats at most) and the per-block rescaling of the output grow with
/// fewer, longer blocks.
const FUSED_BLOCK: usize = 64;
/// Positions per part of a split call ([`split_keys`]) at least: a part's partial result costs a
/// merge of `rows × head_dim` per KV head, so parts far shorter than this would not pay.
const SPLIT_KEYS: usize = 1024;

/// Element type of the KV cache.
pub trait CacheElem: Copy + Default + Send + Sync + 'static {
    /// Widens `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);
    /// Rounds `src` into `dst` (same length).
    fn store(src: &[f32], dst: &mut [Self]);
    /// Sixteen values at `src`, widened to f32 in a register (the AVX-512 decode path).
    ///
    /// # Safety
    /// `src` points at 16 readable values and the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen16(src: *const Self) -> std::arch::x86_64::__m512;
    /// Computes [`tile`] in this element type's own arithmetic where the CPU has it, returning
    /// false (nothing done) where the f32 path must run.
    fn tile_native(
        _q: &[f32],
        _kv: HeadCache<'_, Self>,
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(src: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable floats and AVX-512F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(src) }
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(src: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable halves (32 bytes) and AVX-512F, which
        // includes the half-to-single conversion.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(src.cast())) }
    }
}

impl CacheElem for bf16 {
    fn load(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "widening needs equal lengths");
        simd::widen_bf16(src.reinterpret_cast(), dst);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(src: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) and AVX-512F. A bf16 is the
        // upper half of an f32.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(src.cast())))) }
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn tile_native(q: &[f32], kv: HeadCache<'_, Self>, d: &Dims, h: usize, rows: Range<usize>, sc: &mut TileScratch) -> bool {
        dpbf16::tile(q, kv, d, h, rows, sc)
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

/// One KV head's keys (or values) as a call reads them: the cache before the call (`past`,
/// `[P, Hkv, D]`) and then this call's rows (`new`, `[S, Hkv, D]`). Both are position-major, so a
/// call's rows are appended to the cache as one contiguous block and the cache never moves.
#[derive(Clone, Copy)]
pub struct HeadRows<'a, T> {
    past: &'a [T],
    new: &'a [T],
    past_rows: usize,
    /// Elements per position (all heads), and the offset of this head within a position.
    width: usize,
    head: usize,
    head_dim: usize,
}

impl<'a, T> HeadRows<'a, T> {
    /// Head `h` of `past` (`d.past` positions) followed by `new` (`d.new` positions).
    ///
    /// # Panics
    /// If either slice is shorter than its positions.
    pub fn new(past: &'a [T], new: &'a [T], d: &Dims, h: usize) -> Self {
        let width = d.kv_heads * d.head_dim;
        assert!(past.len() >= d.past * width && new.len() >= d.new * width, "cache shorter than its positions");
        Self { past, new, past_rows: d.past, width, head: h * d.head_dim, head_dim: d.head_dim }
    }

    /// Positions readable: past and new.
    pub fn len(&self) -> usize {
        self.past_rows + self.new.len() / self.width
    }

    /// Whether no position is readable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The head's `head_dim` elements at position `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &'a [T] {
        let (buf, r) = if r < self.past_rows { (self.past, r) } else { (self.new, r - self.past_rows) };
        &buf[r * self.width + self.head..][..self.head_dim]
    }
}

/// Empties the running state of an online softmax over `rows` rows: the output accumulator
/// (`acc_len` zeros), each row's maximum (−∞) and sum (0).
fn start_rows([acc, max, sum]: [&mut Vec<f32>; 3], acc_len: usize, rows: usize) {
    for (v, len, fill) in [(acc, acc_len, 0.0), (max, rows, f32::NEG_INFINITY), (sum, rows, 0.0)] {
        v.clear();
        v.resize(len, fill);
    }
}

/// One KV head's keys and values as a call reads them.
#[derive(Clone, Copy)]
pub struct HeadCache<'a, T> {
    /// The head's keys.
    pub keys: HeadRows<'a, T>,
    /// The head's values.
    pub values: HeadRows<'a, T>,
}

impl<'a, T> HeadCache<'a, T> {
    /// KV head `h` of the caches `past` (keys, values; `d.past` positions each) followed by this
    /// call's rows `new` (keys, values; `d.new` positions each).
    ///
    /// # Panics
    /// If a slice is shorter than its positions.
    pub fn new(past: [&'a [T]; 2], new: [&'a [T]; 2], d: &Dims, h: usize) -> Self {
        Self { keys: HeadRows::new(past[0], new[0], d, h), values: HeadRows::new(past[1], new[1], d, h) }
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
    /// Absolute position of the tile's first query.
    first: usize,
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
/// `q` is one batch row `[S, Hq, D]`; `kv` holds that KV head's `P + S` positions, this call's
/// included. Query position `i` of the call sits at absolute position `P + i` and
/// sees keys `0..=P + i`. The result is left in `sc` ([`TileScratch::output`]).
pub fn tile<T: CacheElem>(q: &[f32], kv: HeadCache<'_, T>, d: &Dims, h: usize, rows: Range<usize>, sc: &mut TileScratch) {
    let r = d.group() * rows.len();
    // A few rows (decode) stream the keys once in f32 either way; bf16 pays off in the products.
    if r > DIRECT_ROWS && T::tile_native(q, kv, d, h, rows.clone(), sc) {
        return;
    }
    sc.begin(q, d, h, rows.clone());
    sc.absorb(kv, d, 0..d.past + rows.end);
    sc.finish();
}

/// Whether [`split_keys`] applies to a call: a few query rows per KV head (decode) over a long
/// cache, where the KV heads' items alone would give each thread a strided walk over the cache.
pub fn splits(d: &Dims) -> bool {
    d.group() * d.new <= DIRECT_ROWS && d.total() >= 2 * SPLIT_KEYS
}

/// Key ranges of [`split_keys`]: about `SPLIT_KEYS` positions each, at most `parts`.
pub fn key_parts(d: &Dims, parts: usize) -> Vec<Range<usize>> {
    let total = d.total();
    let n = total.div_ceil(SPLIT_KEYS).clamp(1, parts.max(1));
    let per = total.div_ceil(n);
    (0..n).map(|i| i * per..((i + 1) * per).min(total)).filter(|r| !r.is_empty()).collect()
}

/// Part of a split call: the unnormalised attention of every query position of the call, for
/// every KV head, over the positions `part` only (flash-decoding). A part walks its positions
/// once for all heads, so each thread reads one contiguous stretch of the position-major cache;
/// [`merge_parts`] combines the parts. `heads[h]` receives KV head `h`'s partial result.
pub fn split_keys<T: CacheElem>(q: &[f32], kv: &[HeadCache<'_, T>], d: &Dims, part: Range<usize>, heads: &mut [TileScratch]) {
    let rows = 0..d.new;
    for (h, sc) in heads.iter_mut().enumerate() {
        sc.begin(q, d, h, rows.clone());
    }
    let step = FUSED_BLOCK.max(DIRECT_BLOCK);
    for kb in part.clone().step_by(step) {
        let block = kb..(kb + step).min(part.end);
        for (h, sc) in heads.iter_mut().enumerate() {
            sc.absorb(kv[h], d, block.clone());
        }
    }
}

/// Combines one KV head's partial results of a split call, `first` and then `rest` (one per
/// part), into `first`, normalised as [`tile`] leaves it.
pub fn merge_parts<'a>(first: &mut TileScratch, rest: impl IntoIterator<Item = &'a TileScratch>, head_dim: usize) {
    for p in rest {
        for row in 0..first.max.len() {
            let m = first.max[row].max(p.max[row]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let (a, b) = ((first.max[row] - m).exp(), (p.max[row] - m).exp());
            for (x, &y) in first.acc[row * head_dim..(row + 1) * head_dim].iter_mut().zip(&p.acc[row * head_dim..]) {
                *x = *x * a + y * b;
            }
            first.sum[row] = first.sum[row] * a + p.sum[row] * b;
            first.max[row] = m;
        }
    }
    first.finish();
}

impl TileScratch {
    /// Starts a tile: the scaled query rows of `rows` for KV head `h`, and an empty output.
    fn begin(&mut self, q: &[f32], d: &Dims, h: usize, rows: Range<usize>) {
        let (hd, group, n) = (d.head_dim, d.group(), rows.len());
        let r = group * n;
        self.rows = n;
        self.first = d.past + rows.start;
        self.q.resize(r * hd, 0.0);
        for g in 0..group {
            for (i, s) in rows.clone().enumerate() {
                let src = (s * d.q_heads + h * group + g) * hd;
                let dst = &mut self.q[(g * n + i) * hd..(g * n + i + 1) * hd];
                for (o, &x) in dst.iter_mut().zip(&q[src..src + hd]) {
                    *o = x * d.scale;
                }
            }
        }
        start_rows([&mut self.acc, &mut self.max, &mut self.sum], r * hd, r);
    }

    /// Adds the keys `range` to the tile begun by [`Self::begin`] (online softmax: a running
    /// maximum and sum per row, the output rescaled when the maximum grows).
    fn absorb<T: CacheElem>(&mut self, kv: HeadCache<'_, T>, d: &Dims, range: Range<usize>) {
        let HeadCache { keys, values } = kv;
        let (hd, n) = (d.head_dim, self.rows);
        let r = self.max.len();
        // A few rows on AVX-512 read the cache in place; elsewhere each block is widened first.
        let fused = r <= DIRECT_ROWS && direct::applies(hd);
        let block = match (fused, r <= DIRECT_ROWS) {
            (true, _) => FUSED_BLOCK,
            (false, true) => DIRECT_BLOCK,
            (false, false) => KEY_BLOCK,
        };
        if !fused {
            self.k.resize(block * hd, 0.0);
            self.v.resize(block * hd, 0.0);
        }
        self.scores.resize(r * block, 0.0);
        // Keys past the tile's last query position are never seen.
        let end = range.end.min(self.first + n);
        for kb in (range.start..end).step_by(block) {
            let kn = block.min(end - kb);
            if fused {
                direct::scores(&self.q, keys, kb, kn, hd, &mut self.scores[..r * kn]);
            } else {
                for j in 0..kn {
                    T::load(keys.row(kb + j), &mut self.k[j * hd..(j + 1) * hd]);
                    T::load(values.row(kb + j), &mut self.v[j * hd..(j + 1) * hd]);
                }
                if r <= DIRECT_ROWS {
                    rows_times_keys(&self.q, &self.k[..kn * hd], hd, &mut self.scores[..r * kn]);
                } else {
                    gemm(r, hd, kn, 1.0, &self.q, hd, 1, &self.k, 1, hd, 0.0, &mut self.scores, kn);
                }
            }
            for row in 0..r {
                let pos = self.first + row % n;
                let visible = (pos + 1).saturating_sub(kb).min(kn);
                let srow = &mut self.scores[row * kn..(row + 1) * kn];
                if visible == 0 {
                    srow.fill(0.0);
                    continue;
                }
                let block_max = srow[..visible].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let m = self.max[row].max(block_max);
                let s = simd::exp_sub_sum(&mut srow[..visible], m);
                srow[visible..].fill(0.0);
                let correction = (self.max[row] - m).exp();
                if correction != 1.0 {
                    self.acc[row * hd..(row + 1) * hd].iter_mut().for_each(|a| *a *= correction);
                }
                self.sum[row] = self.sum[row] * correction + s;
                self.max[row] = m;
            }
            if fused {
                direct::accumulate(&self.scores[..r * kn], values, kb, kn, hd, &mut self.acc);
            } else if r <= DIRECT_ROWS {
                accumulate_rows(&self.scores[..r * kn], &self.v[..kn * hd], hd, &mut self.acc);
            } else {
                gemm(r, kn, hd, 1.0, &self.scores, kn, 1, &self.v, hd, 1, 1.0, &mut self.acc, hd);
            }
        }
    }

    /// Normalises the output rows by their sums.
    fn finish(&mut self) {
        let hd = self.acc.len() / self.sum.len();
        for (row, out) in self.acc.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / self.sum[row];
            out.iter_mut().for_each(|a| *a *= inv);
        }
    }
}

simd::dispatch!(
    /// `scores[row][j] = q[row] · keys[j]` for every query row against every key of a block.
    rows_times_keys(q: &[f32], keys: &[f32], hd: usize, scores: &mut [f32]) -> () = rows_times_keys_lanes
);

#[inline(always)]
fn rows_times_keys_lanes<const FMA: bool>(q: &[f32], keys: &[f32], hd: usize, scores: &mut [f32]) {
    let (r, kn) = (q.len() / hd, keys.len() / hd);
    in_row_groups!(r, |row0| rows_times_keys_group::<FMA>(q, keys, hd, kn, row0, scores));
}

/// Scores of query rows `row0 .. row0 + R`: each key chunk is loaded once for the R rows, and
/// every row has its own accumulator, so the multiply-adds do not wait on each other (one chain
/// per dot product, as before, ran at a quarter of the FMA rate and dominated decode).
#[inline(always)]
fn rows_times_keys_group<const FMA: bool, const R: usize>(
    q: &[f32],
    keys: &[f32],
    hd: usize,
    kn: usize,
    row0: usize,
    scores: &mut [f32],
) {
    let q: [&[f32]; R] = std::array::from_fn(|i| &q[(row0 + i) * hd..][..hd]);
    let body = hd - hd % LANES;
    for (j, key) in keys.chunks_exact(hd).enumerate() {
        let mut acc = [[0f32; LANES]; R];
        for c in (0..body).step_by(LANES) {
            let k: &[f32; LANES] = key[c..c + LANES].try_into().unwrap();
            for i in 0..R {
                let qc: &[f32; LANES] = q[i][c..c + LANES].try_into().unwrap();
                acc[i] = simd::madd_lanes::<FMA>(qc, k, &acc[i]);
            }
        }
        for (i, (a, qr)) in acc.iter().zip(&q).enumerate() {
            let tail: f32 = qr[body..].iter().zip(&key[body..]).map(|(x, y)| x * y).sum();
            scores[(row0 + i) * kn + j] = simd::sum_lanes(a) + tail;
        }
    }
}

simd::dispatch!(
    /// `acc[row] += Σ_j p[row][j] · values[j]`, each value row read once.
    accumulate_rows(p: &[f32], values: &[f32], hd: usize, acc: &mut [f32]) -> () = accumulate_rows_lanes
);

#[inline(always)]
fn accumulate_rows_lanes<const FMA: bool>(p: &[f32], values: &[f32], hd: usize, acc: &mut [f32]) {
    let r = acc.len() / hd;
    in_row_groups!(r, |row0| accumulate_rows_group::<FMA>(p, values, hd, row0, acc));
}

/// Output rows `row0 .. row0 + R`, one chunk of `LANES` dimensions at a time: the chunk of the R
/// rows stays in registers across the block's keys instead of being loaded and stored per key.
#[inline(always)]
fn accumulate_rows_group<const FMA: bool, const R: usize>(p: &[f32], values: &[f32], hd: usize, row0: usize, acc: &mut [f32]) {
    let kn = values.len() / hd;
    let p: [&[f32]; R] = std::array::from_fn(|i| &p[(row0 + i) * kn..][..kn]);
    let out = &mut acc[row0 * hd..(row0 + R) * hd];
    let body = hd - hd % LANES;
    for c in (0..body).step_by(LANES) {
        let mut regs: [[f32; LANES]; R] = std::array::from_fn(|i| out[i * hd + c..][..LANES].try_into().unwrap());
        for (j, value) in values.chunks_exact(hd).enumerate() {
            let v = &value[c..c + LANES];
            for (reg, pr) in regs.iter_mut().zip(&p) {
                let w = pr[j];
                for l in 0..LANES {
                    reg[l] = simd::madd::<FMA>(w, v[l], reg[l]);
                }
            }
        }
        for (i, reg) in regs.iter().enumerate() {
            out[i * hd + c..][..LANES].copy_from_slice(reg);
        }
    }
    for (j, value) in values.chunks_exact(hd).enumerate() {
        for (i, pr) in p.iter().enumerate() {
            for (o, &v) in out[i * hd + body..(i + 1) * hd].iter_mut().zip(&value[body..]) {
                *o = simd::madd::<FMA>(pr[j], v, *o);
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

    /// Runs the op's steps (round the call's rows, attend, append) for calls of the given lengths and compares every call's output
    /// with the plain definition; returns the largest difference.
    fn split_calls<T: CacheElem>(calls: &[usize], hd: usize, round: impl Fn(&[f32]) -> Vec<f32>) -> f32 {
        let (qh, kvh) = (4, 2);
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
            let (mut nk, mut nv) = (vec![T::default(); s * kvh * hd], vec![T::default(); s * kvh * hd]);
            T::store(&k[rows.clone()], &mut nk);
            T::store(&v[rows], &mut nv);
            let qc = &q[past * qh * hd..(past + s) * qh * hd];
            let want = reference(qc, &kr[..d.total() * kvh * hd], &vr[..d.total() * kvh * hd], &d);
            if splits(&d) {
                // The op's split path: parts of the positions for all heads, then a merge.
                let kv: Vec<_> = (0..kvh).map(|h| HeadCache::new([&cache_k, &cache_v], [&nk, &nv], &d, h)).collect();
                let parts = key_parts(&d, 3);
                assert!(parts.len() > 1 && parts.last().unwrap().end == d.total(), "{parts:?}");
                let mut sc: Vec<Vec<TileScratch>> =
                    parts.iter().map(|_| (0..kvh).map(|_| TileScratch::default()).collect()).collect();
                for (part, heads) in parts.iter().zip(sc.iter_mut()) {
                    split_keys(qc, &kv, &d, part.clone(), heads);
                }
                let (first, rest) = sc.split_first_mut().unwrap();
                for (h, head) in first.iter_mut().enumerate() {
                    merge_parts(head, rest.iter().map(|p| &p[h]), hd);
                    for g in 0..d.group() {
                        for pos in 0..s {
                            let w = &want[(pos * qh + h * d.group() + g) * hd..][..hd];
                            for (a, b) in head.output(g, pos, hd).iter().zip(w) {
                                worst = worst.max((a - b).abs());
                            }
                        }
                    }
                }
            }
            let mut sc = TileScratch::default();
            for h in 0..kvh {
                let kv = HeadCache::new([&cache_k, &cache_v], [&nk, &nv], &d, h);
                assert_eq!(kv.keys.len(), d.total());
                // Tiles of 3 positions (6 rows) take the direct path, tiles of 5 (10 rows) the GEMMs.
                for (start, len) in (0..s).step_by(3).map(|x| (x, 3)).chain((0..s).step_by(5).map(|x| (x, 5))) {
                    let tile_rows = start..(start + len).min(s);
                    tile(qc, kv, &d, h, tile_rows.clone(), &mut sc);
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
            // The caller's append: the call's rows go after the cache, which does not move.
            cache_k.extend_from_slice(&nk);
            cache_v.extend_from_slice(&nv);
            past += s;
        }
        worst
    }

    #[test]
    fn blockwise_attention_matches_the_plain_definition_across_calls_and_key_blocks() {
        // 300 tokens: two key blocks, a prefill call, single tokens (decode) and a call that
        // starts mid-block and crosses into the next one.
        let calls = [1, 140, 1, 1, 157];
        let worst = split_calls::<f32>(&calls, 16, |x| x.to_vec());
        assert!(worst < 2e-6, "f32 cache: max |Δ| {worst}");
        // With an f16 cache the reference sees the same rounded keys and values: only the
        // accumulation order differs.
        let worst = split_calls::<f16>(&calls, 16, |x| x.iter().map(|&a| f16::from_f32(a).to_f32()).collect());
        assert!(worst < 2e-6, "f16 cache: max |Δ| {worst}");
    }

    #[test]
    fn decode_over_a_long_cache_splits_its_positions_and_still_matches() {
        // Past 2 × SPLIT_KEYS positions, calls of up to 2 positions (8 rows) split their keys into
        // parts merged afterwards; width 64 takes the AVX-512 path where the CPU has it. The
        // prefill of 2,100 positions is checked too (GEMM tiles, or bf16 arithmetic). At width
        // 64 scores reach |q·k|·scale ≈ 30, whose f32 rounding (≈ 30 · 2⁻²⁴ = 2e-6) moves the
        // weights by that much relatively and outputs (|v| ≤ 2) by up to ≈ 4e-6: measured 5.7e-6
        // on the prefill and 2.3e-6 on the split decode steps (f32, Zen 4).
        let calls = [2100, 1, 2, 1];
        let exact = 1e-5;
        for (worst, what, bound) in [
            (split_calls::<f32>(&calls, 64, |x| x.to_vec()), "f32", exact),
            (split_calls::<f16>(&calls, 64, |x| x.iter().map(|&a| f16::from_f32(a).to_f32()).collect()), "f16", exact),
            (
                split_calls::<bf16>(&calls, 64, |x| x.iter().map(|&a| bf16::from_f32(a).to_f32()).collect()),
                "bf16",
                if bf16_arithmetic(64) { 1e-2 } else { exact },
            ),
        ] {
            assert!(worst < bound, "{what} cache: max |Δ| {worst}");
        }
    }

    #[test]
    fn bf16_arithmetic_stays_within_its_rounding_of_the_plain_definition() {
        let calls = [1, 140, 1, 1, 157];
        let worst = split_calls::<bf16>(&calls, 16, |x| x.iter().map(|&a| bf16::from_f32(a).to_f32()).collect());
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
