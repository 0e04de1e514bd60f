//! Weight storage formats of exported graphs: fp32, fp16 (stored half, computed in f32) and
//! block-quantised int8/int4 for ONNX Runtime's `com.microsoft::MatMulNBits`.

use half::f16;

/// Storage precision of the projection weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Plain float32.
    Fp32,
    /// Weights stored as IEEE half; ONNX Runtime's CPU path computes in f32.
    Fp16,
    /// Symmetric 8-bit blocks along the input dimension ([`default_block`] long unless chosen).
    Int8,
    /// Symmetric 4-bit blocks along the input dimension ([`default_block`] long unless chosen).
    Int4,
}

impl Precision {
    /// Whether the weights are block-quantised (int8, int4) and so have a block length.
    pub fn is_quantised(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Int4)
    }

    /// Name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
        }
    }
}

/// Block lengths along K (the input dimension) that ONNX Runtime's `MatMulNBits` takes.
pub const BLOCK_SIZES: [usize; 5] = [16, 32, 64, 128, 256];

/// Block length of the int8/int4 folders written before the length could be chosen.
pub const LEGACY_BLOCK: usize = 32;

/// Block length of a quantised precision when the import does not choose one. int4 keeps 32,
/// the width of llama.cpp's Q4_K sub-blocks, because 4-bit rounding error grows with the block's
/// largest weight. int8 takes 128: its rounding step is 1/16 of int4's even so, and on an AVX-512
/// EPYC (0.8B shape, 512 tokens) 128 ran prefill 1.25× and decode 1.2× as fast as 32 (fewer
/// scales to read and apply per weight).
pub fn default_block(precision: Precision) -> usize {
    match precision {
        Precision::Int8 => 128,
        _ => 32,
    }
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// Little-endian IEEE half bytes (round to nearest even).
pub fn to_f16_bytes(w: &[f32]) -> Vec<u8> {
    let h: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
    bytemuck::cast_slice(&h).to_vec()
}

/// A weight in `MatMulNBits` layout: `data [N, blocks, blob]`, `scales [N · blocks]`, no zero
/// points (the op then uses the midpoint 2^(bits−1), making the code symmetric).
pub struct Blocks {
    /// Packed codes `[N, blocks, blob]`.
    pub data: Vec<u8>,
    /// One scale per row and block.
    pub scales: Vec<f32>,
    /// Blocks per row.
    pub blocks: usize,
    /// Bytes per block.
    pub blob: usize,
}

/// Quantises `w [n, k]` (PyTorch `[out, in]`) per row in blocks of `block` along k.
pub fn block_quantize(w: &[f32], n: usize, k: usize, bits: u32, block: usize) -> Blocks {
    let blocks = k.div_ceil(block);
    let blob = block * bits as usize / 8;
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let mid = 1i32 << (bits - 1);
    let mut data = vec![0u8; n * blocks * blob];
    let mut scales = vec![0f32; n * blocks];
    for r in 0..n {
        let row = &w[r * k..(r + 1) * k];
        for bi in 0..blocks {
            let chunk = &row[bi * block..((bi + 1) * block).min(k)];
            let amax = chunk.iter().fold(0f32, |m, &x| m.max(x.abs()));
            let scale = if amax > 0.0 { amax / qmax } else { 1.0 };
            scales[r * blocks + bi] = scale;
            let out = &mut data[(r * blocks + bi) * blob..(r * blocks + bi + 1) * blob];
            for j in 0..block {
                let x = chunk.get(j).copied().unwrap_or(0.0);
                let q = ((x / scale).round() as i32).clamp(-(qmax as i32), qmax as i32) + mid;
                match bits {
                    8 => out[j] = q as u8,
                    4 => out[j / 2] |= (q as u8 & 0x0f) << ((j % 2) * 4),
                    _ => unreachable!("unsupported bit width {bits}"),
                }
            }
        }
    }
    Blocks { data, scales, blocks, blob }
}

/// Reverses [`block_quantize`] (for accuracy checks).
pub fn block_dequantize(b: &Blocks, n: usize, k: usize, bits: u32, block: usize) -> Vec<f32> {
    let mid = 1i32 << (bits - 1);
    let mut w = vec![0f32; n * k];
    for r in 0..n {
        for c in 0..k {
            let (bi, j) = (c / block, c % block);
            let blob = &b.data[(r * b.blocks + bi) * b.blob..];
            let q = match bits {
                8 => blob[j] as i32,
                _ => ((blob[j / 2] >> ((j % 2) * 4)) & 0x0f) as i32,
            };
            w[r * k + c] = (q - mid) as f32 * b.scales[r * b.blocks + bi];
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantisation_error_is_within_half_a_step() {
        let (n, k) = (3, 70); // k not a multiple of any block: the tail block is zero-padded
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect();
        for (bits, block) in [8u32, 4].into_iter().flat_map(|b| BLOCK_SIZES.map(|s| (b, s))) {
            let q = block_quantize(&w, n, k, bits, block);
            assert_eq!(q.blocks, k.div_ceil(block));
            let back = block_dequantize(&q, n, k, bits, block);
            for r in 0..n {
                for c in 0..k {
                    let step = q.scales[r * q.blocks + c / block];
                    let err = (w[r * k + c] - back[r * k + c]).abs();
                    assert!(err <= step * 0.5 + 1e-7, "bits {bits}, block {block} at ({r},{c})");
                }
            }
        }
    }
}
