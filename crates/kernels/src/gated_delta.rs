//! The gated delta rule of Qwen3.5's Gated DeltaNet layers, for one (batch, value-head) pair.
//!
//! Two kernels compute the same recurrence (docs/model.md in the deltadoc repository, "Gated DeltaNet layer"):
//! - [`chunked`] splits the sequence into chunks of [`CHUNK`] tokens and turns each chunk into small
//!   dense matrix products (the WY form of the delta rule), which is what makes prefill fast;
//! - [`recurrent`] walks token by token, reading the state twice and writing it once per token; it is
//!   the decode path.
//!
//! Both take the recurrent state `S` as `[Dk, Dv]` row-major (HF's layout) and write the outputs
//! `o_t = Sᵀ q_t`; [`chunked`] updates the state in place, [`recurrent`] reads the state before
//! the call from one buffer and leaves the state after it in another. Queries and keys must
//! already be L2-normalised, and queries scaled: [`prepare_qk`] does that so the two kernels see
//! bit-identical inputs.

use crate::gemm::gemm;
use crate::simd::{self, madd};

/// Chunk length of the chunked kernel. The reference implementation uses 64; the result differs
/// only in f32 summation order. Per token and head the kernel costs `3·Dk·Dv + ~5·L·D`
/// multiply-adds: at D = 128 a chunk of 64 adds 83 % to the three products with the state that
/// every chunk length pays, a chunk of 16 adds 21 % and still leaves 32×128 by 128×128 products
/// for the SIMD micro-kernels. Measured on an AVX-512 EPYC (one 0.8B layer, 4,096 tokens): 16 is
/// 1.4× faster than 64, 8 about equal to 16, 32 in between.
pub const CHUNK: usize = 16;

/// Per-head inputs of the rule. Rows are tokens; all slices are row-major and contiguous.
pub struct HeadInputs<'a> {
    /// `[T, Dk]`, already L2-normalised and scaled.
    pub q: &'a [f32],
    /// `[T, Dk]`, already L2-normalised.
    pub k: &'a [f32],
    /// `[T, Dv]`
    pub v: &'a [f32],
    /// `[T]` log-decay (≤ 0).
    pub g: &'a [f32],
    /// `[T]` write strength in (0, 1).
    pub beta: &'a [f32],
    /// Key head width.
    pub dk: usize,
    /// Value head width.
    pub dv: usize,
}

impl HeadInputs<'_> {
    fn len(&self) -> usize {
        self.g.len()
    }
}

simd::dispatch!(
    /// L2-normalise each `d`-row of `x` in place as `x · rsqrt(Σx² + 1e-6)` and multiply by `scale`.
    ///
    /// The epsilon sits inside the square root, as in the reference `l2norm`.
    pub prepare_qk(x: &mut [f32], d: usize, scale: f32) -> () = prepare_qk_lanes
);

#[inline(always)]
fn prepare_qk_lanes<const FMA: bool>(x: &mut [f32], d: usize, scale: f32) {
    for row in x.chunks_exact_mut(d) {
        let ss = simd::dot_lanes::<FMA>(row, row);
        let inv = 1.0 / (ss + 1e-6).sqrt() * scale;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// A head's log-decay for one token, `g = −exp(A_log)·softplus(a + dt_bias)` (≤ 0), from the
/// head's `neg_exp_a = −exp(A_log)` and `dt_bias`: Qwen3.5's gate, in f32 as the reference
/// computes it. Softplus as `max(x, 0) + ln(1 + e^−|x|)`, which neither overflows nor loses
/// the small values far below 0.
pub fn log_decay(a: f32, neg_exp_a: f32, dt_bias: f32) -> f32 {
    let x = a + dt_bias;
    neg_exp_a * (x.max(0.0) + (-x.abs()).exp().ln_1p())
}

/// A head's write strength for one token, `β = sigmoid(b)`.
pub fn write_strength(b: f32) -> f32 {
    1.0 / (1.0 + (-b).exp())
}

simd::dispatch!(
    /// Qwen3.5's gated RMSNorm of one head's output row: `o ← o · rsqrt(mean(o²) + eps) · w ·
    /// silu(z)`, with `z` the row's gate and `w` the norm's weight (plain, not `1 + w`).
    pub gated_norm(o: &mut [f32], z: &[f32], w: &[f32], eps: f32) -> () = gated_norm_lanes
);

#[inline(always)]
fn gated_norm_lanes<const FMA: bool>(o: &mut [f32], z: &[f32], w: &[f32], eps: f32) {
    let inv = 1.0 / (simd::dot_lanes::<FMA>(o, o) / o.len() as f32 + eps).sqrt();
    for ((v, &z), &w) in o.iter_mut().zip(z).zip(w) {
        *v = w * (*v * inv) * simd::silu_lane::<FMA>(z);
    }
}

simd::dispatch!(
    /// Token-by-token rule from the state `past` to `state`; `out` is `[T, Dv]`. The first token
    /// reads `past` and writes `state`, so a decode step streams the state twice in all, not twice
    /// plus a copy.
    pub recurrent(inp: &HeadInputs<'_>, past: &[f32], state: &mut [f32], out: &mut [f32]) -> () = recurrent_lanes
);

#[inline(always)]
fn recurrent_lanes<const FMA: bool>(inp: &HeadInputs<'_>, past: &[f32], state: &mut [f32], out: &mut [f32]) {
    let (dk, dv) = (inp.dk, inp.dv);
    let mut sk = vec![0f32; dv];
    let mut next = vec![0f32; dv];
    let mut lower = vec![0f32; 2 * dv];
    for t in 0..inp.len() {
        let q = &inp.q[t * dk..(t + 1) * dk];
        let k = &inp.k[t * dk..(t + 1) * dk];
        let v = &inp.v[t * dv..(t + 1) * dv];
        let decay = inp.g[t].exp();
        // Decode streams the state; with the decay and the write folded into one update, each
        // token reads it twice and writes it once. Pass 1 reads Sᵀk and Sᵀq of the old state:
        // the new state's Sᵀq is then e^g·Sᵀq + δ (k·q), where δ = β(v − e^g·Sᵀk).
        let o = &mut out[t * dv..(t + 1) * dv];
        let old: &[f32] = if t == 0 { past } else { state };
        state_products::<FMA>(old, k, q, dv, [&mut sk, o], &mut lower);
        let (beta, kq) = (inp.beta[t], simd::dot_lanes::<FMA>(k, q));
        for ((d, &vj), oj) in sk.iter_mut().zip(v).zip(o.iter_mut()) {
            *d = beta * (vj - decay * *d);
            *oj = madd::<FMA>(*d, kq, decay * *oj);
        }
        // Pass 2: S ← e^g S + k δᵀ. The last token's state is read next by the next call, after
        // the rest of the step has gone through the caches, so it is streamed to memory: an
        // ordinary store reads each line before writing it (1 MB a 0.8B layer): a single-token
        // step of a 0.8B layer's 16 heads took 264 µs with that read, 191-196 without (one
        // thread, states not in cache).
        let last = t + 1 == inp.len();
        for (i, &ki) in k.iter().enumerate() {
            let old = if t == 0 { &past[i * dv..(i + 1) * dv] } else { &state[i * dv..(i + 1) * dv] };
            for ((s, &o), &d) in next.iter_mut().zip(old).zip(sk.iter()) {
                *s = madd::<FMA>(ki, d, decay * o);
            }
            let row = &mut state[i * dv..(i + 1) * dv];
            if last {
                simd::stream_copy(row, &next);
            } else {
                row.copy_from_slice(&next);
            }
        }
    }
    simd::stream_fence();
    if inp.len() == 0 {
        state.copy_from_slice(past);
    }
}

/// Pass 1 of a token: `sk = Sᵀk` and `o = Sᵀq` of the state `old` (`[Dk, Dv]`). The rows are read
/// as two streams, the upper and the lower half at once, each summed apart (the lower half into
/// `lower`, `[2, Dv]`) and the two added at the end: one stream left the core waiting on memory,
/// and the 18 rule calls of a 0.8B decode step took 1.1-1.3x as long (benches/RESULTS.md, "The
/// pool's cost, and the rule's state read as two streams").
#[inline(always)]
fn state_products<const FMA: bool>(old: &[f32], k: &[f32], q: &[f32], dv: usize, [sk, o]: [&mut [f32]; 2], lower: &mut [f32]) {
    let half = k.len() / 2;
    let (upper_rows, lower_rows) = old.split_at(half * dv);
    let (sk_low, o_low) = lower.split_at_mut(dv);
    // Every row and sum of length Dv, visibly to the compiler, so the loops below check no bounds.
    let (sk, o, sk_low, o_low) = (&mut sk[..dv], &mut o[..dv], &mut sk_low[..dv], &mut o_low[..dv]);
    for acc in [&mut *sk, &mut *o, &mut *sk_low, &mut *o_low] {
        acc.fill(0.0);
    }
    for (i, (up, low)) in upper_rows.chunks_exact(dv).zip(lower_rows.chunks_exact(dv)).enumerate() {
        let (up, low) = (&up[..dv], &low[..dv]);
        let (ku, qu, kl, ql) = (k[i], q[i], k[half + i], q[half + i]);
        for j in 0..dv {
            sk[j] = madd::<FMA>(up[j], ku, sk[j]);
            o[j] = madd::<FMA>(up[j], qu, o[j]);
            sk_low[j] = madd::<FMA>(low[j], kl, sk_low[j]);
            o_low[j] = madd::<FMA>(low[j], ql, o_low[j]);
        }
    }
    // An odd Dk leaves the lower half one row longer.
    if k.len() % 2 == 1 {
        let (i, row) = (k.len() - 1, &old[(k.len() - 1) * dv..]);
        for j in 0..dv {
            sk_low[j] = madd::<FMA>(row[j], k[i], sk_low[j]);
            o_low[j] = madd::<FMA>(row[j], q[i], o_low[j]);
        }
    }
    for j in 0..dv {
        sk[j] += sk_low[j];
        o[j] += o_low[j];
    }
}

/// Scratch buffers of the chunked kernel, reused across chunks and heads of one call.
#[derive(Default)]
pub struct ChunkScratch {
    /// `[k; q]` rows of the chunk (2L × Dk).
    kq: Vec<f32>,
    /// `[k; q] kᵀ` (2L × L): rows 0..L hold A, rows L..2L the masked `q kᵀ`.
    scores: Vec<f32>,
    /// `[u | w]` (L × (Dv + Dk)), then `v'` in the u part.
    rhs: Vec<f32>,
    /// `(I + A)⁻¹` (L × L).
    inv: Vec<f32>,
    /// `[w; q ⊙ e^c]` (2L × Dk).
    wq: Vec<f32>,
    /// `[w; q ⊙ e^c] S` (2L × Dv).
    ws: Vec<f32>,
    /// `[vβ | kβ ⊙ e^c]` (L × (Dv + Dk)), then `k ⊙ e^{c_L − c}` (L × Dk).
    kd: Vec<f32>,
    cum: Vec<f32>,
    /// One row of the in-chunk decay matrix P.
    decay: Vec<f32>,
}

simd::dispatch!(
    /// Chunked (WY) rule; `out` is `[T, Dv]`. Equal to [`recurrent`] up to f32 summation order.
    ///
    /// Per chunk of length L with in-chunk cumulative log-decay c:
    /// `A = strict_lower((kβ kᵀ) ⊙ P)`, `P[i,j] = exp(c_i − c_j)`; solve `(I + A) [u | w] = [vβ | kβ ⊙ e^c]`;
    /// `v' = u − w S`; `o = (q ⊙ e^c) S + ((q kᵀ) ⊙ P, lower incl. diagonal) v'`;
    /// `S ← e^{c_L} S + (k ⊙ e^{c_L − c})ᵀ v'`. Products that share an operand run as one GEMM.
    pub chunked(inp: &HeadInputs<'_>, state: &mut [f32], out: &mut [f32], sc: &mut ChunkScratch) -> () = chunked_lanes
);

#[inline(always)]
fn chunked_lanes<const FMA: bool>(inp: &HeadInputs<'_>, state: &mut [f32], out: &mut [f32], sc: &mut ChunkScratch) {
    let (dk, dv) = (inp.dk, inp.dv);
    let t_total = inp.len();
    let width = dv + dk;
    sc.kq.resize(2 * CHUNK * dk, 0.0);
    sc.scores.resize(2 * CHUNK * CHUNK, 0.0);
    sc.rhs.resize(CHUNK * width, 0.0);
    sc.wq.resize(2 * CHUNK * dk, 0.0);
    sc.ws.resize(2 * CHUNK * dv, 0.0);
    sc.kd.resize(CHUNK * width, 0.0);
    sc.inv.resize(CHUNK * CHUNK, 0.0);
    sc.cum.resize(CHUNK, 0.0);
    sc.decay.resize(CHUNK, 0.0);

    let mut start = 0;
    while start < t_total {
        let l = CHUNK.min(t_total - start);
        let q = &inp.q[start * dk..(start + l) * dk];
        let k = &inp.k[start * dk..(start + l) * dk];
        let v = &inp.v[start * dv..(start + l) * dv];
        let beta = &inp.beta[start..start + l];
        let cum = &mut sc.cum[..l];
        let mut acc = 0f32;
        for (c, &g) in cum.iter_mut().zip(&inp.g[start..start + l]) {
            acc += g;
            *c = acc;
        }
        let c_last = cum[l - 1];

        // [k; q] kᵀ in one product: rows 0..L are k kᵀ, rows L..2L are q kᵀ.
        sc.kq[..l * dk].copy_from_slice(k);
        sc.kq[l * dk..2 * l * dk].copy_from_slice(q);
        gemm(2 * l, dk, l, 1.0, &sc.kq, dk, 1, k, 1, dk, 0.0, &mut sc.scores, l);
        let (kk, qk) = sc.scores[..2 * l * l].split_at_mut(l * l);
        for i in 0..l {
            // P[i, j] = e^{c_i − c_j} for j < i, exponentiated as one row.
            let p = &mut sc.decay[..i];
            for (p, &c) in p.iter_mut().zip(cum.iter()) {
                *p = -c;
            }
            simd::exp_sub(p, -cum[i]);
            let (kk_row, qk_row) = (&mut kk[i * l..(i + 1) * l], &mut qk[i * l..(i + 1) * l]);
            for ((a, b), &p) in kk_row.iter_mut().zip(qk_row.iter_mut()).zip(p.iter()) {
                *a *= beta[i] * p;
                *b *= p;
            }
            kk_row[i..].fill(0.0);
            qk_row[i + 1..].fill(0.0);
        }
        // (I + A)⁻¹ by forward substitution over its rows (L³/6 multiply-adds, each row only as
        // wide as its column count), so that the solve itself is one GEMM: substituting the
        // right-hand sides directly costs L²/2 row updates of Dv + Dk.
        let inv = &mut sc.inv[..l * l];
        inv.fill(0.0);
        for i in 0..l {
            let (done, rest) = inv.split_at_mut(i * l);
            let row = &mut rest[..l];
            row[i] = 1.0;
            for j in 0..i {
                let a = kk[i * l + j];
                for (r, &x) in row[..=j].iter_mut().zip(&done[j * l..j * l + j + 1]) {
                    *r = madd::<FMA>(-a, x, *r);
                }
            }
        }
        // [u | w] = (I + A)⁻¹ [vβ | kβ ⊙ e^c].
        let b_rhs = &mut sc.kd[..l * width];
        for i in 0..l {
            let row = &mut b_rhs[i * width..(i + 1) * width];
            let b = beta[i];
            for (r, &x) in row[..dv].iter_mut().zip(&v[i * dv..(i + 1) * dv]) {
                *r = x * b;
            }
            let e = b * cum[i].exp();
            for (r, &x) in row[dv..].iter_mut().zip(&k[i * dk..(i + 1) * dk]) {
                *r = x * e;
            }
        }
        let rhs = &mut sc.rhs[..l * width];
        gemm(l, l, width, 1.0, inv, l, 1, b_rhs, width, 1, 0.0, rhs, width);
        // [w; q ⊙ e^c] S in one product: rows 0..L are w S, rows L..2L the inter-chunk output.
        for i in 0..l {
            sc.wq[i * dk..(i + 1) * dk].copy_from_slice(&rhs[i * width + dv..(i + 1) * width]);
            let e = cum[i].exp();
            for (d, &x) in sc.wq[(l + i) * dk..(l + i + 1) * dk].iter_mut().zip(&q[i * dk..(i + 1) * dk]) {
                *d = x * e;
            }
        }
        gemm(2 * l, dk, dv, 1.0, &sc.wq, dk, 1, state, dv, 1, 0.0, &mut sc.ws, dv);
        // v' = u − w S, written into the u columns of rhs.
        for i in 0..l {
            for (u, &ws) in rhs[i * width..i * width + dv].iter_mut().zip(&sc.ws[i * dv..(i + 1) * dv]) {
                *u -= ws;
            }
        }
        // o = (q ⊙ e^c) S + qk v'.
        let o = &mut out[start * dv..(start + l) * dv];
        o.copy_from_slice(&sc.ws[l * dv..2 * l * dv]);
        gemm(l, l, dv, 1.0, qk, l, 1, rhs, width, 1, 1.0, o, dv);
        // S ← e^{c_L} S + (k ⊙ e^{c_L − c})ᵀ v'.
        let kd = &mut sc.kd[..l * dk];
        for i in 0..l {
            let e = (c_last - cum[i]).exp();
            for (d, &x) in kd[i * dk..(i + 1) * dk].iter_mut().zip(&k[i * dk..(i + 1) * dk]) {
                *d = x * e;
            }
        }
        gemm(dk, l, dv, 1.0, kd, 1, dk, rhs, width, 1, c_last.exp(), state, dv);
        start += l;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    #[test]
    fn gates_and_gated_norm_follow_their_formulas() {
        for (a, neg, bias) in [(0.3f32, -0.5f32, 1.2f32), (-40.0, -2.0, 0.5), (35.0, -0.1, 0.0), (-1.0, -1.0, -1.0)] {
            let x = (a + bias) as f64;
            let want = neg as f64 * if x > 30.0 { x } else { x.exp().ln_1p() };
            let got = log_decay(a, neg, bias) as f64;
            assert!((got - want).abs() <= 1e-6 * want.abs() + 1e-30, "g({a}, {neg}, {bias}) = {got}, want {want}");
        }
        for b in [-30.0f32, -2.0, 0.0, 0.7, 25.0] {
            let want = 1.0 / (1.0 + (-b as f64).exp());
            assert!((write_strength(b) as f64 - want).abs() <= 1e-7, "beta({b})");
        }
        let mut rng = StdRng::seed_from_u64(3);
        let d = 128;
        let o: Vec<f32> = (0..d).map(|_| rng.random_range(-3f32..3.0)).collect();
        let z: Vec<f32> = (0..d).map(|_| rng.random_range(-4f32..4.0)).collect();
        let w: Vec<f32> = (0..d).map(|_| rng.random_range(0.5f32..1.5)).collect();
        let mut got = o.clone();
        gated_norm(&mut got, &z, &w, 1e-6);
        let ms = o.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        for i in 0..d {
            let (zi, oi) = (z[i] as f64, o[i] as f64);
            let want = w[i] as f64 * oi / (ms + 1e-6).sqrt() * zi / (1.0 + (-zi).exp());
            assert!((got[i] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-3), "{i}: {} vs {want}", got[i]);
        }
    }

    /// The recurrence written out directly from the formulas in f64: the reference both kernels
    /// are held to.
    fn reference(inp: &HeadInputs<'_>, state: &mut [f64], out: &mut [f64]) {
        let (dk, dv) = (inp.dk, inp.dv);
        for t in 0..inp.len() {
            let decay = (inp.g[t] as f64).exp();
            state.iter_mut().for_each(|s| *s *= decay);
            for j in 0..dv {
                let kv: f64 = (0..dk).map(|i| state[i * dv + j] * inp.k[t * dk + i] as f64).sum();
                let delta = inp.beta[t] as f64 * (inp.v[t * dv + j] as f64 - kv);
                for i in 0..dk {
                    state[i * dv + j] += inp.k[t * dk + i] as f64 * delta;
                }
            }
            for j in 0..dv {
                out[t * dv + j] = (0..dk).map(|i| state[i * dv + j] * inp.q[t * dk + i] as f64).sum();
            }
        }
    }

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        g: Vec<f32>,
        beta: Vec<f32>,
        s0: Vec<f32>,
        dk: usize,
        dv: usize,
    }

    fn case(t: usize, dk: usize, dv: usize, seed: u64) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut draw = |n: usize, lo: f32, hi: f32| (0..n).map(|_| rng.random_range(lo..hi)).collect::<Vec<f32>>();
        let mut q = draw(t * dk, -1.0, 1.0);
        let mut k = draw(t * dk, -1.0, 1.0);
        let v = draw(t * dv, -1.0, 1.0);
        let g = draw(t, -0.5, 0.0);
        let beta = draw(t, 0.05, 0.95);
        let s0 = draw(dk * dv, -0.3, 0.3);
        prepare_qk(&mut q, dk, (dk as f32).powf(-0.5));
        prepare_qk(&mut k, dk, 1.0);
        Case { q, k, v, g, beta, s0, dk, dv }
    }

    impl Case {
        fn inputs(&self, range: std::ops::Range<usize>) -> HeadInputs<'_> {
            let (dk, dv) = (self.dk, self.dv);
            HeadInputs {
                q: &self.q[range.start * dk..range.end * dk],
                k: &self.k[range.start * dk..range.end * dk],
                v: &self.v[range.start * dv..range.end * dv],
                g: &self.g[range.clone()],
                beta: &self.beta[range],
                dk,
                dv,
            }
        }
    }

    fn max_abs(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
    }

    // f32 kernels against the f64 reference: outputs are O(1), so 1e-4 absolute leaves room for the
    // different summation orders of the two kernels while still catching any wrong term.
    const TOL: f64 = 1e-4;

    #[test]
    fn both_kernels_match_reference_across_chunk_boundaries() {
        // The odd key widths leave `state_products` a lower half one row longer (Dk = 1: no upper
        // half at all).
        let shapes = [(1usize, 8usize, 8usize), (63, 16, 8), (64, 16, 16), (65, 8, 16), (150, 32, 32), (200, 128, 128)];
        let odd = [(1, 1, 8), (3, 7, 16), (20, 129, 32)];
        for &(t, dk, dv) in shapes.iter().chain(&odd) {
            let c = case(t, dk, dv, t as u64);
            let mut s_ref: Vec<f64> = c.s0.iter().map(|&x| x as f64).collect();
            let mut o_ref = vec![0f64; t * dv];
            reference(&c.inputs(0..t), &mut s_ref, &mut o_ref);

            let mut s = vec![f32::NAN; dk * dv];
            let mut o = vec![0f32; t * dv];
            recurrent(&c.inputs(0..t), &c.s0, &mut s, &mut o);
            assert!(max_abs(&o, &o_ref) < TOL, "recurrent output T={t}: {}", max_abs(&o, &o_ref));
            assert!(max_abs(&s, &s_ref) < TOL, "recurrent state T={t}");

            let mut s = c.s0.clone();
            let mut o = vec![0f32; t * dv];
            chunked(&c.inputs(0..t), &mut s, &mut o, &mut ChunkScratch::default());
            assert!(max_abs(&o, &o_ref) < TOL, "chunked output T={t}: {}", max_abs(&o, &o_ref));
            assert!(max_abs(&s, &s_ref) < TOL, "chunked state T={t}: {}", max_abs(&s, &s_ref));
        }
    }

    #[test]
    fn state_hands_over_between_chunked_and_recurrent() {
        let (t, split, dk, dv) = (150, 100, 32, 16);
        let c = case(t, dk, dv, 7);
        let mut s_ref: Vec<f64> = c.s0.iter().map(|&x| x as f64).collect();
        let mut o_ref = vec![0f64; t * dv];
        reference(&c.inputs(0..t), &mut s_ref, &mut o_ref);

        // chunked prefill of 0..100, then token-by-token decode, then a chunked continuation.
        let mut s = c.s0.clone();
        let mut o = vec![0f32; t * dv];
        let mut sc = ChunkScratch::default();
        chunked(&c.inputs(0..split), &mut s, &mut o[..split * dv], &mut sc);
        for step in split..130 {
            let past = s.clone();
            recurrent(&c.inputs(step..step + 1), &past, &mut s, &mut o[step * dv..(step + 1) * dv]);
        }
        chunked(&c.inputs(130..t), &mut s, &mut o[130 * dv..], &mut sc);
        assert!(max_abs(&o, &o_ref) < TOL, "handover output: {}", max_abs(&o, &o_ref));
        assert!(max_abs(&s, &s_ref) < TOL, "handover state");
    }

    #[test]
    fn strong_decay_does_not_overflow() {
        // Log-decays of −30 per token make e^{c} underflow inside a chunk; the kernel must stay finite.
        let mut c = case(128, 16, 16, 3);
        c.g.iter_mut().for_each(|g| *g = -30.0);
        let mut s = c.s0.clone();
        let mut o = vec![0f32; 128 * 16];
        chunked(&c.inputs(0..128), &mut s, &mut o, &mut ChunkScratch::default());
        assert!(o.iter().chain(s.iter()).all(|x| x.is_finite()));
    }
}
