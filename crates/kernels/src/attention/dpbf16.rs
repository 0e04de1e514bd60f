//! The bf16 arithmetic of a query tile, for CPUs with AVX512_BF16 (AMD Zen 4 and later, Intel
//! Cooper Lake and Sapphire Rapids and later).
//!
//! `vdpbf16ps` multiplies pairs of bf16 numbers and adds both products to an f32 lane: twice the
//! multiply-adds of an f32 FMA per instruction, so the two products of a long context's attention
//! (scores and the probability-weighted values) run at about twice the f32 rate. Queries,
//! probabilities and the cache are bf16 (8 significant bits); every sum is f32.
//!
//! The instruction pairs elements along the reduction, so the vector lanes here hold 16 query
//! rows and the other operand is a broadcast pair: keys are read straight from the cache (the pair
//! `k[2c], k[2c+1]` of one key is adjacent in its row); the probabilities and each block's values are
//! packed into pairs of adjacent keys. The tile's output is kept transposed (`[head_dim, rows]`),
//! which also makes the online softmax's per-row maximum and sum plain lane-wise operations.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;
#[cfg(target_arch = "x86_64")]
use half::slice::HalfFloatSliceExt;

use super::{Dims, HeadCache, TileScratch};

/// Keys per block. With a 256-row tile, the block's scores (128 KB), probabilities and packed values
/// (64 KB each) sit in L2 beside the transposed output (256 KB) and the packed queries (128 KB).
const BLOCK: usize = 128;
/// Query rows per micro-tile: two vectors of 16 lanes.
const ROWS: usize = 32;
/// Keys (scores) or head dimensions (values) per micro-tile: 16 accumulators with the two row
/// vectors, enough independent sums to cover the instruction's latency.
const COLS: usize = 8;

/// Buffers of the bf16 path, kept in a [`TileScratch`].
#[derive(Default)]
pub struct Scratch {
    /// Scaled queries, `[head_dim / 2][rows]`, two bf16 per word.
    q: Vec<u32>,
    /// Scores of one block, transposed: `[BLOCK][rows]`.
    scores: Vec<f32>,
    /// Probabilities of one block, `[BLOCK / 2][rows]`, the pair of keys `2j, 2j + 1` per word.
    p: Vec<u32>,
    /// One block's values, `[BLOCK / 2][head_dim]`, the pair of keys `2j, 2j + 1` per word.
    v: Vec<u32>,
    /// Unnormalised output, transposed: `[head_dim][rows]`.
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    /// Absolute position of each row's query; padding rows see every key.
    pos: Vec<i64>,
    block_max: Vec<f32>,
    correction: Vec<f32>,
}

/// Whether a bf16 cache of heads `head_dim` wide computes in bf16 here: the CPU has AVX512_BF16
/// and the width is a multiple of 16 (the real models' are 128 or 256).
pub fn applies(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        head_dim.is_multiple_of(2 * COLS)
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`super::tile`] in bf16 arithmetic; false (nothing done) where it does not [`apply`](applies).
pub fn tile(q: &[f32], kv: HeadCache<'_, bf16>, d: &Dims, h: usize, rows: Range<usize>, sc: &mut TileScratch) -> bool {
    #[cfg(target_arch = "x86_64")]
    if applies(d.head_dim) {
        let end = d.past + rows.end;
        assert!(kv.keys.len() >= end && kv.values.len() >= end, "cache shorter than the tile's keys");
        // SAFETY: the CPU has AVX512_BF16 and AVX512BW (checked above); the slices cover every key
        // the tile reads (asserted above) and the scratch is sized inside.
        unsafe { tile_avx512(q, kv, d, h, rows, sc) };
        return true;
    }
    false
}

/// Round to nearest even; a probability or a finite query never meets the NaN case this skips.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn round(x: f32) -> u32 {
    let b = x.to_bits();
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn tile_avx512(q: &[f32], kv: HeadCache<'_, bf16>, d: &Dims, h: usize, rows: Range<usize>, outer: &mut TileScratch) {
    let HeadCache { keys, values } = kv;
    let (hd, group, n) = (d.head_dim, d.group(), rows.len());
    let r = group * n;
    let rp = r.next_multiple_of(ROWS);
    let half = hd / 2;
    let sc = &mut outer.dpbf16;
    sc.q.clear();
    sc.q.resize(half * rp, 0);
    sc.pos.clear();
    sc.pos.resize(rp, i64::MAX);
    for g in 0..group {
        for (i, s) in rows.clone().enumerate() {
            let row = g * n + i;
            let src = &q[(s * d.q_heads + h * group + g) * hd..][..hd];
            for c in 0..half {
                sc.q[c * rp + row] = round(src[2 * c] * d.scale) | round(src[2 * c + 1] * d.scale) << 16;
            }
            sc.pos[row] = (d.past + s) as i64;
        }
    }
    super::start_rows([&mut sc.acc, &mut sc.max, &mut sc.sum], hd * rp, rp);
    sc.scores.resize(BLOCK * rp, 0.0);
    sc.p.resize(BLOCK / 2 * rp, 0);
    sc.v.resize(BLOCK / 2 * hd, 0);

    let first = d.past + rows.start;
    let end = d.past + rows.end;
    for kb in (0..end).step_by(BLOCK) {
        let kn = BLOCK.min(end - kb);
        let pairs = kn.div_ceil(2);
        for r0 in (0..rp).step_by(ROWS) {
            let mut j = 0;
            while j + COLS <= kn {
                let ks = std::array::from_fn(|m| keys.row(kb + j + m).reinterpret_cast());
                scores::<COLS>(&sc.q, rp, ks, hd, &mut sc.scores, r0, j);
                j += COLS;
            }
            for j in j..kn {
                scores::<1>(&sc.q, rp, [keys.row(kb + j).reinterpret_cast()], hd, &mut sc.scores, r0, j);
            }
        }
        // Keys past a row's own position: only in the blocks that reach beyond the tile's first query.
        if kb + kn > first + 1 {
            for j in 0..kn {
                let key = (kb + j) as i64;
                for (s, &p) in sc.scores[j * rp..(j + 1) * rp].iter_mut().zip(&sc.pos) {
                    if key > p {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
        softmax_block(sc, rp, kn, hd);
        for (jp, pair) in sc.v.chunks_exact_mut(hd).take(pairs).enumerate() {
            let even: &[u16] = values.row(kb + 2 * jp).reinterpret_cast();
            if 2 * jp + 1 < kn {
                let odd: &[u16] = values.row(kb + 2 * jp + 1).reinterpret_cast();
                for ((w, &a), &b) in pair.iter_mut().zip(even).zip(odd) {
                    *w = a as u32 | (b as u32) << 16;
                }
            } else {
                for (w, &a) in pair.iter_mut().zip(even) {
                    *w = a as u32;
                }
            }
        }
        for c0 in (0..hd).step_by(COLS) {
            for r0 in (0..rp).step_by(ROWS) {
                weighted_values(&sc.p, rp, &sc.v, hd, pairs, &mut sc.acc, r0, c0);
            }
        }
    }
    outer.rows = n;
    outer.acc.resize(r * hd, 0.0);
    for (row, out) in outer.acc.chunks_exact_mut(hd).enumerate() {
        let inv = 1.0 / sc.sum[row];
        for (c, o) in out.iter_mut().enumerate() {
            *o = sc.acc[c * rp + row] * inv;
        }
    }
}

/// Online-softmax step over one block's scores: new running maxima, the rescaling of the output
/// and sum so far, and the probabilities packed in key pairs (bf16, rounded; the sum adds the
/// rounded values, so the output is normalised by exactly the weights it was built from).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
fn softmax_block(sc: &mut Scratch, rp: usize, kn: usize, hd: usize) {
    let Scratch { scores, p, acc, max, sum, block_max, correction, .. } = sc;
    block_max.clear();
    block_max.resize(rp, f32::NEG_INFINITY);
    correction.resize(rp, 0.0);
    for j in 0..kn {
        for (m, &s) in block_max.iter_mut().zip(&scores[j * rp..(j + 1) * rp]) {
            *m = m.max(s);
        }
    }
    for ((m, c), &b) in max.iter_mut().zip(correction.iter_mut()).zip(block_max.iter()) {
        let new = m.max(b);
        *c = crate::simd::exp_lane::<true>(*m - new);
        *m = new;
    }
    for (s, &c) in sum.iter_mut().zip(correction.iter()) {
        *s *= c;
    }
    for row in acc.chunks_exact_mut(rp).take(hd) {
        for (a, &c) in row.iter_mut().zip(correction.iter()) {
            *a *= c;
        }
    }
    // An odd block's last pair gets a key of score −∞: probability 0, which adds nothing.
    if kn % 2 == 1 {
        scores[kn * rp..(kn + 1) * rp].fill(f32::NEG_INFINITY);
    }
    for jp in 0..kn.div_ceil(2) {
        let (even, odd) = scores[2 * jp * rp..(2 * jp + 2) * rp].split_at(rp);
        for ((((w, &a), &b), &m), s) in
            p[jp * rp..(jp + 1) * rp].iter_mut().zip(even).zip(odd).zip(max.iter()).zip(sum.iter_mut())
        {
            let (lo, hi) = (round(crate::simd::exp_lane::<true>(a - m)), round(crate::simd::exp_lane::<true>(b - m)));
            *s += f32::from_bits(lo << 16) + f32::from_bits(hi << 16);
            *w = lo | hi << 16;
        }
    }
}

/// Scores of the 32 rows at `r0` against keys `j .. j + M` of the block (`keys[m]` is key
/// `j + m`): `scores[j + m][r0 ..] = Σ_c q[r][c] · k[j + m][c]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
fn scores<const M: usize>(q: &[u32], rp: usize, keys: [&[u16]; M], hd: usize, scores: &mut [f32], r0: usize, j: usize) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let keys = keys.map(|k| &k[..hd]);
    let q = &q[..hd / 2 * rp];
    for c in 0..hd / 2 {
        let [qa, qb] = load_pairs(&q[c * rp + r0..]);
        for (m, a) in acc.iter_mut().enumerate() {
            let pair = keys[m][2 * c] as u32 | (keys[m][2 * c + 1] as u32) << 16;
            let k = bh(_mm512_set1_epi32(pair as i32));
            a[0] = _mm512_dpbf16_ps(a[0], qa, k);
            a[1] = _mm512_dpbf16_ps(a[1], qb, k);
        }
    }
    for (m, a) in acc.iter().enumerate() {
        store_rows(&mut scores[(j + m) * rp + r0..], *a);
    }
}

/// Adds the block's probability-weighted values to the output of the 32 rows at `r0`, head
/// dimensions `c0 .. c0 + COLS`: `acc[c][r] += Σ_j p[r][j] · v[j][c]`, two keys per step.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn weighted_values(p: &[u32], rp: usize, v: &[u32], hd: usize, pairs: usize, acc: &mut [f32], r0: usize, c0: usize) {
    let mut sums: [[__m512; 2]; COLS] = std::array::from_fn(|m| load_rows(&acc[(c0 + m) * rp + r0..]));
    let (p, v) = (&p[..pairs * rp], &v[..pairs * hd]);
    for jp in 0..pairs {
        let [pa, pb] = load_pairs(&p[jp * rp + r0..]);
        let vrow = &v[jp * hd + c0..][..COLS];
        for (s, &pair) in sums.iter_mut().zip(vrow) {
            let w = bh(_mm512_set1_epi32(pair as i32));
            s[0] = _mm512_dpbf16_ps(s[0], pa, w);
            s[1] = _mm512_dpbf16_ps(s[1], pb, w);
        }
    }
    for (m, s) in sums.iter().enumerate() {
        store_rows(&mut acc[(c0 + m) * rp + r0..], *s);
    }
}

/// The first 32 words of `x` (bf16 pairs of 32 rows) as two operands.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
fn load_pairs(x: &[u32]) -> [__m512bh; 2] {
    let x = &x[..ROWS];
    // SAFETY: `x` holds 32 words: two unaligned 64-byte loads.
    unsafe { [bh(_mm512_loadu_si512(x.as_ptr().cast())), bh(_mm512_loadu_si512(x[16..].as_ptr().cast()))] }
}

/// The first 32 floats of `x` (32 rows).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
fn load_rows(x: &[f32]) -> [__m512; 2] {
    let x = &x[..ROWS];
    // SAFETY: `x` holds 32 floats.
    unsafe { [_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x[16..].as_ptr())] }
}

/// Writes 32 rows into the first 32 floats of `x`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
fn store_rows(x: &mut [f32], v: [__m512; 2]) {
    let x = &mut x[..ROWS];
    // SAFETY: `x` holds 32 floats.
    unsafe {
        _mm512_storeu_ps(x.as_mut_ptr(), v[0]);
        _mm512_storeu_ps(x[16..].as_mut_ptr(), v[1]);
    }
}

/// Reinterprets 32 packed bf16 as the instruction's operand type.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute(x) }
}
