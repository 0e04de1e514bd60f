//! `ai.deltadoc::GatedDeltaRule`'s two ways of taking its gates and giving its output, one node
//! each: the gates `g`, `beta` computed outside and the raw output, against Qwen3.5's `a`, `b`
//! with the heads' `−exp(A_log)` and `dt_bias`, and the output through the gated RMSNorm (what
//! the model graph runs). The recurrence itself is held to transformers by tests/parity.rs; here
//! the fused gates and norm are held to their formulas in f64 around the unfused node.

use deltadoc::onnx::proto::data_type;
use deltadoc::onnx::{Attr, Dim, GraphBuilder};
use deltadoc::runtime::{self, SessionOptions};
use ndarray::{Array3, Array4};
use ort::session::Session;
use ort::value::Tensor;
use rand::{RngExt, SeedableRng, rngs::StdRng};

const HK: usize = 2;
const HV: usize = 4;
const D: usize = 32;
const EPS: f32 = 1e-6;

/// One `GatedDeltaRule` node with the six plain inputs and those of `neg_exp_a`, `dt_bias`, `z`,
/// `norm_weight` named in `extra` (graph inputs here, so that a test can feed them).
fn session(dir: &std::path::Path, extra: &[&str]) -> Session {
    let path = dir.join(format!("rule-{}.onnx", extra.len()));
    let mut b = GraphBuilder::new("rule", &path).unwrap();
    let bt = |w: usize| vec![Dim::Fixed(1), Dim::Named("t"), Dim::Fixed(w as i64)];
    for (name, width) in [("q", HK * D), ("k", HK * D), ("v", HV * D), ("g", HV), ("beta", HV)] {
        b.input(name, data_type::FLOAT, &bt(width));
    }
    let state = [1, HV, D, D].map(|d| Dim::Fixed(d as i64));
    b.input("state", data_type::FLOAT, &state);
    for &name in extra {
        match name {
            "z" => b.input(name, data_type::FLOAT, &bt(HV * D)),
            "norm_weight" => b.input(name, data_type::FLOAT, &[Dim::Fixed(D as i64)]),
            _ => b.input(name, data_type::FLOAT, &[Dim::Fixed(HV as i64)]),
        }
    }
    b.output("o", data_type::FLOAT, &bt(HV * D));
    b.output("state_out", data_type::FLOAT, &state);
    let inputs: Vec<&str> = ["q", "k", "v", "g", "beta", "state"].into_iter().chain(extra.iter().copied()).collect();
    b.node_named(
        "GatedDeltaRule",
        deltadoc::ops::DOMAIN,
        &inputs,
        &["o", "state_out"],
        vec![("num_k_heads", Attr::Int(HK as i64)), ("num_v_heads", Attr::Int(HV as i64)), ("norm_epsilon", Attr::Float(EPS))],
    );
    b.finish(&path, &[("", 23), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap()
}

fn run(s: &mut Session, t: usize, feed: &[(&str, &[f32])]) -> ort::Result<(Vec<f32>, Vec<f32>)> {
    let values: Vec<(&str, ort::value::DynValue)> = feed
        .iter()
        .map(|&(name, data)| {
            let value = match name {
                "state" => Tensor::from_array(Array4::from_shape_vec((1, HV, D, D), data.to_vec()).unwrap()).unwrap().into_dyn(),
                "neg_exp_a" | "dt_bias" | "norm_weight" => {
                    Tensor::from_array(ndarray::Array1::from_vec(data.to_vec())).unwrap().into_dyn()
                }
                _ => {
                    Tensor::from_array(Array3::from_shape_vec((1, t, data.len() / t), data.to_vec()).unwrap()).unwrap().into_dyn()
                }
            };
            (name, value)
        })
        .collect();
    let out = s.run(values)?;
    let o = out["o"].try_extract_tensor::<f32>()?.1.to_vec();
    let state = out["state_out"].try_extract_tensor::<f32>()?.1.to_vec();
    Ok((o, state))
}

#[test]
fn raw_gates_and_the_gated_norm_equal_their_formulas_around_the_plain_rule() {
    let dir = tempfile::tempdir().unwrap();
    let mut plain = session(dir.path(), &[]);
    let mut fused = session(dir.path(), &["neg_exp_a", "dt_bias", "z", "norm_weight"]);
    let mut rng = StdRng::seed_from_u64(11);
    let mut draw = |n: usize, lo: f32, hi: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(lo..hi)).collect() };
    let neg_exp_a: Vec<f32> = draw(HV, -1.0, 1.0).iter().map(|&l| -(l as f64).exp() as f32).collect();
    let (dt_bias, norm_weight) = (draw(HV, -1.0, 1.0), draw(D, 0.5, 1.5));
    let state = draw(HV * D * D, -0.2, 0.2);
    // A decode step (the recurrent kernel) and a prefill chunk (the chunked one); `a` wide enough
    // that softplus meets both of its branches.
    for t in [1, 37] {
        let (q, k, v) = (draw(t * HK * D, -1.0, 1.0), draw(t * HK * D, -1.0, 1.0), draw(t * HV * D, -1.0, 1.0));
        let (a, b, z) = (draw(t * HV, -25.0, 25.0), draw(t * HV, -6.0, 6.0), draw(t * HV * D, -5.0, 5.0));
        // The gates in f64, rounded once.
        let g: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let x = a as f64 + dt_bias[i % HV] as f64;
                (neg_exp_a[i % HV] as f64 * if x > 30.0 { x } else { x.exp().ln_1p() }) as f32
            })
            .collect();
        let beta: Vec<f32> = b.iter().map(|&b| (1.0 / (1.0 + (-b as f64).exp())) as f32).collect();
        let common = [("q", &q[..]), ("k", &k), ("v", &v), ("state", &state)];
        let given: Vec<_> = common.iter().copied().chain([("g", &g[..]), ("beta", &beta[..])]).collect();
        let (o, want_state) = run(&mut plain, t, &given).unwrap();
        let raw: Vec<_> = common
            .iter()
            .copied()
            .chain([
                ("g", &a[..]),
                ("beta", &b[..]),
                ("neg_exp_a", &neg_exp_a[..]),
                ("dt_bias", &dt_bias[..]),
                ("z", &z[..]),
                ("norm_weight", &norm_weight[..]),
            ])
            .collect();
        let (got, got_state) = run(&mut fused, t, &raw).unwrap();
        let state_err = got_state.iter().zip(&want_state).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(state_err <= 1e-5, "t = {t}: states differ by {state_err}");
        // The gated norm per token and value head, in f64, on the plain node's output.
        for (head, (o, z)) in o.chunks_exact(D).zip(z.chunks_exact(D)).enumerate() {
            let ms = o.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / D as f64;
            let inv = 1.0 / (ms + EPS as f64).sqrt();
            for j in 0..D {
                let (zj, oj) = (z[j] as f64, o[j] as f64);
                let want = norm_weight[j] as f64 * oj * inv * zj / (1.0 + (-zj).exp());
                let got = got[head * D + j] as f64;
                assert!((got - want).abs() <= 1e-4 * want.abs().max(0.1), "t = {t}, head row {head}, {j}: {got} vs {want}");
            }
        }
    }
    // Half of a pair is a graph error, not a silent fallback.
    let mut half = session(dir.path(), &["neg_exp_a"]);
    let t = 1;
    let (q, v, x) = (vec![0.1f32; HK * D], vec![0.1f32; HV * D], vec![0.1f32; HV]);
    let feed = [("q", &q[..]), ("k", &q), ("v", &v), ("g", &x), ("beta", &x), ("state", &state), ("neg_exp_a", &neg_exp_a)];
    let e = run(&mut half, t, &feed).unwrap_err().to_string();
    assert!(e.contains("GatedDeltaRule: neg_exp_a needs its partner input"), "{e}");
}
