//! The quantised path at real widths, independent of any model's sensitivity: one
//! `com.microsoft::MatMulNBits` or `ai.deltadoc::QuantMatMul` node with deltadoc's block quantiser
//! against an f32 product with the dequantised weights (K = 1024 and 3584, the 0.8B hidden and
//! MLP widths), and the two operators against each other.

#[path = "common/quant_node.rs"]
mod quant_node;

use deltadoc::model::quant;
use deltadoc::onnx::proto::data_type;
use deltadoc::onnx::{Attr, Dim, GraphBuilder};
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
    let after = if rows.is_some() { ["rows"].as_slice() } else { &[] };
    quant_node::add(&mut b, op, &w, "x", after, vec![], "y");
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
        let e = outputs(4, 32, Op::Ours, 1024, 256, 1, Some(&bad)).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("QuantMatMul: rows") && e.contains(why), "{e}");
    }
}

/// Weights, input, norm weight and residual of the folding tests below, and the graph's
/// outputs for them.
struct Folded {
    codes: quant::Blocks,
    x: Vec<f32>,
    norm: Vec<f32>,
    residual: Vec<f32>,
    k: usize,
    n: usize,
    m: usize,
    bits: u32,
    block: usize,
}

impl Folded {
    fn new(bits: u32, block: usize, k: usize, n: usize, m: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(bits as u64 + k as u64 * 7 + m as u64);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0) / (k as f32).sqrt()).collect();
        // Rows of different scales and off zero, so the norm matters.
        let x = (0..m * k).map(|i| (rng.random_range(-1.0f32..1.0) + 0.3) * (1 + i / k) as f32).collect();
        let norm = (0..k).map(|_| rng.random_range(0.5f32..1.5)).collect();
        let residual = (0..m * n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Self { codes: quant::block_quantize(&w, n, k, bits, block), x, norm, residual, k, n, m, bits, block }
    }

    /// `y [m, out]` of a graph over inputs `x` and `residual` (`[m, out]`) and the initialiser
    /// `norm`, whose nodes `body` adds.
    fn run(&self, out: usize, body: impl FnOnce(&mut GraphBuilder, &Codes<'_>)) -> anyhow::Result<Vec<f32>> {
        let (k, m) = (self.k, self.m);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let mut b = GraphBuilder::new("folded", &path).unwrap();
        b.input("x", data_type::FLOAT, &[Dim::Fixed(m as i64), Dim::Fixed(k as i64)]);
        b.input("residual", data_type::FLOAT, &[Dim::Fixed(m as i64), Dim::Fixed(out as i64)]);
        b.output("y", data_type::FLOAT, &[Dim::Fixed(m as i64), Dim::Fixed(out as i64)]);
        b.f32s("norm", &[k as i64], &self.norm).unwrap();
        let w = Codes { codes: &self.codes.data, scales: &self.codes.scales, n: self.n, k, bits: self.bits, block: self.block };
        body(&mut b, &w);
        b.finish(&path, &[("", 23), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
        let mut s = runtime::open_session(&path, &SessionOptions::with_threads(2))?;
        let x = Tensor::from_array(Array2::from_shape_vec((m, k), self.x.clone()).unwrap()).unwrap();
        let r = Tensor::from_array(Array2::from_shape_vec((m, out), self.residual[..m * out].to_vec()).unwrap()).unwrap();
        let got = s.run(vec![("x", x.into_dyn()), ("residual", r.into_dyn())])?;
        Ok(got["y"].try_extract_tensor::<f32>()?.1.to_vec())
    }

    /// The formulas in f64 on the dequantised weights.
    fn reference(&self, swiglu: bool) -> Vec<f64> {
        let (k, n) = (self.k, self.n);
        let dq = quant::block_dequantize(&self.codes, n, k, self.bits, self.block);
        let out = if swiglu { n / 2 } else { n };
        let mut y = Vec::with_capacity(self.m * out);
        for (r, row) in self.x.chunks_exact(k).enumerate() {
            let rms = (row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / k as f64 + 1e-6).sqrt();
            let xn: Vec<f64> = row.iter().zip(&self.norm).map(|(&v, &s)| f64::from(v) / rms * f64::from(s)).collect();
            let p: Vec<f64> = (0..n).map(|j| (0..k).map(|i| xn[i] * f64::from(dq[j * k + i])).sum()).collect();
            for j in 0..out {
                let v = if swiglu { p[j] / (1.0 + (-p[j]).exp()) * p[j + out] } else { p[j] };
                y.push(v + f64::from(self.residual[r * out + j]));
            }
        }
        y
    }
}

fn worst(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
    a.iter().zip(b).map(|(&x, y)| (f64::from(x) - y).abs()).fold(0.0, f64::max)
}

#[test]
fn folded_norm_swiglu_and_residual_match_the_nodes_they_replace() {
    let eps = || ("epsilon", Attr::Float(1e-6));
    // Decode (M = 1), a batch, and prefill's panels; K cut short of a block.
    for (bits, block, k, n, m) in [(8, 128, 1024, 512, 1), (4, 32, 1000, 256, 3), (8, 64, 1024, 256, 40)] {
        let f = Folded::new(bits, block, k, n, m);
        for swiglu in [false, true] {
            let out = if swiglu { n / 2 } else { n };
            let act = || if swiglu { vec![eps(), ("activation", Attr::Str("swiglu".into()))] } else { vec![eps()] };
            let folded = f.run(out, |b, w| quant_node::add(b, Op::Ours, w, "x", &["", "norm", "residual"], act(), "y")).unwrap();
            // The same steps as ONNX nodes around a plain QuantMatMul: the float graphs'
            // spelling, and the int8/int4 graphs' before model-folder format 8.
            let nodes = f
                .run(out, |b, w| {
                    let normed = b.op("RMSNormalization", &["x", "norm"], vec![("axis", Attr::Int(-1)), eps()]);
                    quant_node::add(b, Op::Ours, w, &normed, &[], vec![], "p");
                    let y = if swiglu {
                        let halves = b.split("p", &[out as i64, out as i64], -1).unwrap();
                        let s = b.op("Sigmoid", &[&halves[0]], vec![]);
                        let silu = b.op("Mul", &[&halves[0], &s], vec![]);
                        b.op("Mul", &[&silu, &halves[1]], vec![])
                    } else {
                        "p".to_string()
                    };
                    b.node_named("Add", "", &[&y, "residual"], &["y"], vec![]);
                })
                .unwrap();
            // Outputs are O(1). The norm's sum in f32 lanes against ORT's f64 can move an
            // activation code across a rounding edge: one code step of one product term.
            let apart = worst(&folded, nodes.iter().map(|&v| f64::from(v)));
            assert!(apart < 2e-3, "bits {bits} K {k} M {m} swiglu {swiglu}: {apart:e} from the separate nodes");
            // Both quantise the activations to int8 per block (the bound of the tests above).
            let off = worst(&folded, f.reference(swiglu));
            assert!(off < 3e-2, "bits {bits} K {k} M {m} swiglu {swiglu}: {off:e} from the formulas");
            println!("folded bits={bits} K={k} M={m} swiglu={swiglu}: max |Δ| {apart:.1e} from the nodes, {off:.1e} from f64");
        }
    }
}

#[test]
fn folding_refuses_what_it_cannot_do() {
    let f = Folded::new(8, 128, 1024, 255, 1);
    let swiglu = || vec![("activation", Attr::Str("swiglu".into()))];
    let e = f.run(127, |b, w| quant_node::add(b, Op::Ours, w, "x", &[], swiglu(), "y")).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("QuantMatMul: swiglu needs an even N, got 255"), "{e}");
    let e = f
        .run(255, |b, w| quant_node::add(b, Op::Ours, w, "x", &[], vec![("activation", Attr::Str("gelu".into()))], "y"))
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("unknown activation \"gelu\""), "{e}");
    // A residual of another shape than the output.
    let f = Folded::new(8, 128, 1024, 256, 1);
    let e = f.run(64, |b, w| quant_node::add(b, Op::Ours, w, "x", &["", "", "residual"], vec![], "y")).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("QuantMatMul: residual has 64 values for an output of 256"), "{e}");
}
