//! What the kernels share below the GEMMs: a dot product, a row update and a vectorised exp,
//! each compiled for AVX-512, for AVX2 + FMA and for the baseline and picked at run time (the
//! `dispatch!` macro, so one binary serves every x86-64 server), and the subnormal flush
//! ([`FlushDenormals`]).

/// Independent accumulators of [`dot_lanes`]: two AVX registers, so consecutive multiply-adds do not
/// wait on each other's latency. Floats are not reassociated by the compiler, so the lanes have
/// to be written out for it to vectorise the reduction.
pub(crate) const LANES: usize = 16;

/// `a · b + c`, fused where the variant was compiled with FMA (one rounding, twice the rate).
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `a · b` over the shorter of the two. A body for [`dispatch!`]: the callers' loops are
/// dispatched as a whole, so this inlines into them instead of costing a feature check per call.
#[inline(always)]
pub(crate) fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    sum_lanes(&acc) + tail
}

/// `a · b + c` lane by lane.
#[inline(always)]
pub(crate) fn madd_lanes<const FMA: bool>(a: &[f32; LANES], b: &[f32; LANES], c: &[f32; LANES]) -> [f32; LANES] {
    std::array::from_fn(|l| madd::<FMA>(a[l], b[l], c[l]))
}

/// The sum of the lanes, added pairwise (log₂ 16 dependent vector adds instead of 15 scalar
/// ones: floats are not reassociated, so the tree has to be written out).
#[inline(always)]
pub(crate) fn sum_lanes(a: &[f32; LANES]) -> f32 {
    let mut s = *a;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            s[l] += s[l + width];
        }
        width /= 2;
    }
    s[0]
}

/// `e^x` to about one ulp, in straight-line arithmetic the compiler vectorises (libm's `expf` is
/// a call per element, which was a tenth of a long-context prefill).
///
/// `x = n·ln2 + r` with `|r| ≤ ln2/2`; `e^r` by its Taylor series to degree 7 (truncation below
/// 1e-8 relative); `2^n` built in the exponent bits. Below −87.33 the result is under f32's
/// smallest normal and is returned as 0; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_lane<const FMA: bool>(x: f32) -> f32 {
    const LO: f32 = -87.33;
    const HI: f32 = 88.722_83;
    // Adding then subtracting 1.5·2^23 rounds to the nearest integer without a rounding
    // instruction (none in baseline x86-64).
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split so that n · LN2_HI is exact for every n in range (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // NaN stays NaN through clamp.
    let c = x.clamp(LO, HI);
    let shifted = c * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, c));
    let mut p = 1.0 / 5040.0;
    for k in [720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
        p = madd::<FMA>(p, r, 1.0 / k);
    }
    // The integer n sits in the low mantissa bits of `shifted` (ROUND's exponent makes one unit
    // of the last place 1): reading it there keeps the lane in vector registers, where `n as i32`
    // (saturating, NaN to 0) was compiled to a scalar conversion per lane, half of the exp's time.
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    // n ∈ [−126, 128]; 2^n as two factors so n = 128 (e^x just below f32::MAX) does not overflow.
    let half = n / 2;
    let y = p * f32::from_bits(((half + 127) as u32) << 23) * f32::from_bits(((n - half + 127) as u32) << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `x · σ(x)` (SiLU) through [`exp_lane`], so that a loop of it vectorises; −0 far below zero,
/// `x` far above.
#[inline(always)]
pub(crate) fn silu_lane<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp_lane::<FMA>(-x))
}

#[inline(always)]
fn exp_sub_lanes<const FMA: bool>(x: &mut [f32], m: f32) {
    for v in x {
        *v = exp_lane::<FMA>(*v - m);
    }
}

#[inline(always)]
fn exp_sub_sum_lanes<const FMA: bool>(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_lane::<FMA>(c[l] - m);
            acc[l] += c[l];
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_lane::<FMA>(*v - m);
        tail += *v;
    }
    sum_lanes(&acc) + tail
}

/// Defines `$vis fn $name` over `$body::<FMA>`, compiled three times, for the baseline, for AVX2
/// with FMA and for AVX-512 (twice the lanes per instruction), and picks one at run time, so one
/// binary serves every x86-64 server. The body must be `#[inline(always)]` so that it is compiled
/// into each variant.
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fused($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above; every such CPU has AVX2 and FMA.
                    return unsafe { wide($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { fused($($arg),*) };
                }
            }
            $body::<false>($($arg),*)
        }
    };
}

pub(crate) use dispatch;

dispatch!(
    /// `x ← e^(x − m)` element-wise.
    pub exp_sub(x: &mut [f32], m: f32) -> () = exp_sub_lanes
);
dispatch!(
    /// `x ← e^(x − m)` element-wise; returns the sum of the results (a softmax's denominator).
    pub exp_sub_sum(x: &mut [f32], m: f32) -> f32 = exp_sub_sum_lanes
);

dispatch!(
    /// `out = x · rsqrt(mean(x²) + epsilon) · scale` (RMSNorm of one row), over the shortest of
    /// the four; the sum of squares in f32 lanes.
    pub rms_norm(x: &[f32], scale: &[f32], epsilon: f32, out: &mut [f32]) -> () = rms_norm_lanes
);

#[inline(always)]
fn rms_norm_lanes<const FMA: bool>(x: &[f32], scale: &[f32], epsilon: f32, out: &mut [f32]) {
    let inv = 1.0 / (dot_lanes::<FMA>(x, x) / x.len() as f32 + epsilon).sqrt();
    for ((o, &v), &s) in out.iter_mut().zip(x).zip(scale) {
        *o = v * inv * s;
    }
}

dispatch!(
    /// `out = silu(gate) · up` element-wise (SwiGLU), over the shortest of the three.
    pub swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> () = swiglu_lanes
);

#[inline(always)]
fn swiglu_lanes<const FMA: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_lane::<FMA>(g) * u;
    }
}

dispatch!(
    /// `out ← out · σ(gate)` element-wise (an output gate), over the shorter of the two.
    pub sigmoid_gate(gate: &[f32], out: &mut [f32]) -> () = sigmoid_gate_lanes
);

#[inline(always)]
fn sigmoid_gate_lanes<const FMA: bool>(gate: &[f32], out: &mut [f32]) {
    for (o, &g) in out.iter_mut().zip(gate) {
        *o /= 1.0 + exp_lane::<FMA>(-g);
    }
}

dispatch!(
    /// Widens bf16 values, given as their bit patterns, into `dst`: a bf16 is the upper half of
    /// an f32, so this is a shift the compiler vectorises (`half`'s slice conversion was a fifth
    /// of a decode step at 4K of context, called once per cached key and value).
    pub widen_bf16(src: &[u16], dst: &mut [f32]) -> () = widen_bf16_lanes
);

#[inline(always)]
fn widen_bf16_lanes<const FMA: bool>(src: &[u16], dst: &mut [f32]) {
    for (o, &x) in dst.iter_mut().zip(src) {
        *o = f32::from_bits(u32::from(x) << 16);
    }
}

/// `dst ← src` with stores that bypass the caches where the CPU has them (x86-64's `movntps`,
/// for a 16-byte aligned `dst`), for data no one reads again soon: an ordinary store first reads
/// the line it writes. Call [`stream_fence`] before the data is handed on.
#[inline(always)]
pub(crate) fn stream_copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "stream_copy of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if dst.as_ptr().align_offset(16) == 0 {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        let mut d = dst.chunks_exact_mut(4);
        let mut s = src.chunks_exact(4);
        for (d, s) in (&mut d).zip(&mut s) {
            // SAFETY: SSE is part of x86-64; `d` is 4 floats at a 16-byte boundary (dst is, and
            // every chunk is 16 bytes on), `s` 4 readable floats.
            unsafe { _mm_stream_ps(d.as_mut_ptr(), _mm_loadu_ps(s.as_ptr())) };
        }
        d.into_remainder().copy_from_slice(s.remainder());
        return;
    }
    dst.copy_from_slice(src);
}

/// Orders the [`stream_copy`] stores before every later store of this thread, so that whoever
/// is handed the data next sees it.
#[inline(always)]
pub(crate) fn stream_fence() {
    // SAFETY: SSE is part of x86-64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Flush-to-zero and denormals-are-zero on this thread while alive, restored on drop.
///
/// The DeltaNet rule multiplies by decays `e^{c_i − c_j}` that reach 1e-38 under strong gating:
/// x86 computes with such subnormal numbers in microcode, about 100× slower, which made the rule
/// 4× slower inside the whole model than on the benchmark's inputs. Flushing them changes results
/// by less than 1e-38 absolute.
pub struct FlushDenormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
    /// Not `Send`: the control word belongs to the thread that set it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl FlushDenormals {
    /// FTZ (bit 15) and DAZ (bit 6) of MXCSR.
    #[cfg(target_arch = "x86_64")]
    const BITS: u32 = 0x8040;

    /// Sets the flags, keeping the previous control word to restore.
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let mut saved = 0u32;
            let flushed: u32;
            // SAFETY: stmxcsr/ldmxcsr read and write this thread's SSE control word only; the
            // value written differs from the current one in the FTZ and DAZ bits alone.
            unsafe {
                std::arch::asm!("stmxcsr [{}]", in(reg) &mut saved, options(nostack, preserves_flags));
                flushed = saved | Self::BITS;
                // Not `readonly`: the compiler must not move the kernel's loads above this.
                std::arch::asm!("ldmxcsr [{}]", in(reg) &flushed, options(nostack, preserves_flags));
            }
            Self { saved, _thread: std::marker::PhantomData }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self { _thread: std::marker::PhantomData }
    }
}

impl Default for FlushDenormals {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: restores the control word read in `new`, on the same thread (the guard is not Send).
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &self.saved, options(nostack, preserves_flags));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_loop_at_every_tail_length() {
        for (n, fma) in [0, 1, 15, 16, 17, 33, 256].into_iter().flat_map(|n| [(n, false), (n, true)]) {
            let dot = if fma { dot_lanes::<true> as fn(&[f32], &[f32]) -> f32 } else { dot_lanes::<false> };
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "dot, n = {n}");
        }
    }

    #[test]
    fn rms_norm_swiglu_and_the_sigmoid_gate_match_their_formulas_in_f64() {
        for n in [1, 15, 16, 17, 1000, 1024] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0 + 0.5).collect();
            let s: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32 * 0.11).cos() / 2.0).collect();
            let eps = 1e-6;
            let mut got = vec![0f32; n];
            rms_norm(&x, &s, eps, &mut got);
            let rms = (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n as f64 + f64::from(eps)).sqrt();
            for ((&g, &v), &w) in got.iter().zip(&x).zip(&s) {
                let want = f64::from(v) / rms * f64::from(w);
                assert!((f64::from(g) - want).abs() <= 1e-6 * want.abs().max(1.0), "rms_norm, n = {n}: {g} vs {want}");
            }
            let up: Vec<f32> = s.iter().map(|v| v - 1.2).collect();
            swiglu(&x, &up, &mut got);
            for ((&g, &v), &u) in got.iter().zip(&x).zip(&up) {
                let want = f64::from(v) / (1.0 + (-f64::from(v)).exp()) * f64::from(u);
                assert!((f64::from(g) - want).abs() <= 1e-6 * want.abs().max(1.0), "swiglu, n = {n}: {g} vs {want}");
            }
            let mut gated = up.clone();
            sigmoid_gate(&x, &mut gated);
            for ((&g, &v), &u) in gated.iter().zip(&x).zip(&up) {
                let want = f64::from(u) / (1.0 + (-f64::from(v)).exp());
                assert!((f64::from(g) - want).abs() <= 1e-6 * want.abs().max(1.0), "sigmoid_gate, n = {n}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn widening_bf16_is_exact() {
        let xs: Vec<half::bf16> = [0.0f32, -0.0, 1.5, -3.25e-20, 6.5e30, f32::INFINITY, f32::MIN_POSITIVE]
            .iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect();
        let mut got = vec![0f32; xs.len()];
        widen_bf16(&xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), &mut got);
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(x.to_f32().to_bits(), g.to_bits());
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_whole_range() {
        for variant in [exp_sub_sum_lanes::<false> as fn(&mut [f32], f32) -> f32, exp_sub_sum] {
            let xs: Vec<f32> = (0..=400_000).map(|i| -100.0 + i as f32 * 5e-4).collect();
            let mut ys = xs.clone();
            let sum = variant(&mut ys, 0.0);
            let mut want_sum = 0f64;
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = (x as f64).exp();
                want_sum += want.min(f32::MAX as f64);
                if x < -87.33 {
                    assert_eq!(y, 0.0, "e^{x}");
                } else if want > f32::MAX as f64 {
                    assert_eq!(y, f32::INFINITY, "e^{x}");
                } else {
                    assert!((y as f64 - want).abs() <= 2.0 * f32::EPSILON as f64 * want, "e^{x}: {y} vs {want}");
                }
            }
            assert!(sum.is_infinite() && want_sum > f32::MAX as f64 || (sum as f64 / want_sum - 1.0).abs() < 1e-5);
        }
        let (mut with_sum, mut without) = (vec![-3.0f32, 0.5, 7.0, -90.0], vec![-3.0f32, 0.5, 7.0, -90.0]);
        exp_sub_sum(&mut with_sum, 1.0);
        exp_sub(&mut without, 1.0);
        assert_eq!(with_sum, without, "exp_sub is exp_sub_sum without the sum");
        // Operands through black_box so that the products are computed where they are written.
        use std::hint::black_box as opaque;
        {
            let _flush = FlushDenormals::new();
            assert_eq!(opaque(opaque(1e-30f32) * opaque(1e-10f32)), 0.0, "flushed while the guard lives");
        }
        assert!(opaque(opaque(1e-30f32) * opaque(1e-10f32)) > 0.0, "restored after");
        let mut special = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0];
        exp_sub_sum(&mut special, 0.0);
        assert!(special[0].is_nan());
        assert_eq!(special[1..], [0.0, f32::INFINITY, 1.0]);
    }
}
