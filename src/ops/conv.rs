//! Causal depthwise 1-D convolution with carried state, as used before every DeltaNet rule.
//!
//! `out[t, c] = act(Σ_j w[c, j] · x̂[t + j, c])` where `x̂` is the input prefixed by the `K − 1`
//! carried columns of earlier calls (zeros at the start of a sequence). Tap `K − 1` multiplies the
//! current token, tap 0 the oldest, as in PyTorch's `conv1d` with left padding (specs/qwen35.md §2.1).
//! The state keeps the last `K − 1` pre-activation inputs, channel-major `[C, K − 1]`, which is the
//! layout of ONNX `CausalConvWithState` and of llama.cpp (HF keeps `K` columns; only `K − 1` are read).

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

    #[inline]
    fn apply(self, x: f32) -> f32 {
        match self {
            Self::None => x,
            Self::Silu => x / (1.0 + (-x).exp()),
        }
    }
}

/// One batch row. `x` is `[T, C]` (channels last, as the projections produce it), `w` is `[C, K]`,
/// `state` is `[C, K − 1]` and is replaced by the state after the last token; `out` is `[T, C]`.
pub fn causal_conv(x: &[f32], w: &[f32], state: &mut [f32], out: &mut [f32], channels: usize, act: Activation) {
    let k = w.len() / channels;
    let hist = k - 1;
    let t_len = x.len() / channels;
    for c in 0..channels {
        let wc = &w[c * k..(c + 1) * k];
        let sc = &mut state[c * hist..(c + 1) * hist];
        for t in 0..t_len {
            let mut acc = 0f32;
            for (j, &wj) in wc.iter().enumerate() {
                // Position of tap j relative to the start of this call's input.
                let p = t as isize + j as isize - hist as isize;
                let xv = if p >= 0 { x[p as usize * channels + c] } else { sc[(hist as isize + p) as usize] };
                acc += wj * xv;
            }
            out[t * channels + c] = act.apply(acc);
        }
        // New state: the last K − 1 inputs of [old state ‖ x].
        let mut new_state = [0f32; 16];
        for (i, ns) in new_state[..hist].iter_mut().enumerate() {
            let p = t_len as isize - hist as isize + i as isize;
            *ns = if p >= 0 { x[p as usize * channels + c] } else { sc[(hist as isize + p) as usize] };
        }
        sc.copy_from_slice(&new_state[..hist]);
    }
}

/// Largest kernel width the state hand-over supports without allocating (Qwen3.5 uses 4).
pub const MAX_KERNEL: usize = 17;

#[cfg(test)]
mod tests {
    use super::*;

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
                out[t * channels + c] = Activation::Silu.apply(acc);
            }
        }
        out
    }

    #[test]
    fn split_calls_equal_one_call() {
        let channels = 5;
        let k = 4;
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
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // The final state holds the last three inputs of each channel.
        for c in 0..channels {
            for i in 0..k - 1 {
                assert_eq!(state[c * (k - 1) + i], x[(t_len - (k - 1) + i) * channels + c]);
            }
        }
    }
}
