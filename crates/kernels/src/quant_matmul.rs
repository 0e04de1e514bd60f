//! `y = x · Wᵀ` for block-quantised weights and a few rows of activations: a decode step (M = 1),
//! a batch of sequences or a speculative verify (M up to 16).
//!
//! The weights are as the importer stores them for ONNX Runtime's `MatMulNBits`
//! (`src/model/quant.rs`): per output row, `blocks` blocks of `block` codes along K, int8 or int4
//! (two per byte, the even element in the low nibble), offset by the midpoint 2^(bits−1), and one
//! f32 scale per row and block. Nothing is repacked at run time.
//!
//! Decode reads every weight byte once per step and does little with it, so its speed is how fast
//! memory streams the weights. To keep the arithmetic below that, the activations are quantised
//! to int8 per block once per call ([`Activations`]), and the products are integer multiply-adds
//! (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`) into 32-bit lanes; only one float multiply-add
//! per lane and block remains. Each weight row, once loaded, serves all M activation rows, which
//! is what makes M = 4 cost little more than M = 1.
//!
//! Rounding: the activations' int8 rounding (half a step of `max|x| / 127` per block) is the only
//! error beyond the weights' own quantisation; ONNX Runtime's `MatMulNBits` at
//! `accuracy_level` 4 rounds its activations the same way.

use std::ops::Range;

use crate::gemm::gemm;
use crate::simd::{LANES, dispatch, sum_lanes};

/// Largest magnitude of an activation code.
const X_MAX: f32 = 127.0;

/// The most activation rows computed together against the weight rows loaded: their
/// accumulators fill about half the vector registers.
const ROWS_AT_ONCE: usize = 4;

/// From this many activation rows on (prefill), the product is a GEMM instead of row by row. With
/// AVX-512 VNNI: over panels of weight rows repacked per call ([`Activations::panelled`],
/// `vnni::panels`), the repacking paid once for all rows, each activation byte serving 32 weight
/// rows instead of 4 or 2. Elsewhere: an f32 GEMM on the weight rows dequantised a few at a time
/// ([`Activations::dequantised`]), as the integer sums without VNNI cost more per product than
/// f32 multiply-adds (on the 2-vCPU Xeon the AVX2 row-by-row kernel, forced, ran 1.8–3.8x behind
/// ORT's `MatMulNBits` with its AVX-512 kernels at M = 64 and 512). On the Xeon, panels overtook
/// the rows between 12 and 16 activation rows (0.8B shapes, from memory).
pub const GEMM_ROWS: usize = 16;

/// Weight rows the f32 path dequantises at a time: 64 rows of K = 12,288 are 3 MB.
const FLOAT_ROWS: usize = 64;

/// Weight rows one panel holds: two AVX-512 vectors of 16 output columns.
const PANEL_WIDTH: usize = 32;

/// One ISA's vector groups of weight rows `rows` for every activation row, added to `out [m,
/// rows.len()]`. Unsafe: the CPU must have the ISA.
type Part = unsafe fn(&Activations, &Weights, Range<usize>, &mut [f32]);

/// Which instructions compute the integer sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 with VNNI: `vpdpbusd`, 64 weight bytes per instruction.
    Vnni512,
    /// AVX2: `vpmaddubsw` then `vpmaddwd`, 32 weight bytes per pair.
    Avx2,
    /// Plain integer loops, block by block.
    Scalar,
}

impl Isa {
    /// The best this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Vnni512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every variant this CPU runs, best first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        [Isa::Vnni512, Isa::Avx2, Isa::Scalar].into_iter().filter(|&i| i.rank() >= Isa::detect().rank()).collect()
    }

    fn rank(self) -> u8 {
        match self {
            Isa::Vnni512 => 0,
            Isa::Avx2 => 1,
            Isa::Scalar => 2,
        }
    }

    /// Weight bytes one vector holds; 0 where blocks are summed one by one.
    fn vector_bytes(self) -> usize {
        match self {
            Isa::Vnni512 => 64,
            Isa::Avx2 => 32,
            Isa::Scalar => 0,
        }
    }
}

/// Block-quantised weights `[n, k]` in `MatMulNBits` layout, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    codes: &'a [u8],
    scales: &'a [f32],
    n: usize,
    k: usize,
    bits: u32,
    block: usize,
}

impl<'a> Weights<'a> {
    /// Checks the layout: `codes [n, ⌈k/block⌉, block·bits/8]`, `scales [n · ⌈k/block⌉]`, 4 or 8
    /// bits, a block of 16 to 256 (a power of two).
    pub fn new(codes: &'a [u8], scales: &'a [f32], n: usize, k: usize, bits: u32, block: usize) -> Result<Self, String> {
        if bits != 4 && bits != 8 {
            return Err(format!("bits must be 4 or 8, not {bits}"));
        }
        if !block.is_power_of_two() || !(16..=256).contains(&block) {
            return Err(format!("block must be 16, 32, 64, 128 or 256, not {block}"));
        }
        let w = Weights { codes, scales, n, k, bits, block };
        if codes.len() != n * w.row_bytes() || scales.len() != n * w.blocks() {
            return Err(format!(
                "{n}x{k} weights in blocks of {block} need {} code bytes and {} scales, got {} and {}",
                n * w.row_bytes(),
                n * w.blocks(),
                codes.len(),
                scales.len()
            ));
        }
        Ok(w)
    }

    fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Bytes one output row reads: its codes and its scales.
    pub fn bytes_per_row(&self) -> usize {
        self.row_bytes() + self.blocks() * std::mem::size_of::<f32>()
    }

    fn row_bytes(&self) -> usize {
        self.blocks() * self.block * self.bits as usize / 8
    }

    fn mid(&self) -> i32 {
        1 << (self.bits - 1)
    }
}

/// How the vector loop walks a row: in groups of whole vectors that hold whole blocks (a block
/// may span several vectors, a vector several blocks), then the blocks left over one by one.
#[derive(Clone, Copy, Debug)]
struct Walk {
    isa: Isa,
    /// 32-bit lanes per vector.
    lanes: usize,
    /// Elements one vector of weight bytes holds.
    vector_elems: usize,
    /// Vectors per group.
    vectors: usize,
    /// Blocks per group.
    group_blocks: usize,
    /// Whole groups per row.
    groups: usize,
}

impl Walk {
    fn new(isa: Isa, w: &Weights) -> Walk {
        let bytes = isa.vector_bytes();
        if bytes == 0 {
            return Walk { isa, lanes: 1, vector_elems: 1, vectors: 0, group_blocks: 1, groups: 0 };
        }
        let vector_elems = bytes * 8 / w.bits as usize;
        let group_elems = vector_elems.max(w.block);
        Walk {
            isa,
            lanes: bytes / 4,
            vector_elems,
            vectors: group_elems / vector_elems,
            group_blocks: group_elems / w.block,
            groups: w.blocks() * w.block / group_elems,
        }
    }

    /// The first block the one-by-one loop sums.
    fn tail_block(&self) -> usize {
        self.groups * self.group_blocks
    }
}

/// Activation rows quantised for one call against weights of one shape: int8 codes per block
/// with their scales, laid out for the vector loop, and per lane the sums that undo the weights'
/// midpoint offset.
pub struct Activations {
    walk: Walk,
    m: usize,
    /// Codes `[m, blocks·block]`. Within the vector groups of int4 weights, each vector's worth of
    /// elements is stored evens first, then odds, matching the low and high nibbles.
    codes: Aligned<i8>,
    /// Scale per row and block, `[m, blocks]`.
    scales: Vec<f32>,
    /// Per row, group and lane, the scale of the block the lane sums, `[m, groups, lanes]`; empty
    /// where a group is one block, whose scale the kernels broadcast from `scales` (a vector of
    /// 16 equal scales per group made int8 at K = 12288 1.4x as slow: more activation bytes to
    /// keep in L1).
    lane_scales: Aligned<f32>,
    /// Per row, group and lane, −midpoint · Σ of the codes the lane multiplies: the sum starts
    /// there, so that it ends as Σ (code − midpoint) · x. Empty where the ISA subtracts the
    /// midpoint itself (int8 on AVX2). Per row and block, `[m, blocks]`, where `panel`.
    offsets: Aligned<i32>,
    /// Laid out for `vnni::panels`: `codes` in the order of the elements (int4: each 8 stored as
    /// the 4 evens, then the 4 odds, as the panels hold the low and high nibbles), no lane scales.
    panel: bool,
    /// The f32 path's activations `[m, k]` as given (and nothing else); empty otherwise.
    floats: Vec<f32>,
    /// Per row of `floats`, whether it holds a NaN or an infinity: its outputs are NaN, as the
    /// integer paths make them (an f32 product could give ±∞ or a number instead).
    poisoned: Vec<bool>,
}

/// A zeroed buffer whose first element sits on a 64-byte boundary: a vector load across two
/// cache lines costs two, and on a Zen 4 EPYC the misaligned activation loads of a `Vec`
/// (16-byte aligned) made four rows 1.2x as slow (1024x4096, int4 and int8, one thread).
struct Aligned<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn new(len: usize) -> Self {
        let per_line = 64 / std::mem::size_of::<T>();
        let buf = vec![T::default(); len + per_line];
        let misaligned = (buf.as_ptr() as usize % 64) / std::mem::size_of::<T>();
        let start = (per_line - misaligned) % per_line;
        Aligned { buf, start, len }
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

dispatch!(
    /// Quantises each block of `block` elements of `x` (the last may be shorter) to symmetric
    /// int8, `max|x| / 127` per step: codes into `codes`, scales into `scales`. A block holding
    /// NaN or an infinity gets a NaN scale, so that the outputs it reaches are NaN as a float
    /// product's would be. One call per row, so that the feature check and the loop set-up are
    /// paid once, not per block.
    quantise_row(x: &[f32], block: usize, codes: &mut [i8], scales: &mut [f32]) -> () = quantise_row_lanes
);

dispatch!(
    /// One weight row's codes (`MatMulNBits` layout) times their blocks' scales: its first
    /// `out.len()` (= K) elements in f32.
    dequantise_row(codes: &[u8], scales: &[f32], bits: u32, block: usize, out: &mut [f32]) -> () = dequantise_row_lanes
);

#[inline(always)]
fn dequantise_row_lanes<const FMA: bool>(codes: &[u8], scales: &[f32], bits: u32, block: usize, out: &mut [f32]) {
    let mid = 1i32 << (bits - 1);
    let block_bytes = block * bits as usize / 8;
    for ((dst, &s), src) in out.chunks_mut(block).zip(scales).zip(codes.chunks_exact(block_bytes)) {
        if bits == 8 {
            for (o, &c) in dst.iter_mut().zip(src) {
                *o = (i32::from(c) - mid) as f32 * s;
            }
        } else {
            for (pair, &c) in dst.chunks_mut(2).zip(src) {
                pair[0] = (i32::from(c & 0x0f) - mid) as f32 * s;
                if let Some(odd) = pair.get_mut(1) {
                    *odd = (i32::from(c >> 4) - mid) as f32 * s;
                }
            }
        }
    }
}

#[inline(always)]
fn quantise_row_lanes<const FMA: bool>(x: &[f32], block: usize, codes: &mut [i8], scales: &mut [f32]) {
    for ((xb, cb), scale) in x.chunks(block).zip(codes.chunks_mut(block)).zip(scales) {
        let amax = block_range_lanes::<FMA>(xb);
        *scale = if amax.is_nan() {
            cb.fill(0);
            f32::NAN
        } else if amax == 0.0 {
            cb.fill(0);
            0.0
        } else {
            round_codes_lanes::<FMA>(xb, X_MAX / amax, cb);
            amax / X_MAX
        };
    }
}

#[inline(always)]
fn block_range_lanes<const FMA: bool>(x: &[f32]) -> f32 {
    let mut top = [0f32; LANES];
    // x · 0 is 0 for every finite x and NaN otherwise: one sum tells whether all were finite.
    let mut poison = [0f32; LANES];
    // Arrays of LANES, not slices, so that the compiler sees whole vectors (with `chunks_exact`
    // it did not, and quantising one row of K = 2048 took 6 µs, a tenth of its matmul).
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            let a = c[l].abs();
            top[l] = if a > top[l] { a } else { top[l] };
            poison[l] += c[l] * 0.0;
        }
    }
    // The tail apart, so that the lanes stay in registers instead of being indexed at run time.
    let mut tail_top = 0f32;
    let mut tail_poison = 0f32;
    for &v in tail {
        tail_top = if v.abs() > tail_top { v.abs() } else { tail_top };
        tail_poison += v * 0.0;
    }
    top[0] = if tail_top > top[0] { tail_top } else { top[0] };
    if (sum_lanes(&poison) + tail_poison).is_nan() {
        return f32::NAN;
    }
    // Pairwise, as `sum_lanes`: log₂ 16 vector steps instead of 15 scalar ones.
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            top[l] = if top[l + width] > top[l] { top[l + width] } else { top[l] };
        }
        width /= 2;
    }
    top[0]
}

/// `codes ← round(x · inv)`, ties to even as ONNX Runtime's `MatMulNBits` rounds its
/// activations (a vector conversion in the default rounding mode): with half away from zero
/// instead, three weight layouts of four at M = 133 and K = 3584 came out up to 1.3e-4 from it,
/// where an activation sat exactly halfway between two codes (`tests/quant_ops.rs`). `|x · inv|`
/// must be at most 127.
#[inline(always)]
fn round_codes_lanes<const FMA: bool>(x: &[f32], inv: f32, codes: &mut [i8]) {
    // Adding 1.5 · 2^23 leaves no bits below the units, so the sum is rounded as the float unit
    // rounds, to even (`f32::round_ties_even` would be a libm call per element without SSE4.1 in
    // the baseline target), and the code is the difference of the sum's bits and the constant's.
    // Converting back instead (`as i32` saturates: a compare per element) kept the loop scalar,
    // 6 µs for a row of K = 2048, a tenth of its matmul.
    const SHIFT: f32 = 12_582_912.0;
    let round = |v: f32| ((v * inv + SHIFT).to_bits().wrapping_sub(SHIFT.to_bits())) as i8;
    let (xs, x_tail) = x.as_chunks::<LANES>();
    let (cs, c_tail) = codes.as_chunks_mut::<LANES>();
    for (c, v) in cs.iter_mut().zip(xs) {
        for l in 0..LANES {
            c[l] = round(v[l]);
        }
    }
    for (c, &v) in c_tail.iter_mut().zip(x_tail) {
        *c = round(v);
    }
}

dispatch!(
    /// `dst` ← `src` with each run of `group` codes stored evens first, then odds: the order in
    /// which int4 weights' low and high nibbles meet them. `group` is 8, 64 or 128 (a panel's
    /// word, an AVX2 or an AVX-512 vector).
    evens_then_odds(group: usize, src: &[i8], dst: &mut [i8]) -> () = evens_then_odds_lanes
);

dispatch!(
    /// `sums[i]` ← Σ of `codes[i·run..(i+1)·run]`, for runs of 4 or 8 (the codes one 32-bit
    /// lane multiplies for int8 and int4 weights).
    code_sums(run: usize, codes: &[i8], sums: &mut [i32]) -> () = code_sums_lanes
);

// Both bodies work on arrays of a fixed length so that the compiler moves whole vectors: as
// slices, byte by byte, they took half the time of quantising a row. `FMA` is unused: `dispatch!`
// compiles them for each instruction set.
#[inline(always)]
fn evens_then_odds_lanes<const FMA: bool>(group: usize, src: &[i8], dst: &mut [i8]) {
    #[inline(always)]
    fn by<const G: usize>(src: &[i8], dst: &mut [i8]) {
        for (d, s) in dst.as_chunks_mut::<G>().0.iter_mut().zip(src.as_chunks::<G>().0) {
            for t in 0..G / 2 {
                d[t] = s[2 * t];
                d[G / 2 + t] = s[2 * t + 1];
            }
        }
    }
    assert!(src.len() == dst.len() && src.len().is_multiple_of(group), "whole groups of {group}");
    match group {
        8 => by::<8>(src, dst),
        64 => by::<64>(src, dst),
        128 => by::<128>(src, dst),
        _ => unreachable!("no vector holds {group} int4 codes"),
    }
}

#[inline(always)]
fn code_sums_lanes<const FMA: bool>(run: usize, codes: &[i8], sums: &mut [i32]) {
    #[inline(always)]
    fn by<const R: usize>(codes: &[i8], sums: &mut [i32]) {
        for (s, c) in sums.iter_mut().zip(codes.as_chunks::<R>().0) {
            *s = c.iter().map(|&v| i32::from(v)).sum();
        }
    }
    assert_eq!(codes.len(), run * sums.len(), "whole runs of {run}");
    match run {
        4 => by::<4>(codes, sums),
        8 => by::<8>(codes, sums),
        _ => unreachable!("a lane multiplies 4 or 8 codes, not {run}"),
    }
}

impl Activations {
    /// Quantises `x [m, k]` for `w`, for the best ISA of this CPU.
    pub fn new(x: &[f32], m: usize, w: &Weights) -> Activations {
        Self::for_isa(x, m, w, Isa::detect())
    }

    /// [`Activations::new`] for a chosen ISA, which must be one of [`Isa::available`].
    pub fn for_isa(x: &[f32], m: usize, w: &Weights, isa: Isa) -> Activations {
        assert_eq!(x.len(), m * w.k, "x must be [m, k]");
        let walk = Walk::new(isa, w);
        if m >= GEMM_ROWS {
            return if isa == Isa::Vnni512 { Self::panelled(x, m, w, walk) } else { Self::dequantised(x, m, w, walk) };
        }
        let (blocks, block) = (w.blocks(), w.block);
        let kp = blocks * block;
        let mut natural = vec![0i8; kp];
        let mut codes = Aligned::new(m * kp);
        let mut scales = vec![0f32; m * blocks];
        let lanes = walk.lanes;
        let mut lane_scales = Aligned::new(if walk.group_blocks > 1 { m * walk.groups * lanes } else { 0 });
        let subtract_mid = !(isa == Isa::Avx2 && w.bits == 8);
        let mut offsets = Aligned::new(if subtract_mid { m * walk.groups * lanes } else { 0 });
        let per_lane = walk.vector_elems / lanes;
        let grouped = walk.groups * walk.group_blocks * block;
        // Σ of the codes each lane of each vector multiplies, in the order of the vectors.
        let mut lane_sums = vec![0i32; grouped / per_lane];
        for r in 0..m {
            let xr = &x[r * w.k..(r + 1) * w.k];
            // The padding past k stays 0 (`natural` is only written below k).
            quantise_row(xr, block, &mut natural[..w.k], &mut scales[r * blocks..(r + 1) * blocks]);
            let out = &mut codes[r * kp..(r + 1) * kp];
            out[grouped..].copy_from_slice(&natural[grouped..]);
            if grouped == 0 {
                // No vectors (`Isa::Scalar`): the blocks are summed one by one.
                continue;
            }
            if w.bits == 4 {
                evens_then_odds(walk.vector_elems, &natural[..grouped], &mut out[..grouped]);
            } else {
                out[..grouped].copy_from_slice(&natural[..grouped]);
            }
            // Lane l sums bytes 4l..4l+4 of the vector: for int4 those of the evens and of the
            // odds, elements 2·4l.. of the natural order either way, so the sums are of runs of
            // the natural order.
            if subtract_mid {
                code_sums(per_lane, &natural[..grouped], &mut lane_sums);
            }
            for g in 0..walk.groups {
                for l in 0..lanes {
                    let at = (r * walk.groups + g) * lanes + l;
                    if walk.group_blocks > 1 {
                        // A group of several blocks is one vector.
                        lane_scales[at] = scales[r * blocks + (g * walk.vector_elems + l * per_lane) / block];
                    }
                    if subtract_mid {
                        let sum: i32 = (0..walk.vectors).map(|v| lane_sums[(g * walk.vectors + v) * lanes + l]).sum();
                        offsets[at] = -w.mid() * sum;
                    }
                }
            }
        }
        Activations { walk, m, codes, scales, lane_scales, offsets, panel: false, floats: Vec::new(), poisoned: Vec::new() }
    }

    /// [`Activations::for_isa`] for the f32 path: `x` kept as it is.
    fn dequantised(x: &[f32], m: usize, w: &Weights, walk: Walk) -> Activations {
        let poisoned = x.chunks_exact(w.k).map(|r| r.iter().any(|v| !v.is_finite())).collect();
        Activations {
            walk,
            m,
            codes: Aligned::new(0),
            scales: Vec::new(),
            lane_scales: Aligned::new(0),
            offsets: Aligned::new(0),
            panel: false,
            floats: x.to_vec(),
            poisoned,
        }
    }

    /// [`Activations::for_isa`] for `vnni::panels`.
    fn panelled(x: &[f32], m: usize, w: &Weights, walk: Walk) -> Activations {
        let (blocks, block) = (w.blocks(), w.block);
        let kp = blocks * block;
        let mut codes = Aligned::new(m * kp);
        let mut scales = vec![0f32; m * blocks];
        let mut offsets = Aligned::new(m * blocks);
        let mut natural = vec![0i8; kp];
        for r in 0..m {
            // The padding past k stays 0 (`natural` is only written below k).
            quantise_row(&x[r * w.k..(r + 1) * w.k], block, &mut natural[..w.k], &mut scales[r * blocks..(r + 1) * blocks]);
            let out = &mut codes[r * kp..(r + 1) * kp];
            if w.bits == 4 {
                evens_then_odds(8, &natural, out);
            } else {
                out.copy_from_slice(&natural);
            }
            for (b, codes) in natural.chunks_exact(block).enumerate() {
                offsets[r * blocks + b] = -w.mid() * codes.iter().map(|&c| i32::from(c)).sum::<i32>();
            }
        }
        Activations {
            walk,
            m,
            codes,
            scales,
            lane_scales: Aligned::new(0),
            offsets,
            panel: true,
            floats: Vec::new(),
            poisoned: Vec::new(),
        }
    }

    /// Output rows best given to one [`Activations::matmul_rows`] together: ranges of a multiple
    /// of this fill the panels of the GEMM path (a range of 16 rows costs as much as one of 32).
    pub fn row_grain(&self) -> usize {
        if self.panel {
            PANEL_WIDTH
        } else if !self.floats.is_empty() {
            FLOAT_ROWS
        } else {
            1
        }
    }

    /// Output columns `rows` of `y = x · wᵀ` into `out [m, rows.len()]` (row-major). `w` must be
    /// the weights these activations were quantised for.
    pub fn matmul_rows(&self, w: &Weights, rows: Range<usize>, out: &mut [f32]) {
        assert!(rows.end <= w.n, "rows {rows:?} of {} outputs", w.n);
        assert_eq!(out.len(), self.m * rows.len(), "out must be [m, rows]");
        let held = if self.floats.is_empty() { self.codes.len() } else { self.floats.len() / w.k * w.blocks() * w.block };
        assert_eq!(held, self.m * w.blocks() * w.block, "activations quantised for other weights");
        if self.panel {
            // SAFETY: only `for_isa` with `Isa::Vnni512`, which `Isa::available` found on this
            // CPU, makes panelled activations; the rows are in range and `out` is [m, rows].
            #[cfg(target_arch = "x86_64")]
            unsafe {
                vnni::panels(self, w, rows, out)
            };
            return;
        }
        if !self.floats.is_empty() {
            self.float_product(w, rows, out);
            return;
        }
        out.fill(0.0);
        let part: Option<Part> = match self.walk.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni512 => Some(vnni::part),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(avx2::part),
            _ => None,
        };
        if let Some(part) = part {
            // SAFETY: `part` is the function of this walk's ISA, which `Isa::available` found on
            // this CPU; the rows are in range and `out` is [m, rows].
            unsafe { part(self, w, rows.clone(), out) };
        }
        self.add_tail(w, rows, out);
    }

    /// The f32 path of [`Activations::matmul_rows`]: `FLOAT_ROWS` weight rows at a time
    /// dequantised, then one SGEMM of every activation row against them.
    fn float_product(&self, w: &Weights, rows: Range<usize>, out: &mut [f32]) {
        let (width, k) = (rows.len(), w.k);
        let mut wf = vec![0f32; FLOAT_ROWS.min(width) * k];
        for start in rows.clone().step_by(FLOAT_ROWS) {
            let n = (rows.end - start).min(FLOAT_ROWS);
            for (j, dst) in wf[..n * k].chunks_exact_mut(k).enumerate() {
                let row = start + j;
                let codes = &w.codes[row * w.row_bytes()..(row + 1) * w.row_bytes()];
                dequantise_row(codes, &w.scales[row * w.blocks()..(row + 1) * w.blocks()], w.bits, w.block, dst);
            }
            // out[:, start..start + n] = x · wfᵀ, wfᵀ read column by column from wf's rows.
            gemm(self.m, k, n, 1.0, &self.floats, k, 1, &wf, 1, k, 0.0, &mut out[start - rows.start..], width);
        }
        for (r, _) in self.poisoned.iter().enumerate().filter(|(_, p)| **p) {
            out[r * width..(r + 1) * width].fill(f32::NAN);
        }
    }

    /// Adds the blocks the vector loop leaves (all of them for [`Isa::Scalar`]) one by one.
    fn add_tail(&self, w: &Weights, rows: Range<usize>, out: &mut [f32]) {
        let (blocks, block, mid) = (w.blocks(), w.block, w.mid());
        let first = self.walk.tail_block();
        if first == blocks {
            return;
        }
        let kp = blocks * block;
        let width = rows.len();
        let block_bytes = block * w.bits as usize / 8;
        for (j, n) in rows.enumerate() {
            let row = &w.codes[n * w.row_bytes()..(n + 1) * w.row_bytes()];
            for b in first..blocks {
                let wb = &row[b * block_bytes..(b + 1) * block_bytes];
                let ws = w.scales[n * blocks + b];
                for r in 0..self.m {
                    let xb = &self.codes[r * kp + b * block..r * kp + (b + 1) * block];
                    let sum: i32 = if w.bits == 8 {
                        wb.iter().zip(xb).map(|(&c, &x)| (i32::from(c) - mid) * i32::from(x)).sum()
                    } else {
                        wb.iter()
                            .zip(xb.chunks_exact(2))
                            .map(|(&c, x)| {
                                (i32::from(c & 0x0f) - mid) * i32::from(x[0]) + (i32::from(c >> 4) - mid) * i32::from(x[1])
                            })
                            .sum()
                    };
                    out[r * width + j] += sum as f32 * (ws * self.scales[r * blocks + b]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Activations, Aligned, ROWS_AT_ONCE, Weights};

    /// 32-bit lanes of a vector.
    const LANES: usize = 16;

    const PANEL: usize = super::PANEL_WIDTH;
    const _: () = assert!(PANEL == 2 * LANES, "a panel is two vectors of output columns");

    /// Activation rows one pass over a panel computes: with the panel's two vectors, 2 · 6 integer
    /// and 2 · 6 float accumulators, the weights and the broadcast fill the 32 vector registers.
    const PANEL_MR: usize = 6;

    /// Weight rows `rows` for every activation row of panelled activations, into `out [m,
    /// rows.len()]`: a small GEMM. Each run of 32 rows is repacked ([`pack`]) so that one vector
    /// holds 4 consecutive codes of 16 rows, matching the lanes of `vpdpbusd`; then every 4
    /// activation codes, broadcast, meet 32 rows in two instructions, and each block's sums are
    /// scaled once per vector of 16 rows. The row-by-row kernel ([`part`]) instead reloads every
    /// activation vector for each 2 weight rows, and scales every row's sums alone.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) unsafe fn panels(a: &Activations, w: &Weights, rows: Range<usize>, out: &mut [f32]) {
        let width = rows.len();
        let steps = w.blocks() * w.block / 4;
        let mut packed = Aligned::<u8>::new(steps * PANEL * 4);
        let mut scales = vec![0f32; w.blocks() * PANEL];
        let mut col = 0;
        while col < width {
            let cols = (width - col).min(PANEL);
            // SAFETY: the rows are in range; the caller checked the CPU's features.
            unsafe { pack(w, rows.start + col, cols, &mut packed, &mut scales) };
            let mut m0 = 0;
            while m0 < a.m {
                let mr = (a.m - m0).min(PANEL_MR);
                let at = Panel { packed: &packed, scales: &scales, m0, col, cols, width };
                // SAFETY: as above; `out` is [m, width].
                unsafe {
                    match mr {
                        1 => panel::<1>(a, w, &at, out),
                        2 => panel::<2>(a, w, &at, out),
                        3 => panel::<3>(a, w, &at, out),
                        4 => panel::<4>(a, w, &at, out),
                        5 => panel::<5>(a, w, &at, out),
                        _ => panel::<6>(a, w, &at, out),
                    }
                }
                m0 += mr;
            }
            col += cols;
        }
    }

    /// Where one pass of [`panel`] reads and writes.
    struct Panel<'a> {
        /// `[steps, 2, 64]`: per step of 4 codes along K, a vector of 16 rows' 4 codes for each
        /// half of the panel.
        packed: &'a [u8],
        /// `[blocks, 32]`: the panel's rows' scales, block by block.
        scales: &'a [f32],
        /// First activation row.
        m0: usize,
        /// First output column, and how many of the panel's 32 rows are real.
        col: usize,
        cols: usize,
        /// Columns of `out`.
        width: usize,
    }

    /// Repacks weight rows `first..first + cols` (at most 32; the last is repeated to fill) into
    /// `packed` and `scales` as [`Panel`] describes. A step takes one 32-bit word of each row:
    /// int8 codes 4s..4s+4; for int4 a word holds 8 codes, and its low nibbles (the evens) make
    /// one step, its high nibbles (the odds) the next, which is why panelled activations store
    /// each 8 codes evens first. Words are read 16 per row at a time (a cache line of each of
    /// 16 rows) and transposed in registers; the rest of a row, if any, is gathered word by word
    /// (gathering every word ran the 0.8B qkv matrix at M = 512 about 10 % slower).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    unsafe fn pack(w: &Weights, first: usize, cols: usize, packed: &mut [u8], scales: &mut [f32]) {
        let row_bytes = w.row_bytes();
        let blocks = w.blocks();
        let words = row_bytes / 4;
        for half in 0..2 {
            let row = |j: usize| (half * LANES + j).min(cols - 1);
            for b in 0..blocks {
                for j in 0..LANES {
                    scales[b * PANEL + half * LANES + j] = w.scales[(first + row(j)) * blocks + b];
                }
            }
            // SAFETY: the words read lie within rows `first..first + cols` of `w` (row_bytes is a
            // multiple of 4: blocks hold at least 16 codes); the stores within `packed`, [steps, 2,
            // 64]; the caller checked the CPU's features.
            unsafe {
                let base = w.codes.as_ptr().add(first * row_bytes);
                let rows: [*const u8; LANES] = std::array::from_fn(|j| base.add(row(j) * row_bytes));
                let dst = packed.as_mut_ptr().add(half * 64);
                let store = |word: usize, v: __m512i| {
                    if w.bits == 8 {
                        _mm512_storeu_si512(dst.add(word * 128).cast(), v);
                    } else {
                        let nib = _mm512_set1_epi8(0x0f);
                        _mm512_storeu_si512(dst.add(2 * word * 128).cast(), _mm512_and_si512(v, nib));
                        _mm512_storeu_si512(
                            dst.add((2 * word + 1) * 128).cast(),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib),
                        );
                    }
                };
                let whole = words / LANES * LANES;
                for w0 in (0..whole).step_by(LANES) {
                    let lines: [__m512i; LANES] = std::array::from_fn(|j| _mm512_loadu_si512(rows[j].add(4 * w0).cast()));
                    for (s, v) in transpose(lines).into_iter().enumerate() {
                        store(w0 + s, v);
                    }
                }
                let offsets: [i32; LANES] = std::array::from_fn(|j| (row(j) * row_bytes) as i32);
                let idx = _mm512_loadu_si512(offsets.as_ptr().cast());
                for word in whole..words {
                    store(word, _mm512_i32gather_epi32::<1>(idx, base.add(4 * word).cast()));
                }
            }
        }
    }

    /// The 16 × 16 transpose of 32-bit words: word s of vector j becomes word j of vector s.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[inline]
    fn transpose(r: [__m512i; LANES]) -> [__m512i; LANES] {
        // Within each 128-bit lane: pairs of rows interleaved by words, then groups of four rows
        // by pairs of words, so that u[g][e] holds word 4L + e of rows 4g..4g + 4 in lane L.
        let t: [__m512i; LANES] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 { _mm512_unpacklo_epi32(a, b) } else { _mm512_unpackhi_epi32(a, b) }
        });
        let u: [[__m512i; 4]; 4] = std::array::from_fn(|g| {
            let (lo, hi) = ((t[4 * g], t[4 * g + 2]), (t[4 * g + 1], t[4 * g + 3]));
            [
                _mm512_unpacklo_epi64(lo.0, lo.1),
                _mm512_unpackhi_epi64(lo.0, lo.1),
                _mm512_unpacklo_epi64(hi.0, hi.1),
                _mm512_unpackhi_epi64(hi.0, hi.1),
            ]
        });
        // Then lane L of u[0..4][e], in order, is output vector 4L + e.
        let mut out = [_mm512_setzero_si512(); LANES];
        for e in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[0][e], u[1][e]);
            let v1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[0][e], u[1][e]);
            let v2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[2][e], u[3][e]);
            let v3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[2][e], u[3][e]);
            out[e] = _mm512_shuffle_i32x4::<0b10_00_10_00>(v0, v2);
            out[4 + e] = _mm512_shuffle_i32x4::<0b11_01_11_01>(v0, v2);
            out[8 + e] = _mm512_shuffle_i32x4::<0b10_00_10_00>(v1, v3);
            out[12 + e] = _mm512_shuffle_i32x4::<0b11_01_11_01>(v1, v3);
        }
        out
    }

    /// One pass of [`panels`]: activation rows `m0..m0 + MR` against the panel, into `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn panel<const MR: usize>(a: &Activations, w: &Weights, at: &Panel, out: &mut [f32]) {
        let blocks = w.blocks();
        let per_block = w.block / 4;
        let kp = blocks * w.block;
        // SAFETY: the activation rows `m0..m0 + MR` exist (codes [m, kp], scales and offsets [m,
        // blocks]); the steps lie within `packed`; the stores within `out`'s rows `m0..m0 + MR`,
        // columns `col..col + cols`; the caller checked the CPU's features.
        unsafe {
            let xp: [*const u8; MR] = std::array::from_fn(|i| a.codes.as_ptr().add((at.m0 + i) * kp).cast());
            let pp = at.packed.as_ptr();
            let mut acc = [[_mm512_setzero_ps(); MR]; 2];
            for b in 0..blocks {
                let off: [__m512i; MR] =
                    std::array::from_fn(|i| _mm512_set1_epi32(*a.offsets.as_ptr().add((at.m0 + i) * blocks + b)));
                let mut isum = [off; 2];
                for s in b * per_block..(b + 1) * per_block {
                    let w0 = _mm512_loadu_si512(pp.add(s * 128).cast());
                    let w1 = _mm512_loadu_si512(pp.add(s * 128 + 64).cast());
                    for i in 0..MR {
                        let x = _mm512_set1_epi32(xp[i].add(4 * s).cast::<i32>().read_unaligned());
                        isum[0][i] = _mm512_dpbusd_epi32(isum[0][i], w0, x);
                        isum[1][i] = _mm512_dpbusd_epi32(isum[1][i], w1, x);
                    }
                }
                let ws = [
                    _mm512_loadu_ps(at.scales.as_ptr().add(b * PANEL)),
                    _mm512_loadu_ps(at.scales.as_ptr().add(b * PANEL + LANES)),
                ];
                for i in 0..MR {
                    let xs = _mm512_set1_ps(*a.scales.as_ptr().add((at.m0 + i) * blocks + b));
                    for h in 0..2 {
                        acc[h][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[h][i]), _mm512_mul_ps(ws[h], xs), acc[h][i]);
                    }
                }
            }
            for (h, half) in acc.iter().enumerate() {
                let Some(left) = at.cols.checked_sub(h * LANES).filter(|&l| l > 0) else { break };
                let mask: __mmask16 = if left >= LANES { 0xffff } else { (1u16 << left) - 1 };
                for (i, &v) in half.iter().enumerate() {
                    let dst = out.as_mut_ptr().add((at.m0 + i) * at.width + at.col + h * LANES);
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }

    /// Pairs of accumulators (integer and float) one pass keeps in registers: weight rows ×
    /// activation rows; more than this spills out of the 32 vector registers.
    const ACCUMULATORS: usize = 8;

    /// How far ahead in each weight row to prefetch: 256 bytes ran 1.1x faster than none on a
    /// Zen 4 EPYC, 1–4 KB slower than none (the hardware prefetcher follows a few sequential
    /// streams, and more than that thrashes).
    const PREFETCH: usize = 256;

    /// Weight rows `rows` for every activation row, into `out [m, rows.len()]`.
    ///
    /// `R` weight rows at a time, each activation vector, offset and scale loaded once serving
    /// them all, and the `R` rows taken from as many evenly spaced places of `rows`, so that
    /// memory sees `R` sequential streams; every activation row is summed against them while
    /// they are in L1, two at a time against four weight rows, four at a time against two (the
    /// integer and float accumulators, R · MR of each, must fit the 32 vector registers).
    ///
    /// Measured (2 threads, 6144x1024, the weights from memory, against one weight row at a time
    /// for four activation rows): on an Intel Xeon with AVX-512 VNNI, M = 1 1.15x (int8) and
    /// 1.1x (int4), M = 2 1.18x / 1.13x, M = 4 1.11x / 1.12x, M = 16 1.28x / 1.17x; four weight
    /// rows for M = 3 and 4 ran 1.07–1.12x two, for M = 7 and 16 0.85–1.0x. On a Zen 4 EPYC, one
    /// thread, M = 1: 1.3x from memory, 1.4–1.65x in cache. Four neighbouring rows instead, one 4
    /// KB stretch read in four interleaved pieces, made M = 1 1.7x slower from memory on the
    /// EPYC, and 2 or 8 streams were slower than 4.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) unsafe fn part(a: &Activations, w: &Weights, rows: Range<usize>, out: &mut [f32]) {
        let width = rows.len();
        // SAFETY (all three): the caller checked the CPU's features; the rows are in range.
        let done = if a.m <= 4 {
            unsafe { streams::<4>(a, w, rows.clone(), out, width) }
        } else {
            unsafe { streams::<2>(a, w, rows.clone(), out, width) }
        };
        unsafe { streams::<1>(a, w, rows.start + done..rows.end, &mut out[done..], width) };
    }

    /// The first multiple of `R` of weight rows `rows` in `R` streams, into `out [m, width]`
    /// from its first column on; returns how many.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    unsafe fn streams<const R: usize>(a: &Activations, w: &Weights, rows: Range<usize>, out: &mut [f32], width: usize) -> usize {
        let lanes: [i32; LANES] = std::array::from_fn(|l| (l * a.walk.group_blocks / LANES) as i32);
        let per_stream = rows.len() / R;
        for i in 0..per_stream {
            let ns: [usize; R] = std::array::from_fn(|r| rows.start + r * per_stream + i);
            // Every activation row against these weight rows while they are in L1.
            let mut m0 = 0;
            while m0 < a.m {
                let mr = (a.m - m0).min(ROWS_AT_ONCE).min(ACCUMULATORS / R);
                let mut sums = [[0f32; ROWS_AT_ONCE]; R];
                // SAFETY: the rows are in range; the caller checked the CPU's features.
                unsafe {
                    match (mr, w.bits == 4) {
                        (1, true) => rows_at::<R, 1, true>(a, w, &lanes, ns, m0, &mut sums),
                        (2, true) => rows_at::<R, 2, true>(a, w, &lanes, ns, m0, &mut sums),
                        (3, true) => rows_at::<R, 3, true>(a, w, &lanes, ns, m0, &mut sums),
                        (_, true) => rows_at::<R, 4, true>(a, w, &lanes, ns, m0, &mut sums),
                        (1, false) => rows_at::<R, 1, false>(a, w, &lanes, ns, m0, &mut sums),
                        (2, false) => rows_at::<R, 2, false>(a, w, &lanes, ns, m0, &mut sums),
                        (3, false) => rows_at::<R, 3, false>(a, w, &lanes, ns, m0, &mut sums),
                        (_, false) => rows_at::<R, 4, false>(a, w, &lanes, ns, m0, &mut sums),
                    }
                }
                for (r, row) in sums.iter().enumerate() {
                    for (j, s) in row[..mr].iter().enumerate() {
                        out[(m0 + j) * width + r * per_stream + i] += s;
                    }
                }
                m0 += mr;
            }
        }
        per_stream * R
    }

    /// The vector groups of weight rows `ns` against activation rows `m0..m0 + MR`, into
    /// `sums [R][MR]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn rows_at<const R: usize, const MR: usize, const INT4: bool>(
        a: &Activations,
        w: &Weights,
        lanes: &[i32; LANES],
        ns: [usize; R],
        m0: usize,
        sums: &mut [[f32; ROWS_AT_ONCE]; R],
    ) {
        let walk = a.walk;
        let kp = w.blocks() * w.block;
        let group_bytes = walk.vectors * 64;
        let scale_mask: __mmask16 = if walk.group_blocks >= 16 { 0xffff } else { (1u16 << walk.group_blocks) - 1 };
        // SAFETY: every pointer stays inside its slice: `ns` are rows of `w`, the groups and
        // their vectors lie within a row's bytes and the activations' codes, offsets and lane
        // scales (`Walk`); the caller checked the CPU's features.
        unsafe {
            let nib = _mm512_set1_epi8(0x0f);
            let idx = _mm512_loadu_si512(lanes.as_ptr().cast());
            let xp: [*const i8; MR] = std::array::from_fn(|i| a.codes.as_ptr().add((m0 + i) * kp));
            let op: [*const i32; MR] = std::array::from_fn(|i| a.offsets.as_ptr().add((m0 + i) * walk.groups * 16));
            // Not read where a group is one block (`lane_scales` is empty then).
            let sp: [*const f32; MR] = std::array::from_fn(|i| a.lane_scales.as_ptr().wrapping_add((m0 + i) * walk.groups * 16));
            let wrow: [*const u8; R] = std::array::from_fn(|r| w.codes.as_ptr().add(ns[r] * w.row_bytes()));
            let srow: [*const f32; R] = std::array::from_fn(|r| w.scales.as_ptr().add(ns[r] * w.blocks()));
            let mut acc = [[_mm512_setzero_ps(); MR]; R];
            for g in 0..walk.groups {
                let off: [__m512i; MR] = std::array::from_fn(|i| _mm512_loadu_si512(op[i].add(g * 16).cast()));
                let mut isum = [off; R];
                for v in 0..walk.vectors {
                    let at = (g * walk.vectors + v) * walk.vector_elems;
                    let wb = g * group_bytes + v * 64;
                    for r in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(wrow[r].add(wb + PREFETCH).cast());
                        let wv = _mm512_loadu_si512(wrow[r].add(wb).cast());
                        if INT4 {
                            let lo = _mm512_and_si512(wv, nib);
                            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), nib);
                            for i in 0..MR {
                                let x = xp[i].add(at);
                                isum[r][i] = _mm512_dpbusd_epi32(isum[r][i], lo, _mm512_loadu_si512(x.cast()));
                                isum[r][i] = _mm512_dpbusd_epi32(isum[r][i], hi, _mm512_loadu_si512(x.add(64).cast()));
                            }
                        } else {
                            for i in 0..MR {
                                isum[r][i] = _mm512_dpbusd_epi32(isum[r][i], wv, _mm512_loadu_si512(xp[i].add(at).cast()));
                            }
                        }
                    }
                }
                let xs: [__m512; MR] = std::array::from_fn(|i| {
                    if walk.group_blocks == 1 {
                        _mm512_set1_ps(*a.scales.as_ptr().add((m0 + i) * w.blocks() + g))
                    } else {
                        _mm512_loadu_ps(sp[i].add(g * 16))
                    }
                });
                for r in 0..R {
                    let ws = if walk.group_blocks == 1 {
                        _mm512_set1_ps(*srow[r].add(g))
                    } else {
                        _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(scale_mask, srow[r].add(g * walk.group_blocks)))
                    };
                    for i in 0..MR {
                        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][i]), _mm512_mul_ps(ws, xs[i]), acc[r][i]);
                    }
                }
            }
            for r in 0..R {
                for i in 0..MR {
                    sums[r][i] = _mm512_reduce_add_ps(acc[r][i]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Activations, Weights};

    /// 32-bit lanes of a vector.
    const LANES: usize = 8;

    /// The sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    // u8 · i8 pairs into i16 (`vpmaddubsw`, which saturates, so int8 weights go in signed with
    // the sign of x moved onto them, int4 ones as their unsigned nibbles), then pairs of those
    // into i32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn part(a: &Activations, w: &Weights, rows: Range<usize>, out: &mut [f32]) {
        // A weight row at a time for every activation row, so that each row is read from
        // memory once (walking K in L1-sized segments instead, to keep the activations in
        // L1, was slower: the weight rows then streamed in pieces).
        let width = rows.len();
        let lanes: [i32; LANES] = std::array::from_fn(|l| (l * a.walk.group_blocks / LANES) as i32);
        for (j, n) in rows.enumerate() {
            let mut m0 = 0;
            while m0 < a.m {
                let mr = (a.m - m0).min(super::ROWS_AT_ONCE);
                let mut sums = [0f32; super::ROWS_AT_ONCE];
                // SAFETY: the caller checked the CPU's features and the rows.
                unsafe {
                    match (mr, w.bits == 4) {
                        (1, true) => part_of::<1, true>(a, w, &lanes, n, m0, &mut sums),
                        (2, true) => part_of::<2, true>(a, w, &lanes, n, m0, &mut sums),
                        (3, true) => part_of::<3, true>(a, w, &lanes, n, m0, &mut sums),
                        (_, true) => part_of::<4, true>(a, w, &lanes, n, m0, &mut sums),
                        (1, false) => part_of::<1, false>(a, w, &lanes, n, m0, &mut sums),
                        (2, false) => part_of::<2, false>(a, w, &lanes, n, m0, &mut sums),
                        (3, false) => part_of::<3, false>(a, w, &lanes, n, m0, &mut sums),
                        (_, false) => part_of::<4, false>(a, w, &lanes, n, m0, &mut sums),
                    }
                }
                for (i, s) in sums[..mr].iter().enumerate() {
                    out[(m0 + i) * width + j] += s;
                }
                m0 += mr;
            }
        }
    }

    /// The vector groups of weight row `n` against activation rows `m0..m0 + MR`, into `sums`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn part_of<const MR: usize, const INT4: bool>(
        a: &Activations,
        w: &Weights,
        lanes: &[i32; LANES],
        n: usize,
        m0: usize,
        sums: &mut [f32; super::ROWS_AT_ONCE],
    ) {
        let walk = a.walk;
        let kp = w.blocks() * w.block;
        let group_bytes = walk.vectors * 32;
        // The group's scales, loaded without reading past them (the row's last group).
        let first_lanes: [i32; 8] = std::array::from_fn(|l| if l < walk.group_blocks { -1 } else { 0 });
        // SAFETY: as for the AVX-512 variant.
        unsafe {
            let nib = _mm256_set1_epi8(0x0f);
            let flip = _mm256_set1_epi8(-128);
            let ones = _mm256_set1_epi16(1);
            let idx = _mm256_loadu_si256(lanes.as_ptr().cast());
            let scale_mask = _mm256_loadu_si256(first_lanes.as_ptr().cast());
            let xp: [*const i8; MR] = std::array::from_fn(|i| a.codes.as_ptr().add((m0 + i) * kp));
            // Not read where a group is one block (`lane_scales` is empty then).
            let sp: [*const f32; MR] = std::array::from_fn(|i| a.lane_scales.as_ptr().wrapping_add((m0 + i) * walk.groups * 8));
            let wrow = w.codes.as_ptr().add(n * w.row_bytes());
            let srow = w.scales.as_ptr().add(n * w.blocks());
            let mut acc = [_mm256_setzero_ps(); MR];
            for g in 0..walk.groups {
                let mut isum: [__m256i; MR] = if INT4 {
                    std::array::from_fn(|i| _mm256_loadu_si256(a.offsets.as_ptr().add(((m0 + i) * walk.groups + g) * 8).cast()))
                } else {
                    [_mm256_setzero_si256(); MR]
                };
                for v in 0..walk.vectors {
                    let wv = _mm256_loadu_si256(wrow.add(g * group_bytes + v * 32).cast());
                    let at = (g * walk.vectors + v) * walk.vector_elems;
                    if INT4 {
                        let lo = _mm256_and_si256(wv, nib);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), nib);
                        for i in 0..MR {
                            let x = xp[i].add(at);
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x.cast())),
                                _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(32).cast())),
                            );
                            isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(p, ones));
                        }
                    } else {
                        // code − 128 as i8: codes are 1..=255, so −127..=127.
                        let signed = _mm256_xor_si256(wv, flip);
                        for i in 0..MR {
                            let x = _mm256_loadu_si256(xp[i].add(at).cast());
                            let p = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(signed, x));
                            isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                let ws = if walk.group_blocks == 1 {
                    _mm256_set1_ps(*srow.add(g))
                } else {
                    _mm256_permutevar8x32_ps(_mm256_maskload_ps(srow.add(g * walk.group_blocks), scale_mask), idx)
                };
                for i in 0..MR {
                    let xs = if walk.group_blocks == 1 {
                        _mm256_set1_ps(*a.scales.as_ptr().add((m0 + i) * w.blocks() + g))
                    } else {
                        _mm256_loadu_ps(sp[i].add(g * 8))
                    };
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(ws, xs), acc[i]);
                }
            }
            for i in 0..MR {
                sums[i] = sum8(acc[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// Random codes (1..=2^bits − 1, as the importer's symmetric rounding writes them) and scales.
    fn weights(n: usize, k: usize, bits: u32, block: usize, rng: &mut StdRng) -> (Vec<u8>, Vec<f32>) {
        let blocks = k.div_ceil(block);
        let top = (1u16 << bits) - 1;
        let codes: Vec<u8> = (0..n * blocks * block)
            .map(|_| rng.random_range(1..=top) as u8)
            .collect::<Vec<_>>()
            .chunks(8 / bits as usize)
            .map(|c| if bits == 8 { c[0] } else { c[0] | c[1] << 4 })
            .collect();
        let scales = (0..n * blocks).map(|_| rng.random_range(0.001f32..0.05)).collect();
        (codes, scales)
    }

    fn code(codes: &[u8], bits: u32, at: usize) -> i32 {
        if bits == 8 { i32::from(codes[at]) } else { i32::from((codes[at / 2] >> (at % 2 * 4)) & 0x0f) }
    }

    /// Per output, in f64: the sum the integer paths must reproduce (the same int8 activations),
    /// its scale (Σ |terms|), the float product of the dequantised weights with x (what the f32
    /// path must reproduce), the most the activations' rounding may move the result from that
    /// product, and the float product's scale.
    fn reference(x: &[f32], m: usize, w: &Weights) -> Vec<[f64; 5]> {
        let (blocks, block, mid) = (w.blocks(), w.block, w.mid());
        let mut out = Vec::new();
        for r in 0..m {
            let xr = &x[r * w.k..(r + 1) * w.k];
            let (mut codes, mut scales) = (vec![0i8; w.k], vec![0f32; blocks]);
            quantise_row(xr, block, &mut codes, &mut scales);
            for n in 0..w.n {
                let [mut exact, mut size, mut float, mut bound, mut float_size] = [0f64; 5];
                for b in 0..blocks {
                    let xb = &xr[b * block..((b + 1) * block).min(w.k)];
                    let q = &codes[b * block..b * block + xb.len()];
                    let xs = scales[b] as f64;
                    let ws = w.scales[n * blocks + b] as f64;
                    for (j, (&xv, &qv)) in xb.iter().zip(q).enumerate() {
                        let c = (code(w.codes, w.bits, n * blocks * block + b * block + j) - mid) as f64;
                        exact += ws * xs * c * qv as f64;
                        size += (ws * xs * c * qv as f64).abs();
                        float += ws * c * xv as f64;
                        float_size += (ws * c * xv as f64).abs();
                        bound += ws * c.abs() * xs / 2.0;
                    }
                }
                out.push([exact, size, float, bound, float_size]);
            }
        }
        out
    }

    #[test]
    fn every_isa_block_and_width_sums_as_the_plain_definition() {
        let mut rng = StdRng::seed_from_u64(7);
        let isas = Isa::available();
        assert!(isas.contains(&Isa::Scalar));
        // k: whole vector groups, a tail of blocks after them, and a last block cut short.
        for (bits, block, k) in [4u32, 8].into_iter().flat_map(|b| {
            [16usize, 32, 64, 128, 256].into_iter().flat_map(move |s| [(b, s, 1024), (b, s, 3 * s + 512), (b, s, 200)])
        }) {
            // 33 rows: 32 in 4 or 2 streams and one left over, or a panel of 32 and one of 1.
            let n = 38;
            let (codes, scales) = weights(n, k, bits, block, &mut rng);
            let w = Weights::new(&codes, &scales, n, k, bits, block).unwrap();
            // From 16 rows on in panels, 6 at a time (6 + 6 + 4 and 6 + 6 + 6 + 5), or in f32.
            for m in [1, 2, 3, 4, 7, 16, 23] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2f32..2.0)).collect();
                let want = reference(&x, m, &w);
                for &isa in &isas {
                    let a = Activations::for_isa(&x, m, &w, isa);
                    let rows = 5..n;
                    let mut y = vec![f32::NAN; m * rows.len()];
                    a.matmul_rows(&w, rows.clone(), &mut y);
                    for r in 0..m {
                        for (j, nn) in rows.clone().enumerate() {
                            let [exact, size, float, bound, float_size] = want[r * n + nn];
                            let got = y[r * rows.len() + j] as f64;
                            let what = format!("{isa:?}, {bits} bits, block {block}, k {k}, m {m}: y[{r}, {nn}]");
                            if a.floats.is_empty() {
                                assert!(
                                    (got - exact).abs() <= 1e-5 * size + 1e-9,
                                    "{what} = {got}, the integer sums give {exact}"
                                );
                                assert!(
                                    (got - float).abs() <= bound + 1e-5 * size + 1e-9,
                                    "{what} = {got}, float {float} ± {bound}"
                                );
                            } else {
                                assert!(
                                    (got - float).abs() <= 1e-5 * float_size + 1e-9,
                                    "{what} = {got}, the f32 product gives {float}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_non_finite_activation_makes_its_outputs_nan_and_zeros_stay_zero() {
        let mut rng = StdRng::seed_from_u64(3);
        let (n, k) = (8, 256);
        let (codes, scales) = weights(n, k, 4, 32, &mut rng);
        let w = Weights::new(&codes, &scales, n, k, 4, 32).unwrap();
        // Row by row (2) and in panels (GEMM_ROWS).
        for m in [2, GEMM_ROWS] {
            let mut x = vec![0f32; m * k];
            x[k + 40] = f32::INFINITY;
            for isa in Isa::available() {
                let mut y = vec![1f32; m * n];
                Activations::for_isa(&x, m, &w, isa).matmul_rows(&w, 0..n, &mut y);
                assert!(y[..n].iter().chain(&y[2 * n..]).all(|&v| v == 0.0), "{isa:?}, m {m}: {y:?}");
                assert!(y[n..2 * n].iter().all(|v| v.is_nan()), "{isa:?}, m {m}: {y:?}");
            }
        }
    }

    #[test]
    fn a_wrong_layout_is_named() {
        let e = Weights::new(&[0; 10], &[0.0; 2], 2, 64, 4, 32).unwrap_err();
        assert!(e.contains("need 64 code bytes and 4 scales, got 10 and 2"), "{e}");
        assert!(Weights::new(&[], &[], 0, 64, 3, 32).unwrap_err().contains("bits"));
        assert!(Weights::new(&[], &[], 0, 64, 4, 48).unwrap_err().contains("block"));
    }
}
