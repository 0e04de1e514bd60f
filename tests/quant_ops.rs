//! The quantised path at real widths, independent of any model's sensitivity: one
//! `com.microsoft::MatMulNBits` node with deltadoc's block quantiser against an f32 product with
//! the dequantised weights (K = 1024 and 3584, the 0.8B hidden and MLP widths).

use deltadoc::model::quant;
use deltadoc::onnx::proto::data_type;
use deltadoc::onnx::{Attr, Dim, GraphBuilder};
use deltadoc::runtime::{self, SessionOptions};
use ndarray::Array2;
use ort::value::Tensor;
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn run(bits: i64, block: usize, accuracy: i64, k: usize, n: usize) -> f32 {
    let mut rng = StdRng::seed_from_u64(bits as u64 * 31 + accuracy as u64 + k as u64 + block as u64);
    let m = 8;
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0) / (k as f32).sqrt()).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let q = quant::block_quantize(&w, n, k, bits as u32, block);
    let dq = quant::block_dequantize(&q, n, k, bits as u32, block);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    let mut b = GraphBuilder::new("nbits", &path).unwrap();
    b.input("x", data_type::FLOAT, &[Dim::Fixed(m as i64), Dim::Fixed(k as i64)]);
    b.output("y", data_type::FLOAT, &[Dim::Fixed(m as i64), Dim::Fixed(n as i64)]);
    let qn = b.initializer("w_q", data_type::UINT8, &[n as i64, q.blocks as i64, q.blob as i64], &q.data).unwrap();
    let sn = b.f32s("w_scales", &[(n * q.blocks) as i64], &q.scales).unwrap();
    b.node_named(
        "MatMulNBits",
        "com.microsoft",
        &["x", &qn, &sn],
        &["y"],
        vec![
            ("K", Attr::Int(k as i64)),
            ("N", Attr::Int(n as i64)),
            ("bits", Attr::Int(bits)),
            ("block_size", Attr::Int(block as i64)),
            ("accuracy_level", Attr::Int(accuracy)),
        ],
    );
    b.finish(&path, &[("", 23), ("com.microsoft", 1)], &[]).unwrap();
    let mut s = runtime::open_session(&path, &SessionOptions { threads: 2, spin: false }).unwrap();
    let xin = Tensor::from_array(Array2::from_shape_vec((m, k), x.clone()).unwrap()).unwrap();
    let out = s.run(vec![("x", xin.into_dyn())]).unwrap();
    let (_, y) = out["y"].try_extract_tensor::<f32>().unwrap();
    let mut worst = 0f32;
    for r in 0..m {
        for c in 0..n {
            let want: f32 = (0..k).map(|i| x[r * k + i] * dq[c * k + i]).sum();
            worst = worst.max((y[r * n + c] - want).abs());
        }
    }
    worst
}

#[test]
fn matmul_nbits_equals_dequantised_product() {
    // Outputs are O(0.6) (unit inputs, 1/sqrt(K) weights).
    // Both default block lengths (int4's 32, int8's 128) with both bit widths.
    for k in [1024, 3584] {
        for (bits, block) in [(8, 32), (8, 128), (4, 32), (4, 128)] {
            // accuracy_level 0: f32 arithmetic on the dequantised weights, rounding only.
            let exact = run(bits, block, 0, k, 256);
            assert!(exact < 1e-4, "bits {bits} block {block} K {k} level 0: {exact:e}");
            // accuracy_level 4 also quantises activations to int8 per block: ~1 % of an output.
            let fast = run(bits, block, 4, k, 256);
            assert!(fast < 2e-2, "bits {bits} block {block} K {k} level 4: {fast:e}");
            println!("MatMulNBits bits={bits} block={block} K={k}: level 0 max |Δ| {exact:.1e}, level 4 {fast:.1e}");
        }
    }
}
