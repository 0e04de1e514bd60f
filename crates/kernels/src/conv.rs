//! Causal depthwise 1-D convolution with carried state, as used before every DeltaNet rule.
//!
//! `out[t, c] = act(Σ_j w[c, j] · x̂[t + j, c])` where `x̂` is the input prefixed by the `K − 1`
//! carried columns of earlier calls (zeros at the start of a sequence). Tap `K − 1` multiplies the
//! current token, tap 0 the oldest, as in PyTorch's `conv1d` with left padding (docs/model.md in the deltadoc repository, "Gated DeltaNet layer").
//! The state keeps the last `K − 1` pre-activation inputs, channel-major `[C, K − 1]`, which is the
//! layout of ONNX `CausalConvWithState` and of llama.cpp (HF keeps `K` columns; only `K − 1` are read).

use std::ops::Range;

use crate::simd;

/// Activation applied after the convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// `x · sigmoid(x)`.
    Silu,
}

impl Activation {
    /// Parses the ONNX attribute value (`"silu"` or `"none"`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "none" | "" => Some(Self::None),
            _ => None,
        }
    }

    #[inline(always)]
    fn apply<const FMA: bool>(self, x: f32) -> f32 {
        match self {
            Self::None => x,
            Self::Silu => simd::silu_lane::<FMA>(x),
        }
    }
}

/// Taps transposed to `[K, C]` and the carried history as rows `[K − 1, C]`: the layout in which
/// every inner loop runs over contiguous channels (the input is channels-last).
pub struct Prepared {
    taps: Vec<f32>,
    history: Vec<f32>,
    k: usize,
    channels: usize,
}

impl Prepared {
    /// From `w [C, K]` and one batch row's `state [C, K − 1]`.
    pub fn new(w: &[f32], state: &[f32], channels: usize) -> Self {
        let k = w.len() / channels;
        let hist = k - 1;
        let mut taps = vec![0f32; k * channels];
        let mut history = vec![0f32; hist * channels];
        for c in 0..channels {
            for j in 0..k {
                taps[j * channels + c] = w[c * k + j];
            }
            for i in 0..hist {
                history[i * channels + c] = state[c * hist + i];
            }
        }
        Self { taps, history, k, channels }
    }

    /// Input row `p` of `[history ‖ x]`, where p = 0 is the first token of `x`.
    #[inline(always)]
    fn row<'a>(&'a self, x: &'a [f32], p: isize) -> &'a [f32] {
        let c = self.channels;
        if p >= 0 {
            &x[p as usize * c..(p as usize + 1) * c]
        } else {
            let h = (self.k as isize - 1 + p) as usize;
            &self.history[h * c..(h + 1) * c]
        }
    }

    /// Output rows `rows` (token indices of this call) into `out` (exactly those rows).
    pub fn rows(&self, x: &[f32], rows: Range<usize>, out: &mut [f32], act: Activation) {
        conv_rows(self, x, rows, out, act);
    }

    /// The state after `x`: its last K − 1 input rows, channel-major `[C, K − 1]`.
    pub fn next_state(&self, x: &[f32], state: &mut [f32]) {
        let (c, hist) = (self.channels, self.k - 1);
        let t_len = (x.len() / c) as isize;
        for i in 0..hist {
            let row = self.row(x, t_len - hist as isize + i as isize);
            for (ch, &v) in row.iter().enumerate() {
                state[ch * hist + i] = v;
            }
        }
    }
}

simd::dispatch!(
    /// [`Prepared::rows`], compiled per instruction set: the SiLU's exp was a libm call per
    /// element, most of the op's time.
    conv_rows(p: &Prepared, x: &[f32], rows: Range<usize>, out: &mut [f32], act: Activation) -> () = conv_rows_lanes
);

#[inline(always)]
fn conv_rows_lanes<const FMA: bool>(p: &Prepared, x: &[f32], rows: Range<usize>, out: &mut [f32], act: Activation) {
    let (c, hist) = (p.channels, p.k as isize - 1);
    for (t, o) in rows.zip(out.chunks_exact_mut(c)) {
        o.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..p.k {
            let src = p.row(x, t as isize + j as isize - hist);
            for ((ov, &w), &xv) in o.iter_mut().zip(&p.taps[j * c..(j + 1) * c]).zip(src) {
                *ov = simd::madd::<FMA>(w, xv, *ov);
            }
        }
        o.iter_mut().for_each(|v| *v = act.apply::<FMA>(*v));
    }
}

simd::dispatch!(
    /// One token (decode) in the operator's own layouts: `x [C]`, `w [C, K]`, `state [C, K − 1]`
    /// → `out [C]` and the next state `next [C, K − 1]`. Skips [`Prepared`], whose transposes of
    /// the taps and the history cost more than one token's convolution.
    pub step(x: &[f32], w: &[f32], state: &[f32], out: &mut [f32], next: &mut [f32], act: Activation) -> () = step_lanes
);

#[inline(always)]
fn step_lanes<const FMA: bool>(x: &[f32], w: &[f32], state: &[f32], out: &mut [f32], next: &mut [f32], act: Activation) {
    let k = w.len() / x.len();
    let hist = k - 1;
    // The sums, then the activation over all of them: a loop of `silu_lane` alone vectorises,
    // inside the channel loop it ran a lane at a time. With Qwen3.5's width compiled as a
    // constant, 6144 channels take 9 µs where one loop over a variable width took 39.
    if k == 4 {
        window_sums::<FMA>(x, w, state, out, 4);
    } else {
        window_sums::<FMA>(x, w, state, out, k);
    }
    for o in out.iter_mut() {
        *o = act.apply::<FMA>(*o);
    }
    // The window moves by one: every channel's history is the state one place on, its last the
    // new input.
    if hist > 0 {
        let n = next.len();
        next[..n - 1].copy_from_slice(&state[1..]);
        for (last, &xc) in next.iter_mut().skip(hist - 1).step_by(hist).zip(x) {
            *last = xc;
        }
    }
}

/// Each channel's taps `w [C, k]` over its history `state [C, k − 1]` and the new input `x [C]`.
#[inline(always)]
fn window_sums<const FMA: bool>(x: &[f32], w: &[f32], state: &[f32], out: &mut [f32], k: usize) {
    let hist = k - 1;
    for (ch, (&xc, o)) in x.iter().zip(out.iter_mut()).enumerate() {
        let (taps, past) = (&w[ch * k..(ch + 1) * k], &state[ch * hist..(ch + 1) * hist]);
        *o = past.iter().zip(taps).fold(taps[hist] * xc, |acc, (&s, &t)| simd::madd::<FMA>(t, s, acc));
    }
}

/// Largest kernel width accepted (Qwen3.5 uses 4); a sanity bound on the attribute-free shape.
pub const MAX_KERNEL: usize = 17;

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch row, single-threaded: `x [T, C]`, `w [C, K]`, `state [C, K − 1]` (replaced by the
    /// state after the last token), `out [T, C]`.
    fn causal_conv(x: &[f32], w: &[f32], state: &mut [f32], out: &mut [f32], channels: usize, act: Activation) {
        let p = Prepared::new(w, state, channels);
        p.rows(x, 0..x.len() / channels, out, act);
        p.next_state(x, state);
    }

    /// Plain definition over the full sequence with zero history.
    fn reference(x: &[f32], w: &[f32], channels: usize) -> Vec<f32> {
        let k = w.len() / channels;
        let t_len = x.len() / channels;
        let mut out = vec![0f32; x.len()];
        for t in 0..t_len {
            for c in 0..channels {
                let mut acc = 0f32;
                for j in 0..k {
                    let p = t as isize - (k - 1) as isize + j as isize;
                    if p >= 0 {
                        acc += w[c * k + j] * x[p as usize * channels + c];
                    }
                }
                out[t * channels + c] = acc / (1.0 + (-acc).exp());
            }
        }
        out
    }

    #[test]
    fn split_calls_equal_one_call() {
        // Qwen3.5's width, which the decode step compiles as a constant, and others.
        for k in [4, 1, 3] {
            split_calls_equal_one_call_of_width(k);
        }
    }

    fn split_calls_equal_one_call_of_width(k: usize) {
        let channels = 5;
        let t_len = 11;
        let x: Vec<f32> = (0..t_len * channels).map(|i| ((i * 37 % 17) as f32 - 8.0) / 7.0).collect();
        let w: Vec<f32> = (0..channels * k).map(|i| ((i * 13 % 11) as f32 - 5.0) / 4.0).collect();
        let expected = reference(&x, &w, channels);
        // Calls of 2, 1, 1 and 7 tokens: shorter than the history, single-token decode, and longer.
        let mut state = vec![0f32; channels * (k - 1)];
        let mut got = vec![0f32; x.len()];
        let mut start = 0;
        for len in [2, 1, 1, 7] {
            let r = start * channels..(start + len) * channels;
            causal_conv(&x[r.clone()], &w, &mut state, &mut got[r], channels, Activation::Silu);
            start += len;
        }
        for (a, b) in got.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "width {k}: {a} vs {b}");
        }
        // One token at a time through the decode step: the same outputs.
        let mut stepped = vec![0f32; channels * (k - 1)];
        let mut next = stepped.clone();
        let mut out = vec![0f32; channels];
        for (t, want) in expected.chunks_exact(channels).enumerate() {
            step(&x[t * channels..(t + 1) * channels], &w, &stepped, &mut out, &mut next, Activation::Silu);
            std::mem::swap(&mut stepped, &mut next);
            for (a, b) in out.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "width {k}, step {t}: {a} vs {b}");
            }
        }
        // Both final states hold the last three inputs of each channel.
        for c in 0..channels {
            for i in 0..k - 1 {
                let want = x[(t_len - (k - 1) + i) * channels + c];
                assert_eq!(state[c * (k - 1) + i], want);
                assert_eq!(stepped[c * (k - 1) + i], want);
            }
        }
    }
}
