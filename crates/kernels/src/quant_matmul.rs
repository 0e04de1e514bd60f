//! `y = x · Wᵀ` for block-quantised weights: a decode step (M = 1), a batch of sequences or a
//! speculative verify (M up to 16), and prefill's hundreds of rows.
//!
//! The importer quantises each output row in blocks of `block` codes along K (`src/model/quant.rs`,
//! `MatMulNBits`'s codes: int8, or int4 two per byte with the even element in the low nibble,
//! offset by the midpoint 2^(bits−1), one f32 scale per row and block) and stores them packed in
//! **panels** of [`PANEL_ROWS`] rows ([`Weights::pack`]): per panel and block, steps of 64 bytes
//! that hold one 32-bit word of each of the 16 rows (4 int8 or 8 int4 codes), then the 16 rows'
//! scales. A word sits in a 32-bit lane of a vector, as `vpdpbusd` sums it, so one vector of
//! weights meets 4 (or 8) activation codes broadcast to every lane, each block's sums come out as
//! one vector of 16 rows to scale at once, and a panel is one sequential stream of bytes. Rows
//! laid out one after another instead (`MatMulNBits`'s order) cost a horizontal sum and a scale
//! per row and block: with four activation rows that arithmetic, not memory, set the pace
//! (benches/RESULTS.md, "Weights in panels").
//!
//! Decode reads every weight byte once per step and does little with it, so its speed is how fast
//! memory streams the weights. To keep the arithmetic below that, the activations are quantised
//! to int8 per block once per call ([`Activations`]), and the products are integer multiply-adds
//! (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`) into 32-bit lanes; one float multiply-add per
//! 16 rows and block remains. Each weight vector, once loaded, serves every activation row.
//!
//! Rounding: the activations' int8 rounding (half a step of `max|x| / 127` per block) is the only
//! error beyond the weights' own quantisation; ONNX Runtime's `MatMulNBits` at
//! `accuracy_level` 4 rounds its activations the same way.

use std::ops::Range;

use crate::gemm::gemm;
use crate::simd::{LANES, dispatch};

/// Largest magnitude of an activation code.
const X_MAX: f32 = 127.0;

/// Weight rows of one panel: the 32-bit lanes of an AVX-512 vector.
pub const PANEL_ROWS: usize = 16;

/// Bytes of one step of a panel: a 32-bit word of each of its rows.
const STEP_BYTES: usize = 4 * PANEL_ROWS;

/// From this many activation rows on (prefill), the VNNI kernel sums six rows per pass over the
/// weights instead of four, and without VNNI the product is an f32 GEMM on the weights
/// dequantised a few panels at a time ([`Activations::new`]): the integer sums without VNNI cost
/// more per product than f32 multiply-adds (on the 2-vCPU Xeon an AVX2 integer kernel, forced, ran
/// 1.8–3.8x behind ORT's `MatMulNBits` with its AVX-512 kernels at M = 64 and 512).
pub const GEMM_ROWS: usize = 16;

/// Panels the f32 path dequantises at a time: 64 rows of K = 12,288 are 3 MB.
const FLOAT_PANELS: usize = 4;

/// Which instructions compute the integer sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 with VNNI: `vpdpbusd`, 64 weight bytes per instruction.
    Vnni512,
    /// AVX2: `vpmaddubsw` then `vpmaddwd`, 32 weight bytes per pair.
    Avx2,
    /// Plain integer loops.
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
}

/// Block-quantised weights `[n, k]` packed in panels ([`Weights::pack`]), borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    packed: &'a [u8],
    n: usize,
    k: usize,
    bits: u32,
    block: usize,
}

impl<'a> Weights<'a> {
    /// Checks the packing's length: [`Weights::packed_len`] bytes.
    pub fn new(packed: &'a [u8], n: usize, k: usize, bits: u32, block: usize) -> Result<Self, String> {
        check(bits, block)?;
        let w = Weights { packed, n, k, bits, block };
        if packed.len() != w.panels() * w.panel_bytes() {
            return Err(format!(
                "{n}x{k} weights of {bits} bits in blocks of {block} pack into {} bytes, got {}",
                w.panels() * w.panel_bytes(),
                packed.len()
            ));
        }
        Ok(w)
    }

    /// Bytes [`Weights::pack`] makes of `[n, k]` weights.
    pub fn packed_len(n: usize, k: usize, bits: u32, block: usize) -> Result<usize, String> {
        check(bits, block)?;
        let w = Weights { packed: &[], n, k, bits, block };
        Ok(w.panels() * w.panel_bytes())
    }

    /// Packs weights in `MatMulNBits` layout (`codes [n, ⌈k/block⌉, block·bits/8]`, `scales [n ·
    /// ⌈k/block⌉]`) into panels, as the module documentation describes; rows past `n` in the
    /// last panel are zero (codes and scales), so their outputs are 0 and ignored.
    pub fn pack(codes: &[u8], scales: &[f32], n: usize, k: usize, bits: u32, block: usize) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; Self::packed_len(n, k, bits, block)?];
        let w = Weights { packed: &[], n, k, bits, block };
        let (blocks, blob) = (w.blocks(), block * bits as usize / 8);
        if codes.len() != n * blocks * blob || scales.len() != n * blocks {
            return Err(format!(
                "{n}x{k} weights in blocks of {block} need {} code bytes and {} scales, got {} and {}",
                n * blocks * blob,
                n * blocks,
                codes.len(),
                scales.len()
            ));
        }
        for (row, (codes, scales)) in codes.chunks_exact(blocks * blob).zip(scales.chunks_exact(blocks)).enumerate() {
            let (panel, lane) = (row / PANEL_ROWS, row % PANEL_ROWS);
            for (b, (codes, scale)) in codes.chunks_exact(blob).zip(scales).enumerate() {
                let at = panel * w.panel_bytes() + b * w.block_bytes();
                for (s, word) in codes.chunks_exact(4).enumerate() {
                    out[at + s * STEP_BYTES + 4 * lane..][..4].copy_from_slice(word);
                }
                out[at + w.block_codes() + 4 * lane..][..4].copy_from_slice(&scale.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Panels of [`PANEL_ROWS`] rows, the last one padded.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL_ROWS)
    }

    /// Bytes one panel of [`PANEL_ROWS`] rows reads: its codes and scales.
    pub fn panel_bytes(&self) -> usize {
        self.blocks() * self.block_bytes()
    }

    fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Code bytes of one block of a panel.
    fn block_codes(&self) -> usize {
        PANEL_ROWS * self.block * self.bits as usize / 8
    }

    /// Bytes of one block of a panel: its codes, then 16 scales.
    fn block_bytes(&self) -> usize {
        self.block_codes() + PANEL_ROWS * std::mem::size_of::<f32>()
    }

    /// Block `b` of panel `p`: its codes, and its 16 scales' bytes ([`lane_scale`]).
    fn panel_block(&self, p: usize, b: usize) -> (&'a [u8], &'a [u8]) {
        let at = p * self.panel_bytes() + b * self.block_bytes();
        self.packed[at..at + self.block_bytes()].split_at(self.block_codes())
    }

    fn mid(&self) -> i32 {
        1 << (self.bits - 1)
    }
}

/// Row `lane`'s scale among a panel block's scale bytes.
fn lane_scale(scales: &[u8], lane: usize) -> f32 {
    f32::from_le_bytes(scales[4 * lane..4 * lane + 4].try_into().expect("4 bytes"))
}

/// 4 or 8 bits, a block of 16 to 256 (a power of two: whole 32-bit words of codes).
fn check(bits: u32, block: usize) -> Result<(), String> {
    if bits != 4 && bits != 8 {
        return Err(format!("bits must be 4 or 8, not {bits}"));
    }
    if !block.is_power_of_two() || !(16..=256).contains(&block) {
        return Err(format!("block must be 16, 32, 64, 128 or 256, not {block}"));
    }
    Ok(())
}

/// The panels one call computes, in the order of its output's columns: a run of consecutive
/// panels (a whole matrix, or a thread's share of it), or a list of any (the panels of a
/// constrained head's allowed tokens, scattered over the vocabulary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panels<'p> {
    /// Panels `start..start + len`.
    Run { start: usize, len: usize },
    /// These panels.
    List(&'p [usize]),
}

impl<'p> Panels<'p> {
    pub fn len(&self) -> usize {
        match self {
            Panels::Run { len, .. } => *len,
            Panels::List(list) => list.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The panel at position `i` (its columns in the output are `16·i..16·(i + 1)`).
    pub fn at(&self, i: usize) -> usize {
        match self {
            Panels::Run { start, .. } => start + i,
            Panels::List(list) => list[i],
        }
    }

    /// Positions `r` of these panels.
    pub fn slice(&self, r: Range<usize>) -> Panels<'p> {
        match self {
            Panels::Run { start, len } => {
                assert!(r.start <= r.end && r.end <= *len, "positions {r:?} of {len}");
                Panels::Run { start: start + r.start, len: r.len() }
            }
            Panels::List(list) => Panels::List(&list[r]),
        }
    }

    /// Whether every panel is below `panels`.
    fn within(&self, panels: usize) -> bool {
        match self {
            Panels::Run { start, len } => start + len <= panels,
            Panels::List(list) => list.iter().all(|&p| p < panels),
        }
    }
}

impl From<Range<usize>> for Panels<'static> {
    fn from(r: Range<usize>) -> Self {
        Panels::Run { start: r.start, len: r.len() }
    }
}

impl<'p> From<&'p [usize]> for Panels<'p> {
    fn from(list: &'p [usize]) -> Self {
        Panels::List(list)
    }
}

/// Activation rows prepared for one call against weights of one shape.
pub struct Activations<'x> {
    isa: Isa,
    m: usize,
    held: Held<'x>,
}

/// What the kernels read of the activations.
enum Held<'x> {
    /// Int8 codes per block for the integer kernels.
    Codes {
        /// `[m, blocks·block]`, zero past K. For int4 weights each 8 codes are stored evens
        /// first, then odds: the order in which a word's low and high nibbles meet them.
        codes: Aligned<i8>,
        /// Scale per row and block, `[m, blocks]`.
        scales: Vec<f32>,
        /// Per row and block, −midpoint · Σ of its codes: the integer sum starts there, so that
        /// it ends as Σ (code − midpoint) · x.
        offsets: Vec<i32>,
    },
    /// The f32 path: `x [m, k]` as given.
    Floats {
        x: &'x [f32],
        /// Per row, whether it holds a NaN or an infinity: its outputs are NaN, as the integer
        /// paths make them (an f32 product could give ±∞ or a number instead).
        poisoned: Vec<bool>,
    },
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

/// The largest `|x|` of a block, NaN if any value is not finite. Computed as the largest bit
/// pattern with the sign cleared: for floats of one sign the patterns order as the values do, and
/// infinities and NaN lie above every finite one, so one integer maximum finds both.
#[inline(always)]
fn block_range_lanes<const FMA: bool>(x: &[f32]) -> f32 {
    let largest = block_magnitude(x);
    if largest >= f32::INFINITY.to_bits() { f32::NAN } else { f32::from_bits(largest) }
}

const MAGNITUDE: u32 = 0x7fff_ffff;

/// The largest of `x`'s bit patterns with the sign cleared. Written out in AVX-512 where the CPU
/// has it: the compiler vectorised the plain loop across the chunks of a block instead of within
/// one, and a block of 32 or 128 values has too few chunks for that, so most of it ran scalar
/// (quantising a row of K = 3584 took 2.4 µs; benches/RESULTS.md, "Where `QuantMatMul` spends
/// its time outside the sections").
#[inline(always)]
fn block_magnitude(x: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { block_magnitude_avx512(x) };
    }
    x.iter().map(|v| v.to_bits() & MAGNITUDE).max().unwrap_or(0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn block_magnitude_avx512(x: &[f32]) -> u32 {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi32(MAGNITUDE as i32);
    let mut top = _mm512_setzero_si512();
    let (chunks, tail) = x.as_chunks::<16>();
    for c in chunks {
        // SAFETY: `c` is 16 floats, 64 bytes, read unaligned.
        let v = unsafe { _mm512_loadu_si512(c.as_ptr().cast()) };
        top = _mm512_max_epu32(top, _mm512_and_si512(v, mask));
    }
    let largest = _mm512_reduce_max_epu32(top);
    tail.iter().map(|v| v.to_bits() & MAGNITUDE).fold(largest, u32::max)
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
    /// `dst` ← `src` with each 8 codes stored evens first, then odds: the order in which a word
    /// of int4 weights' low and high nibbles meets them.
    evens_then_odds(src: &[i8], dst: &mut [i8]) -> () = evens_then_odds_lanes
);

dispatch!(
    /// `sums[i]` ← Σ of `codes[i·block..(i+1)·block]`.
    block_sums(block: usize, codes: &[i8], sums: &mut [i32]) -> () = block_sums_lanes
);

dispatch!(
    /// Panel `p` of `w` as f32 rows `out [PANEL_ROWS, k]`.
    dequantise_panel(w: &Weights, p: usize, out: &mut [f32]) -> () = dequantise_panel_lanes
);

// The bodies work on arrays of a fixed length so that the compiler moves whole vectors: as
// slices, byte by byte, they took half the time of quantising a row. `FMA` is unused: `dispatch!`
// compiles them for each instruction set.
#[inline(always)]
fn evens_then_odds_lanes<const FMA: bool>(src: &[i8], dst: &mut [i8]) {
    assert!(src.len() == dst.len() && src.len().is_multiple_of(8), "whole groups of 8");
    for (d, s) in dst.as_chunks_mut::<8>().0.iter_mut().zip(src.as_chunks::<8>().0) {
        for t in 0..4 {
            d[t] = s[2 * t];
            d[4 + t] = s[2 * t + 1];
        }
    }
}

#[inline(always)]
fn block_sums_lanes<const FMA: bool>(block: usize, codes: &[i8], sums: &mut [i32]) {
    #[inline(always)]
    fn by<const B: usize>(codes: &[i8], sums: &mut [i32]) {
        for (s, c) in sums.iter_mut().zip(codes.as_chunks::<B>().0) {
            *s = c.iter().map(|&v| i32::from(v)).sum();
        }
    }
    assert_eq!(codes.len(), block * sums.len(), "whole blocks of {block}");
    match block {
        16 => by::<16>(codes, sums),
        32 => by::<32>(codes, sums),
        64 => by::<64>(codes, sums),
        128 => by::<128>(codes, sums),
        256 => by::<256>(codes, sums),
        _ => unreachable!("no block of {block}"),
    }
}

#[inline(always)]
fn dequantise_panel_lanes<const FMA: bool>(w: &Weights, p: usize, out: &mut [f32]) {
    let (mid, k) = (w.mid(), w.k);
    let per_word = 32 / w.bits as usize;
    for b in 0..w.blocks() {
        let (codes, scales) = w.panel_block(p, b);
        for (s, step) in codes.chunks_exact(STEP_BYTES).enumerate() {
            for (j, word) in step.chunks_exact(4).enumerate() {
                let scale = lane_scale(scales, j);
                let first = b * w.block + s * per_word;
                let row = &mut out[j * k..(j + 1) * k];
                for (t, &c) in word.iter().enumerate() {
                    let pair = if w.bits == 8 { [i32::from(c), 0] } else { [i32::from(c & 0x0f), i32::from(c >> 4)] };
                    for (e, &code) in pair[..per_word / 4].iter().enumerate() {
                        if let Some(o) = row.get_mut(first + t * per_word / 4 + e) {
                            *o = (code - mid) as f32 * scale;
                        }
                    }
                }
            }
        }
    }
}

impl<'x> Activations<'x> {
    /// Prepares `x [m, k]` for `w`, for the best ISA of this CPU.
    pub fn new(x: &'x [f32], m: usize, w: &Weights) -> Activations<'x> {
        Self::for_isa(x, m, w, Isa::detect())
    }

    /// [`Activations::new`] for a chosen ISA, which must be one of [`Isa::available`].
    pub fn for_isa(x: &'x [f32], m: usize, w: &Weights, isa: Isa) -> Activations<'x> {
        assert_eq!(x.len(), m * w.k, "x must be [m, k]");
        if m >= GEMM_ROWS && isa != Isa::Vnni512 {
            let poisoned = x.chunks_exact(w.k).map(|r| r.iter().any(|v| !v.is_finite())).collect();
            return Activations { isa, m, held: Held::Floats { x, poisoned } };
        }
        let (blocks, block) = (w.blocks(), w.block);
        let kp = blocks * block;
        let mut natural = vec![0i8; kp];
        let mut codes = Aligned::new(m * kp);
        let mut scales = vec![0f32; m * blocks];
        let mut offsets = vec![0i32; m * blocks];
        for r in 0..m {
            // The padding past k stays 0 (`natural` is only written below k).
            quantise_row(&x[r * w.k..(r + 1) * w.k], block, &mut natural[..w.k], &mut scales[r * blocks..(r + 1) * blocks]);
            let out = &mut codes[r * kp..(r + 1) * kp];
            if w.bits == 4 {
                evens_then_odds(&natural, out);
            } else {
                out.copy_from_slice(&natural);
            }
            let offsets = &mut offsets[r * blocks..(r + 1) * blocks];
            block_sums(block, &natural, offsets);
            offsets.iter_mut().for_each(|o| *o *= -w.mid());
        }
        Activations { isa, m, held: Held::Codes { codes, scales, offsets } }
    }

    /// Panels best given to one [`Activations::matmul_panels`] together: the f32 path dequantises
    /// [`FLOAT_PANELS`] at a time, the VNNI kernel streams prefill's panels in pairs.
    pub fn panel_grain(&self) -> usize {
        match self.held {
            Held::Floats { .. } => FLOAT_PANELS,
            Held::Codes { .. } if self.m >= GEMM_ROWS => 2,
            Held::Codes { .. } => 1,
        }
    }

    /// Output columns of `panels` (rows `16·p..16·(p + 1)` of `w` for each panel `p`, the last
    /// panel's padding included) of `y = x · wᵀ` into `out [m, 16·panels.len()]` (row-major),
    /// in the order of `panels`. `w` must be the weights these activations were prepared for.
    pub fn matmul_panels<'p>(&self, w: &Weights, panels: impl Into<Panels<'p>>, out: &mut [f32]) {
        let panels = panels.into();
        assert!(panels.within(w.panels()), "panels {panels:?} of {}", w.panels());
        assert_eq!(out.len(), self.m * PANEL_ROWS * panels.len(), "out must be [m, 16·panels]");
        match &self.held {
            Held::Floats { x, poisoned } => {
                assert_eq!(x.len(), self.m * w.k, "activations for other weights");
                float_product(x, self.m, w, panels, out);
                let width = PANEL_ROWS * panels.len();
                for (r, _) in poisoned.iter().enumerate().filter(|(_, p)| **p) {
                    out[r * width..(r + 1) * width].fill(f32::NAN);
                }
            }
            Held::Codes { codes, scales, offsets } => {
                assert_eq!(codes.len(), self.m * w.blocks() * w.block, "activations quantised for other weights");
                let ints = Ints { m: self.m, codes, scales, offsets };
                match self.isa {
                    // SAFETY: `for_isa` is only given an ISA of `Isa::available`, which this CPU
                    // has; the panels are in range and `out` is [m, 16·panels].
                    #[cfg(target_arch = "x86_64")]
                    Isa::Vnni512 => unsafe { vnni::panels(&ints, w, panels, out) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { avx2::panels(&ints, w, panels, out) },
                    _ => {
                        out.fill(0.0);
                        scalar_panels(&ints, w, panels, out)
                    }
                }
            }
        }
    }
}

/// The quantised activations as the integer kernels read them ([`Held::Codes`]).
struct Ints<'a> {
    m: usize,
    codes: &'a [i8],
    scales: &'a [f32],
    offsets: &'a [i32],
}

/// The f32 path of [`Activations::matmul_panels`]: [`FLOAT_PANELS`] panels at a time
/// dequantised, then one SGEMM of every activation row against them.
fn float_product(x: &[f32], m: usize, w: &Weights, panels: Panels, out: &mut [f32]) {
    let (width, k) = (PANEL_ROWS * panels.len(), w.k);
    let mut wf = vec![0f32; PANEL_ROWS * FLOAT_PANELS.min(panels.len()) * k];
    for first in (0..panels.len()).step_by(FLOAT_PANELS) {
        let count = (panels.len() - first).min(FLOAT_PANELS);
        let rows = PANEL_ROWS * count;
        for (p, dst) in wf[..rows * k].chunks_exact_mut(PANEL_ROWS * k).enumerate() {
            dequantise_panel(w, panels.at(first + p), dst);
        }
        // out[:, cols] = x · wfᵀ, wfᵀ read column by column from wf's rows.
        let col = PANEL_ROWS * first;
        gemm(m, k, rows, 1.0, x, k, 1, &wf, 1, k, 0.0, &mut out[col..], width);
    }
}

/// The integer sums without vector instructions, panel by panel and row by row.
fn scalar_panels(a: &Ints, w: &Weights, panels: Panels, out: &mut [f32]) {
    let (blocks, block, mid) = (w.blocks(), w.block, w.mid());
    let (kp, width) = (blocks * block, PANEL_ROWS * panels.len());
    let per_word = 32 / w.bits as usize;
    for (p, panel) in (0..panels.len()).map(|p| (p, panels.at(p))) {
        for b in 0..blocks {
            let (codes, scales) = w.panel_block(panel, b);
            for j in 0..PANEL_ROWS {
                let ws = lane_scale(scales, j);
                for r in 0..a.m {
                    let x = &a.codes[r * kp + b * block..r * kp + (b + 1) * block];
                    let sum: i32 = codes
                        .chunks_exact(STEP_BYTES)
                        .zip(x.chunks_exact(per_word))
                        .map(|(step, x)| {
                            let word = &step[4 * j..4 * j + 4];
                            if w.bits == 8 {
                                word.iter().zip(x).map(|(&c, &x)| (i32::from(c) - mid) * i32::from(x)).sum::<i32>()
                            } else {
                                // x holds the word's 4 evens, then its 4 odds.
                                (0..4)
                                    .map(|t| {
                                        (i32::from(word[t] & 0x0f) - mid) * i32::from(x[t])
                                            + (i32::from(word[t] >> 4) - mid) * i32::from(x[4 + t])
                                    })
                                    .sum()
                            }
                        })
                        .sum();
                    out[r * width + PANEL_ROWS * p + j] += sum as f32 * (ws * a.scales[r * blocks + b]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Aligned, GEMM_ROWS, Ints, PANEL_ROWS, Panels, STEP_BYTES, Weights};

    /// From this many activation rows on, int4 panels are unpacked once per call ([`unpacked`]):
    /// at 16 rows (three passes) unpacking cost the 0.8B qkv matrix 1.25x, at 64 it broke even,
    /// at 512 it gained 1.25x.
    const UNPACK_ROWS: usize = 64;

    /// How far ahead in each panel to prefetch.
    const PREFETCH: usize = 1024;

    /// Panels `panels` for every activation row, into `out [m, 16·panels.len()]`.
    ///
    /// `R` panels at a time, each activation code broadcast once serving them all, the `R` taken
    /// from as many evenly spaced places of `panels`, so that memory sees `R` sequential streams
    /// (one stream per thread left memory idle: M = 1 ran 1.1-1.35x slower than from four places,
    /// benches/RESULTS.md, "Weights in panels"); then the activation rows `MR` at a time while
    /// the panels are in L1 or L2. Accumulators: `R · MR` float vectors and as many or twice as
    /// many integer ones (the second set halves the chain of dependent `vpdpbusd`, which bounds
    /// one or two rows), within the 32 vector registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) unsafe fn panels(a: &Ints, w: &Weights, panels: Panels, out: &mut [f32]) {
        // SAFETY (all): the caller checked the CPU's features, the panels and `out`.
        unsafe {
            match (a.m, w.bits == 4) {
                (1, true) => streams::<4, 1, true>(a, w, panels, out),
                (1, false) => streams::<4, 1, false>(a, w, panels, out),
                (2, true) => streams::<4, 2, true>(a, w, panels, out),
                (2, false) => streams::<4, 2, false>(a, w, panels, out),
                (m, true) if m < GEMM_ROWS => streams::<2, 4, true>(a, w, panels, out),
                (m, false) if m < GEMM_ROWS => streams::<2, 4, false>(a, w, panels, out),
                (m, true) if m < UNPACK_ROWS => streams::<2, 6, true>(a, w, panels, out),
                (_, true) => unpacked(a, w, panels, out),
                (_, false) => streams::<2, 6, false>(a, w, panels, out),
            }
        }
    }

    /// Prefill on int4 panels: each pair of panels unpacked once to int8 panels (low nibbles as
    /// one step, high nibbles as the next, matching the activations' evens-then-odds order), then
    /// summed as int8 by every pass of six activation rows. Unpacking in each pass instead made
    /// M = 512 1.15-1.3x slower (0.8B shapes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    unsafe fn unpacked(a: &Ints, w: &Weights, panels: Panels, out: &mut [f32]) {
        // The layout the scratch's panels have: int8 codes of the same blocks.
        let int8 = Weights { packed: &[], n: PANEL_ROWS, k: w.k, bits: 8, block: w.block };
        let bytes = int8.panel_bytes();
        let mut scratch = Aligned::<u8>::new(2 * bytes);
        let nib = _mm512_set1_epi8(0x0f);
        for pair in (0..panels.len()).step_by(2) {
            let count = (panels.len() - pair).min(2);
            for p in 0..count {
                // SAFETY: the reads lie within panel `panels.at(pair + p)` of `w`, the writes
                // within the scratch's `p`th panel (twice the code bytes, the same scales); the
                // caller checked the CPU's features.
                unsafe {
                    let src = w.packed.as_ptr().add(panels.at(pair + p) * w.panel_bytes());
                    let dst = scratch.as_mut_ptr().add(p * bytes);
                    for b in 0..w.blocks() {
                        let (src, dst) = (src.add(b * w.block_bytes()), dst.add(b * int8.block_bytes()));
                        for s in 0..w.block_codes() / STEP_BYTES {
                            let v = _mm512_loadu_si512(src.add(s * STEP_BYTES).cast());
                            _mm512_storeu_si512(dst.add(2 * s * STEP_BYTES).cast(), _mm512_and_si512(v, nib));
                            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                            _mm512_storeu_si512(dst.add((2 * s + 1) * STEP_BYTES).cast(), hi);
                        }
                        let scales = _mm512_loadu_si512(src.add(w.block_codes()).cast());
                        _mm512_storeu_si512(dst.add(int8.block_codes()).cast(), scales);
                    }
                }
            }
            let w8 = Weights { packed: &scratch[..count * bytes], n: count * PANEL_ROWS, ..int8 };
            // SAFETY: as for `panels`; the scratch's panels land in columns of `pair`.
            unsafe {
                if count == 2 {
                    rows::<2, 6, false>(a, &w8, [0, 1], [pair, pair + 1], out);
                } else {
                    rows::<1, 6, false>(a, &w8, [0], [pair], out);
                }
            }
        }
    }

    /// [`panels`] with `R` streams and up to `MR` activation rows a pass; the panels left over
    /// after the multiple of `R` go one at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    unsafe fn streams<const R: usize, const MR: usize, const INT4: bool>(a: &Ints, w: &Weights, panels: Panels, out: &mut [f32]) {
        let per_stream = panels.len() / R;
        for i in 0..per_stream {
            let cols: [usize; R] = std::array::from_fn(|r| r * per_stream + i);
            // SAFETY: as for `panels`.
            unsafe { rows::<R, MR, INT4>(a, w, cols.map(|c| panels.at(c)), cols, out) };
        }
        for c in R * per_stream..panels.len() {
            // SAFETY: as for `panels`.
            unsafe { rows::<1, MR, INT4>(a, w, [panels.at(c)], [c], out) };
        }
    }

    /// Panels `ps` for every activation row into `out`'s panels of columns `cols`, `MR` rows a
    /// pass (the last pass fewer).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn rows<const R: usize, const MR: usize, const INT4: bool>(
        a: &Ints,
        w: &Weights,
        ps: [usize; R],
        cols: [usize; R],
        out: &mut [f32],
    ) {
        let mut m0 = 0;
        while m0 < a.m {
            let at = At { ps, cols, m0 };
            // SAFETY: as for `panels`.
            unsafe {
                match (a.m - m0).min(MR) {
                    1 => pass::<R, 1, INT4>(a, w, &at, out),
                    2 => pass::<R, 2, INT4>(a, w, &at, out),
                    3 => pass::<R, 3, INT4>(a, w, &at, out),
                    4 => pass::<R, 4, INT4>(a, w, &at, out),
                    5 => pass::<R, 5, INT4>(a, w, &at, out),
                    _ => pass::<R, 6, INT4>(a, w, &at, out),
                }
            }
            m0 += MR;
        }
    }

    /// Where one [`pass`] reads and writes.
    struct At<const R: usize> {
        /// The panels.
        ps: [usize; R],
        /// Their columns in `out`, in panels.
        cols: [usize; R],
        /// The first activation row.
        m0: usize,
    }

    /// Activation rows `m0..m0 + MR` against panels `ps`, into columns `cols` of `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn pass<const R: usize, const MR: usize, const INT4: bool>(a: &Ints, w: &Weights, at: &At<R>, out: &mut [f32]) {
        // Two sets of integer sums where they fit the registers beside the floats.
        let split = R * MR <= 8;
        let (blocks, block) = (w.blocks(), w.block);
        let kp = blocks * block;
        let width = out.len() / a.m;
        // SAFETY: the activation rows `m0..m0 + MR` exist (codes [m, kp], scales and offsets [m,
        // blocks]); every panel read lies within `w.packed` ([panels, blocks, block_bytes]);
        // the stores within `out`'s rows `m0..m0 + MR`, columns of `ps`; the caller checked the
        // CPU's features.
        unsafe {
            let nib = _mm512_set1_epi8(0x0f);
            let base: [*const u8; R] = std::array::from_fn(|r| w.packed.as_ptr().add(at.ps[r] * w.panel_bytes()));
            let xp: [*const i8; MR] = std::array::from_fn(|i| a.codes.as_ptr().add((at.m0 + i) * kp));
            let mut acc = [[_mm512_setzero_ps(); MR]; R];
            for b in 0..blocks {
                let off: [__m512i; MR] = std::array::from_fn(|i| _mm512_set1_epi32(a.offsets[(at.m0 + i) * blocks + b]));
                let mut isum = [off; R];
                let mut other = [[_mm512_setzero_si512(); MR]; R];
                let bp: [*const u8; R] = std::array::from_fn(|r| base[r].add(b * w.block_bytes()));
                let x0 = b * block;
                if INT4 {
                    for s in 0..block / 8 {
                        let evens: [__m512i; MR] = std::array::from_fn(|i| broadcast(xp[i].add(x0 + 8 * s)));
                        let odds: [__m512i; MR] = std::array::from_fn(|i| broadcast(xp[i].add(x0 + 8 * s + 4)));
                        for r in 0..R {
                            _mm_prefetch::<_MM_HINT_T0>(bp[r].add(s * STEP_BYTES + PREFETCH).cast());
                            let wv = _mm512_loadu_si512(bp[r].add(s * STEP_BYTES).cast());
                            let lo = _mm512_and_si512(wv, nib);
                            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), nib);
                            for i in 0..MR {
                                isum[r][i] = _mm512_dpbusd_epi32(isum[r][i], lo, evens[i]);
                                if split {
                                    other[r][i] = _mm512_dpbusd_epi32(other[r][i], hi, odds[i]);
                                } else {
                                    isum[r][i] = _mm512_dpbusd_epi32(isum[r][i], hi, odds[i]);
                                }
                            }
                        }
                    }
                } else {
                    for s in 0..block / 4 {
                        let x: [__m512i; MR] = std::array::from_fn(|i| broadcast(xp[i].add(x0 + 4 * s)));
                        for r in 0..R {
                            _mm_prefetch::<_MM_HINT_T0>(bp[r].add(s * STEP_BYTES + PREFETCH).cast());
                            let wv = _mm512_loadu_si512(bp[r].add(s * STEP_BYTES).cast());
                            for i in 0..MR {
                                if split && s % 2 == 1 {
                                    other[r][i] = _mm512_dpbusd_epi32(other[r][i], wv, x[i]);
                                } else {
                                    isum[r][i] = _mm512_dpbusd_epi32(isum[r][i], wv, x[i]);
                                }
                            }
                        }
                    }
                }
                let xs: [__m512; MR] = std::array::from_fn(|i| _mm512_set1_ps(a.scales[(at.m0 + i) * blocks + b]));
                for r in 0..R {
                    let ws = _mm512_loadu_ps(bp[r].add(w.block_codes()).cast());
                    for i in 0..MR {
                        let sum = if split { _mm512_add_epi32(isum[r][i], other[r][i]) } else { isum[r][i] };
                        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(ws, xs[i]), acc[r][i]);
                    }
                }
            }
            for (&col, acc) in at.cols.iter().zip(&acc) {
                for (i, &v) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add((at.m0 + i) * width + col * PANEL_ROWS), v);
                }
            }
        }
    }

    /// Four activation codes in every 32-bit lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[inline]
    unsafe fn broadcast(x: *const i8) -> __m512i {
        // SAFETY: the caller passes 4 readable bytes.
        _mm512_set1_epi32(unsafe { x.cast::<i32>().read_unaligned() })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Ints, PANEL_ROWS, Panels, STEP_BYTES, Weights};

    /// Rows of a panel in one 8-lane vector: each panel is two halves.
    const HALF: usize = 8;

    /// Panels `panels` for every activation row, into `out [m, 16·panels.len()]`: one panel at a
    /// time, two activation rows a pass (16 vector registers hold the two halves' integer and
    /// float accumulators of two rows, beside the weights and the broadcast codes).
    ///
    /// u8 · i8 pairs into i16 (`vpmaddubsw`, which saturates, so int8 weights go in signed with
    /// the sign of x moved onto them, int4 ones as their unsigned nibbles), then pairs of those
    /// into i32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panels(a: &Ints, w: &Weights, panels: Panels, out: &mut [f32]) {
        for col in 0..panels.len() {
            let p = panels.at(col);
            let mut m0 = 0;
            while m0 < a.m {
                // SAFETY: the caller checked the CPU's features, the panels and `out`.
                unsafe {
                    match (a.m - m0 >= 2, w.bits == 4) {
                        (true, true) => pass::<2, true>(a, w, p, col, m0, out),
                        (true, false) => pass::<2, false>(a, w, p, col, m0, out),
                        (false, true) => pass::<1, true>(a, w, p, col, m0, out),
                        (false, false) => pass::<1, false>(a, w, p, col, m0, out),
                    }
                }
                m0 += 2;
            }
        }
    }

    /// Activation rows `m0..m0 + MR` against panel `p`, into `out`'s panel of columns `col`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn pass<const MR: usize, const INT4: bool>(a: &Ints, w: &Weights, p: usize, col: usize, m0: usize, out: &mut [f32]) {
        let (blocks, block) = (w.blocks(), w.block);
        let kp = blocks * block;
        let width = out.len() / a.m;
        // SAFETY: as for the AVX-512 variant.
        unsafe {
            let nib = _mm256_set1_epi8(0x0f);
            let flip = _mm256_set1_epi8(-128);
            let ones = _mm256_set1_epi16(1);
            let base = w.packed.as_ptr().add(p * w.panel_bytes());
            let xp: [*const i8; MR] = std::array::from_fn(|i| a.codes.as_ptr().add((m0 + i) * kp));
            let x4 = |i: usize, at: usize| _mm256_set1_epi32(xp[i].add(at).cast::<i32>().read_unaligned());
            let mut acc = [[_mm256_setzero_ps(); MR]; 2];
            for b in 0..blocks {
                let bp = base.add(b * w.block_bytes());
                // int8 sums (code − 128) · x directly; int4 starts at −8 · Σ x.
                let mut isum: [[__m256i; MR]; 2] = if INT4 {
                    [std::array::from_fn(|i| _mm256_set1_epi32(a.offsets[(m0 + i) * blocks + b])); 2]
                } else {
                    [[_mm256_setzero_si256(); MR]; 2]
                };
                let x0 = b * block;
                if INT4 {
                    for s in 0..block / 8 {
                        let evens: [__m256i; MR] = std::array::from_fn(|i| x4(i, x0 + 8 * s));
                        let odds: [__m256i; MR] = std::array::from_fn(|i| x4(i, x0 + 8 * s + 4));
                        for (h, isum) in isum.iter_mut().enumerate() {
                            let wv = _mm256_loadu_si256(bp.add(s * STEP_BYTES + h * 32).cast());
                            let lo = _mm256_and_si256(wv, nib);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), nib);
                            for i in 0..MR {
                                // At most 2 · 2 · 15 · 127 per i16: no saturation.
                                let pairs =
                                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, evens[i]), _mm256_maddubs_epi16(hi, odds[i]));
                                isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                } else {
                    for s in 0..block / 4 {
                        let x: [__m256i; MR] = std::array::from_fn(|i| x4(i, x0 + 4 * s));
                        let ax: [__m256i; MR] = std::array::from_fn(|i| _mm256_abs_epi8(x[i]));
                        for (h, isum) in isum.iter_mut().enumerate() {
                            // code − 128 as i8.
                            let signed = _mm256_xor_si256(_mm256_loadu_si256(bp.add(s * STEP_BYTES + h * 32).cast()), flip);
                            for i in 0..MR {
                                let pairs = _mm256_maddubs_epi16(ax[i], _mm256_sign_epi8(signed, x[i]));
                                isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                }
                for h in 0..2 {
                    let ws = _mm256_loadu_ps(bp.add(w.block_codes() + h * 4 * HALF).cast());
                    for i in 0..MR {
                        let xs = _mm256_set1_ps(a.scales[(m0 + i) * blocks + b]);
                        acc[h][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h][i]), _mm256_mul_ps(ws, xs), acc[h][i]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (i, &v) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add((m0 + i) * width + col * PANEL_ROWS + h * HALF), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// `MatMulNBits` layout: random codes (1..=2^bits − 1, as the importer's symmetric rounding
    /// writes them) and scales.
    struct Rows {
        codes: Vec<u8>,
        scales: Vec<f32>,
        n: usize,
        k: usize,
        bits: u32,
        block: usize,
    }

    impl Rows {
        fn random(n: usize, k: usize, bits: u32, block: usize, rng: &mut StdRng) -> Rows {
            let blocks = k.div_ceil(block);
            let top = (1u16 << bits) - 1;
            let codes: Vec<u8> = (0..n * blocks * block)
                .map(|_| rng.random_range(1..=top) as u8)
                .collect::<Vec<_>>()
                .chunks(8 / bits as usize)
                .map(|c| if bits == 8 { c[0] } else { c[0] | c[1] << 4 })
                .collect();
            let scales = (0..n * blocks).map(|_| rng.random_range(0.001f32..0.05)).collect();
            Rows { codes, scales, n, k, bits, block }
        }

        fn packed(&self) -> Vec<u8> {
            Weights::pack(&self.codes, &self.scales, self.n, self.k, self.bits, self.block).unwrap()
        }

        /// Code of row `n`, element `e`, less the midpoint.
        fn code(&self, n: usize, e: usize) -> i32 {
            let at = n * self.k.div_ceil(self.block) * self.block + e;
            let c = if self.bits == 8 { self.codes[at] } else { (self.codes[at / 2] >> (at % 2 * 4)) & 0x0f };
            i32::from(c) - (1 << (self.bits - 1))
        }
    }

    /// Per output, in f64: the sum the integer paths must reproduce (the same int8 activations),
    /// its scale (Σ |terms|), the float product of the dequantised weights with x (what the f32
    /// path must reproduce), the most the activations' rounding may move the result from that
    /// product, and the float product's scale.
    fn reference(x: &[f32], m: usize, w: &Rows) -> Vec<[f64; 5]> {
        let (block, blocks) = (w.block, w.k.div_ceil(w.block));
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
                        let c = w.code(n, b * block + j) as f64;
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
        // k: whole blocks, and a last block cut short.
        for (bits, block, k) in [4u32, 8].into_iter().flat_map(|b| {
            [16usize, 32, 64, 128, 256].into_iter().flat_map(move |s| [(b, s, 1024), (b, s, 3 * s + 512), (b, s, 200)])
        }) {
            // 10 panels, the last of 6 rows: 8 in 4 streams and 2 alone, or 4 pairs and 2 alone.
            let n = 9 * PANEL_ROWS + 6;
            let rows = Rows::random(n, k, bits, block, &mut rng);
            let packed = rows.packed();
            let w = Weights::new(&packed, n, k, bits, block).unwrap();
            // Up to 16 rows 1, 2 or 4 at a time, from 16 on 6 at a time (6 + 6 + 4, 6 + 6 + 6 + 5),
            // int4 from 64 on unpacked first; or in f32.
            for m in [1, 2, 3, 4, 7, 16, 23, 67] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2f32..2.0)).collect();
                let want = reference(&x, m, &rows);
                for &isa in &isas {
                    let a = Activations::for_isa(&x, m, &w, isa);
                    // Runs, and lists: scattered panels (the padded last among them) for
                    // streams of single panels, one panel, and every panel backwards.
                    let backwards: Vec<usize> = (0..w.panels()).rev().collect();
                    for panels in [
                        Panels::from(0..w.panels()),
                        Panels::from(1..w.panels()),
                        Panels::List(&[9, 0, 3, 4, 7, 2]),
                        Panels::List(&[5]),
                        Panels::List(&backwards),
                    ] {
                        let width = PANEL_ROWS * panels.len();
                        let mut y = vec![f32::NAN; m * width];
                        a.matmul_panels(&w, panels, &mut y);
                        for r in 0..m {
                            for j in 0..width {
                                let nn = PANEL_ROWS * panels.at(j / PANEL_ROWS) + j % PANEL_ROWS;
                                let got = y[r * width + j] as f64;
                                let Some(&[exact, size, float, bound, float_size]) = want.get(r * n + nn).filter(|_| nn < n)
                                else {
                                    assert_eq!(got, 0.0, "padding row {nn} of {n}");
                                    continue;
                                };
                                let what = format!("{isa:?}, {bits} bits, block {block}, k {k}, m {m}: y[{r}, {nn}]");
                                if let Held::Floats { .. } = a.held {
                                    assert!(
                                        (got - float).abs() <= 1e-5 * float_size + 1e-9,
                                        "{what} = {got}, the f32 product gives {float}"
                                    );
                                } else {
                                    assert!(
                                        (got - exact).abs() <= 1e-5 * size + 1e-9,
                                        "{what} = {got}, the integer sums give {exact}"
                                    );
                                    assert!(
                                        (got - float).abs() <= bound + 1e-5 * size + 1e-9,
                                        "{what} = {got}, float {float} ± {bound}"
                                    );
                                }
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
        let packed = Rows::random(n, k, 4, 32, &mut rng).packed();
        let w = Weights::new(&packed, n, k, 4, 32).unwrap();
        // Integer (2) and, without VNNI, f32 (GEMM_ROWS).
        for m in [2, GEMM_ROWS] {
            let mut x = vec![0f32; m * k];
            x[k + 40] = f32::INFINITY;
            for isa in Isa::available() {
                let mut y = vec![1f32; m * PANEL_ROWS];
                Activations::for_isa(&x, m, &w, isa).matmul_panels(&w, 0..1, &mut y);
                let row = |r: usize| &y[r * PANEL_ROWS..r * PANEL_ROWS + n];
                assert!((0..m).filter(|&r| r != 1).all(|r| row(r).iter().all(|&v| v == 0.0)), "{isa:?}, m {m}: {y:?}");
                assert!(row(1).iter().all(|v| v.is_nan()), "{isa:?}, m {m}: {y:?}");
            }
        }
    }

    #[test]
    fn block_range_is_the_largest_magnitude_and_nan_for_any_non_finite() {
        let mut rng = StdRng::seed_from_u64(9);
        for len in [0, 1, 15, 16, 17, 32, 128, 200] {
            let x: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let want = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(block_range_lanes::<true>(&x).to_bits(), want.to_bits(), "len {len}");
            assert_eq!(block_range_lanes::<true>(&vec![-0.0; len]).to_bits(), 0, "len {len}: -0 is 0");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                for at in [0, len / 2, len.saturating_sub(1)].into_iter().filter(|&at| at < len) {
                    let mut y = x.clone();
                    y[at] = bad;
                    assert!(block_range_lanes::<true>(&y).is_nan(), "len {len}, {bad} at {at}");
                }
            }
        }
    }

    #[test]
    fn packing_keeps_each_rows_codes_and_scales() {
        let mut rng = StdRng::seed_from_u64(5);
        for (bits, block, k) in [(4, 32, 200), (8, 16, 64), (4, 256, 256)] {
            let n = PANEL_ROWS + 3;
            let rows = Rows::random(n, k, bits, block, &mut rng);
            let packed = rows.packed();
            let w = Weights::new(&packed, n, k, bits, block).unwrap();
            let mut wf = vec![f32::NAN; PANEL_ROWS * k];
            for p in 0..w.panels() {
                dequantise_panel(&w, p, &mut wf);
                for j in 0..PANEL_ROWS {
                    let row = PANEL_ROWS * p + j;
                    for e in 0..k {
                        let want = if row < n {
                            rows.code(row, e) as f32 * rows.scales[row * k.div_ceil(block) + e / block]
                        } else {
                            0.0
                        };
                        assert_eq!(wf[j * k + e], want, "{bits} bits, block {block}: row {row}, element {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_wrong_layout_is_named() {
        let e = Weights::new(&[0; 10], 2, 64, 4, 32).unwrap_err();
        assert!(e.contains("pack into 640 bytes, got 10"), "{e}");
        let e = Weights::pack(&[0; 10], &[0.0; 2], 2, 64, 4, 32).unwrap_err();
        assert!(e.contains("need 64 code bytes and 4 scales, got 10 and 2"), "{e}");
        assert!(Weights::new(&[], 0, 64, 3, 32).unwrap_err().contains("bits"));
        assert!(Weights::new(&[], 0, 64, 4, 48).unwrap_err().contains("block"));
        // Checked before any size is computed from it.
        assert!(Weights::pack(&[], &[], 0, 64, 4, 0).unwrap_err().contains("block"));
    }
}
