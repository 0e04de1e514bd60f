//! One block-quantised matmul node over `MatMulNBits`'s codes and scales: ONNX Runtime's
//! `MatMulNBits` on them as they are, or deltadoc's `QuantMatMul` on the same packed in panels.
//! tests/quant_ops.rs and benches/ops.rs both hold the two operators against each other on the
//! same weights (each includes this file by path).

use deltadoc::onnx::proto::data_type;
use deltadoc::onnx::{Attr, GraphBuilder};
use deltadoc::ops::quant_matmul::Weights;

/// Which operator multiplies.
#[derive(Clone, Copy)]
pub enum Op {
    /// ORT's `MatMulNBits` at an accuracy level.
    NBits(i64),
    /// deltadoc's `QuantMatMul`.
    Ours,
}

/// Weights `[n, k]` in `MatMulNBits`'s layout: `codes [n, ⌈k/block⌉, block·bits/8]` and one
/// scale per block, `scales [n·⌈k/block⌉]`.
pub struct Codes<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [f32],
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    pub block: usize,
}

/// Adds `out = x · Wᵀ` by `op`, the weights as initialisers named after `out`. `after` follows
/// the weights among the inputs (`QuantMatMul`'s `rows`, `norm` and `residual`), `extra` joins
/// the shape attributes.
pub fn add(b: &mut GraphBuilder, op: Op, w: &Codes<'_>, x: &str, after: &[&str], extra: Vec<(&str, Attr)>, out: &str) {
    let blocks = w.k.div_ceil(w.block);
    let mut attrs = vec![
        ("K", Attr::Int(w.k as i64)),
        ("N", Attr::Int(w.n as i64)),
        ("bits", Attr::Int(w.bits as i64)),
        ("block_size", Attr::Int(w.block as i64)),
    ];
    attrs.extend(extra);
    let (name, domain, weights) = match op {
        Op::NBits(level) => {
            attrs.push(("accuracy_level", Attr::Int(level)));
            let shape = [w.n as i64, blocks as i64, (w.block * w.bits as usize / 8) as i64];
            let codes = b.initializer(&format!("{out}.codes"), data_type::UINT8, &shape, w.codes).unwrap();
            let scales = b.f32s(&format!("{out}.scales"), &[(w.n * blocks) as i64], w.scales).unwrap();
            ("MatMulNBits", "com.microsoft", vec![codes, scales])
        }
        Op::Ours => {
            let packed = Weights::pack(w.codes, w.scales, w.n, w.k, w.bits, w.block).unwrap();
            let packed = b.initializer(&format!("{out}.packed"), data_type::UINT8, &[packed.len() as i64], &packed).unwrap();
            ("QuantMatMul", deltadoc::ops::DOMAIN, vec![packed])
        }
    };
    let inputs: Vec<&str> = std::iter::once(x).chain(weights.iter().map(String::as_str)).chain(after.iter().copied()).collect();
    b.node_named(name, domain, &inputs, &[out], attrs);
}
