//! The quantised path at real widths, independent of any model's sensitivity: one
//! `com.microsoft::MatMulNBits` or `ai.deltadoc::QuantMatMul` node with deltadoc's block quantiser
//! against an f32 product with the dequantised weights (K = 1024 and 3584, the 0.8B hidden and
//! MLP widths), and the two operators against each other.

#[path = "common/quant_node.rs"]
mod quant_node;

use deltadoc::model::quant;
use deltadoc::onnx::proto::data_type;
use deltadoc::onnx::{Dim, GraphBuilder};
use deltadoc::ops::quant_matmul::{GEMM_ROWS, Isa};
use deltadoc::runtime::{self, SessionOptions};
use ndarray::Array2;
use ort::value::Tensor;
use quant_node::{Codes, Op};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// The largest difference from the dequantised product over `m` rows, and the outputs.
fn run(bits: i64, block: usize, op: Op, k: usize, n: usize, m: usize) -> (f32, Vec<f32>) {
    let (y, want) = outputs(bits, block, op, k, n, m, None).unwrap();
    let worst = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    (worst, y)
}

/// The operator's outputs `[m, n]` and the f32 product with the dequantised weights; with
/// `rows`, `QuantMatMul` gets them as its fourth input.
fn outputs(
    bits: i64,
    block: usize,
    op: Op,
    k: usize,
    n: usize,
    m: usize,
    rows: Option<&[i64]>,
) -> ort::Result<(Vec<f32>, Vec<f32>)> {
    // The same weights and inputs for every operator.
    let mut rng = StdRng::seed_from_u64(bits as u64 * 31 + k as u64 + block as u64 + m as u64);
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0) / (k as f32).sqrt()).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let q = quant::block_quantize(&w, n, k, bits as u32, block);
    let dq = quant::block_dequantize(&q, n, k, bits as u32, block);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    let mut b = GraphBuilder::new("nbits", &path).unwrap();
    b.input("x", data_type::FLOAT, &[Dim::Fixed(m as i64), Dim::Fixed(k as i64)]);
    b.output("y", data_type::FLOAT, &[Dim::Fixed(m as i64), Dim::Fixed(n as i64)]);
    if rows.is_some() {
        b.input("rows", data_type::INT64, &[Dim::Named("r")]);
    }
    let w = Codes { codes: &q.data, scales: &q.scales, n, k, bits: bits as u32, block };
    quant_node::add(&mut b, op, &w, "x", rows.map(|_| "rows"), "y");
    b.finish(&path, &[("", 23), ("com.microsoft", 1), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    let mut s = runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap();
    let xin = Tensor::from_array(Array2::from_shape_vec((m, k), x.clone()).unwrap()).unwrap();
    let mut feed = vec![("x", xin.into_dyn())];
    if let Some(rows) = rows {
        feed.push(("rows", Tensor::from_array(ndarray::Array1::from_vec(rows.to_vec())).unwrap().into_dyn()));
    }
    let out = s.run(feed)?;
    let (_, y) = out["y"].try_extract_tensor::<f32>().unwrap();
    let want = (0..m * n).map(|at| (0..k).map(|i| x[at / n * k + i] * dq[at % n * k + i]).sum()).collect();
    Ok((y.to_vec(), want))
}

#[test]
fn matmul_nbits_equals_dequantised_product() {
    // Outputs are O(0.6) (unit inputs, 1/sqrt(K) weights).
    // Both default block lengths (int4's 32, int8's 128) with both bit widths.
    for k in [1024, 3584] {
        for (bits, block) in [(8, 32), (8, 128), (4, 32), (4, 128)] {
            // accuracy_level 0: f32 arithmetic on the dequantised weights, rounding only.
            let exact = run(bits, block, Op::NBits(0), k, 256, 8).0;
            assert!(exact < 1e-4, "bits {bits} block {block} K {k} level 0: {exact:e}");
            // accuracy_level 4 also quantises activations to int8 per block: ~1 % of an output.
            let fast = run(bits, block, Op::NBits(4), k, 256, 8).0;
            assert!(fast < 2e-2, "bits {bits} block {block} K {k} level 4: {fast:e}");
            println!("MatMulNBits bits={bits} block={block} K={k}: level 0 max |Δ| {exact:.1e}, level 4 {fast:.1e}");
        }
    }
}

#[test]
fn quant_matmul_rounds_as_matmul_nbits_does() {
    // The decode widths (M = 1), a batch and a verify (4, 16), prefill's (64, 133: the kernel's
    // panels from 16 rows on), and K cut short of a block.
    for (k, m) in [(1024, 1), (3584, 4), (1000, 16), (1024, 64), (3584, 133)] {
        for (bits, block) in [(8, 16), (8, 128), (4, 32), (4, 256)] {
            let (ours, y) = run(bits, block, Op::Ours, k, 256, m);
            let (_, theirs) = run(bits, block, Op::NBits(4), k, 256, m);
            if m >= GEMM_ROWS && Isa::detect() != Isa::Vnni512 {
                // Prefill sizes without VNNI: an f32 product of the dequantised weights.
                assert!(ours < 1e-4, "bits {bits} block {block} K {k} M {m}: {ours:e}");
                println!("QuantMatMul bits={bits} block={block} K={k} M={m}: max |Δ| {ours:.1e} (f32)");
                continue;
            }
            // Both quantise the activations to int8 per block: the same bound as level 4 above.
            assert!(ours < 2e-2, "bits {bits} block {block} K {k} M {m}: {ours:e}");
            let apart = y.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            // And they round them alike: what is left is float summation order (outputs O(0.6)).
            assert!(apart < 1e-5, "bits {bits} block {block} K {k} M {m}: {apart:e} from MatMulNBits");
            println!("QuantMatMul bits={bits} block={block} K={k} M={m}: max |Δ| {ours:.1e}, from MatMulNBits {apart:.1e}");
        }
    }
}

#[test]
fn with_rows_only_those_are_computed_and_equal_the_full_product() {
    // A constrained step's allowed tokens: runs and single rows, the first and the last.
    let rows: Vec<i64> = (0..5).chain([17, 64]).chain(100..131).chain([255]).collect();
    for (bits, block, m) in [(4, 32, 1), (8, 128, 3), (8, 64, 20)] {
        let full = run(bits, block, Op::Ours, 1024, 256, m).1;
        let (some, _) = outputs(bits, block, Op::Ours, 1024, 256, m, Some(&rows)).unwrap();
        for (at, (&got, &all)) in some.iter().zip(&full).enumerate() {
            if rows.contains(&((at % 256) as i64)) {
                assert_eq!(got.to_bits(), all.to_bits(), "bits {bits}: output {at} differs from the full product");
            } else {
                assert_eq!(got, f32::NEG_INFINITY, "bits {bits}: output {at} was not asked for");
            }
        }
        // An empty list asks for every row: the full product, bit for bit.
        let (every, _) = outputs(bits, block, Op::Ours, 1024, 256, m, Some(&[])).unwrap();
        assert!(every.iter().zip(&full).all(|(a, b)| a.to_bits() == b.to_bits()), "bits {bits}: empty rows");
    }
    for (bad, why) in [(vec![3i64, 2], "rows must be ascending"), (vec![256], "row 256 is not among the 256 outputs")] {
        let e = outputs(4, 32, Op::Ours, 1024, 256, 1, Some(&bad)).unwrap_err().to_string();
        assert!(e.contains("QuantMatMul: rows") && e.contains(why), "{e}");
    }
}
