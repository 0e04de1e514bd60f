//! `ai.deltadoc::CausalAttention`'s two forms, one node each: prepared queries, keys and values,
//! against the attention layer's projection taken whole (what the model graph runs), whose head
//! norms, partial rotary and output gate are held here to their formulas in f64 around the
//! prepared form. The attention itself is held to transformers by tests/parity.rs. A batch of
//! rows reading their own lengths of one padded cache (`past_lengths`) is held to each row alone.

use deltadoc::onnx::proto::data_type;
use deltadoc::onnx::{Attr, Dim, GraphBuilder};
use deltadoc::runtime::{self, SessionOptions};
use ndarray::{ArrayD, IxDyn};
use ort::session::Session;
use ort::value::Tensor;
use rand::{RngExt, SeedableRng, rngs::StdRng};

const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 32;
/// Rotated values at the start of each head.
const R: usize = 16;
const EPS: f32 = 1e-6;
const WIDTH: usize = (2 * HQ + 2 * HKV) * D;

/// One `CausalAttention` node (f32 cache) in the prepared form, or in the projection form.
fn session(dir: &std::path::Path, whole: bool) -> Session {
    let path = dir.join(format!("attention-{whole}.onnx"));
    let mut b = GraphBuilder::new("attention", &path).unwrap();
    let t = |rest: &[usize]| -> Vec<Dim> {
        [Dim::Fixed(1), Dim::Named("t")].into_iter().chain(rest.iter().map(|&d| Dim::Fixed(d as i64))).collect()
    };
    // Heads and width left open too, so that a cache of the wrong shape reaches the op.
    let past = [Dim::Fixed(1), Dim::Named("p"), Dim::Named("kv_heads"), Dim::Named("d")];
    let inputs: Vec<&str> = if whole {
        // Width left open, so that a wrong one reaches the op.
        b.input("qgkv", data_type::FLOAT, &[Dim::Fixed(1), Dim::Named("t"), Dim::Named("w")]);
        b.input("q_norm", data_type::FLOAT, &[Dim::Fixed(D as i64)]);
        b.input("k_norm", data_type::FLOAT, &[Dim::Fixed(D as i64)]);
        b.input("cos", data_type::FLOAT, &t(&[1, R]));
        b.input("sin", data_type::FLOAT, &t(&[1, R]));
        vec!["qgkv", "", "", "past_key", "past_value", "q_norm", "k_norm", "cos", "sin"]
    } else {
        b.input("q", data_type::FLOAT, &t(&[HQ, D]));
        b.input("k", data_type::FLOAT, &t(&[HKV, D]));
        b.input("v", data_type::FLOAT, &t(&[HKV, D]));
        vec!["q", "k", "v", "past_key", "past_value"]
    };
    b.input("past_key", data_type::FLOAT, &past);
    b.input("past_value", data_type::FLOAT, &past);
    b.output("out", data_type::FLOAT, &t(&[HQ * D]));
    b.output("new_key", data_type::FLOAT, &t(&[HKV, D]));
    b.output("new_value", data_type::FLOAT, &t(&[HKV, D]));
    b.node_named(
        "CausalAttention",
        deltadoc::ops::DOMAIN,
        &inputs,
        &["out", "new_key", "new_value"],
        vec![("num_heads", Attr::Int(HQ as i64)), ("kv_num_heads", Attr::Int(HKV as i64)), ("epsilon", Attr::Float(EPS))],
    );
    b.finish(&path, &[("", 23), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap()
}

/// Runs `s` on `feed` (name, shape, values): its three outputs.
fn run(s: &mut Session, feed: Vec<(&str, Vec<usize>, Vec<f32>)>) -> [Vec<f32>; 3] {
    let values: Vec<(&str, ort::value::DynValue)> = feed
        .into_iter()
        .map(|(name, shape, data)| {
            (name, Tensor::from_array(ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap()).unwrap().into_dyn())
        })
        .collect();
    let out = s.run(values).unwrap();
    ["out", "new_key", "new_value"].map(|name| out[name].try_extract_tensor::<f32>().unwrap().1.to_vec())
}

/// One head RMS-normalised by `scale` and its first R values rotated, in f64.
fn norm_and_rotate(x: &[f32], scale: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let rms = (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64 + f64::from(EPS)).sqrt();
    let n: Vec<f64> = x.iter().zip(scale).map(|(&v, &w)| f64::from(v) / rms * f64::from(w)).collect();
    let half = R / 2;
    (0..x.len())
        .map(|i| match i {
            i if i < half => n[i] * f64::from(cos[i]) - n[i + half] * f64::from(sin[i]),
            i if i < R => n[i] * f64::from(cos[i]) + n[i - half] * f64::from(sin[i]),
            i => n[i],
        })
        .map(|v| v as f32)
        .collect()
}

#[test]
fn the_projection_form_equals_its_formulas_around_the_prepared_form() {
    let dir = tempfile::tempdir().unwrap();
    let (mut prepared, mut whole) = (session(dir.path(), false), session(dir.path(), true));
    let mut rng = StdRng::seed_from_u64(5);
    let mut draw = |n: usize, lo: f32, hi: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(lo..hi)).collect() };
    // One token stays on the calling thread; 70 are shared out in stretches of 32, the last short.
    for (t, p) in [(1, 9), (70, 5), (3, 0)] {
        let x = draw(t * WIDTH, -2.0, 2.0);
        let (q_norm, k_norm) = (draw(D, 0.5, 1.5), draw(D, 0.5, 1.5));
        let angles = draw(t * R, -3.0, 3.0);
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let (past_key, past_value) = (draw(p * HKV * D, -1.0, 1.0), draw(p * HKV * D, -1.0, 1.0));
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (i, row) in x.chunks_exact(WIDTH).enumerate() {
            let (cos, sin) = (&cos[i * R..(i + 1) * R], &sin[i * R..(i + 1) * R]);
            for h in 0..HQ {
                q.extend(norm_and_rotate(&row[2 * h * D..(2 * h + 1) * D], &q_norm, cos, sin));
            }
            let (keys, values) = row[2 * HQ * D..].split_at(HKV * D);
            for head in keys.chunks_exact(D) {
                k.extend(norm_and_rotate(head, &k_norm, cos, sin));
            }
            v.extend_from_slice(values);
        }
        let cache = |name, data: &Vec<f32>| (name, vec![1, p, HKV, D], data.clone());
        let [out, new_key, new_value] = run(
            &mut prepared,
            vec![
                ("q", vec![1, t, HQ, D], q),
                ("k", vec![1, t, HKV, D], k),
                ("v", vec![1, t, HKV, D], v),
                cache("past_key", &past_key),
                cache("past_value", &past_value),
            ],
        );
        let [got, got_key, got_value] = run(
            &mut whole,
            vec![
                ("qgkv", vec![1, t, WIDTH], x.clone()),
                ("q_norm", vec![D], q_norm),
                ("k_norm", vec![D], k_norm),
                ("cos", vec![1, t, 1, R], cos),
                ("sin", vec![1, t, 1, R], sin),
                cache("past_key", &past_key),
                cache("past_value", &past_value),
            ],
        );
        let close = |a: f32, b: f64, what: &str| {
            assert!((f64::from(a) - b).abs() <= 2e-5 * b.abs().max(1.0), "t = {t}, {what}: {a} vs {b}");
        };
        for (a, b) in got_key.iter().zip(&new_key).chain(got_value.iter().zip(&new_value)) {
            close(*a, f64::from(*b), "keys and values");
        }
        assert_eq!(got.len(), t * HQ * D);
        for (i, (&a, &o)) in got.iter().zip(&out).enumerate() {
            let (tok, h, j) = (i / (HQ * D), i / D % HQ, i % D);
            let gate = f64::from(x[tok * WIDTH + (2 * h + 1) * D + j]);
            close(a, f64::from(o) / (1.0 + (-gate).exp()), "gated output");
        }
    }
}

/// The projection form's error for a projection `[1, 1, width]` over a cache of `[1, 0, heads, d]`.
fn refusal(width: usize, heads: usize, d: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut whole = session(dir.path(), true);
    let values: Vec<(&str, ort::value::DynValue)> = [
        ("qgkv", vec![1, 1, width]),
        ("q_norm", vec![D]),
        ("k_norm", vec![D]),
        ("cos", vec![1, 1, 1, R]),
        ("sin", vec![1, 1, 1, R]),
        ("past_key", vec![1, 0, heads, d]),
        ("past_value", vec![1, 0, heads, d]),
    ]
    .into_iter()
    .map(|(name, shape)| {
        let n = shape.iter().product();
        (name, Tensor::from_array(ArrayD::from_shape_vec(IxDyn(&shape), vec![0.5f32; n]).unwrap()).unwrap().into_dyn())
    })
    .collect();
    let Err(e) = whole.run(values) else { panic!("a projection of width {width} over a cache of {heads} x {d} is refused") };
    e.to_string()
}

#[test]
fn a_projection_of_the_wrong_width_is_refused_with_its_shape() {
    let e = refusal(WIDTH - D, HKV, D);
    assert!(e.contains("qgkv must be [B, S, 384]") && e.contains("[1, 1, 352]"), "{e}");
}

#[test]
fn a_cache_of_the_wrong_shape_is_named_before_the_projection_is_judged_by_it() {
    // The head width is read from the cache, so a wrong cache must not be reported as a wrong
    // projection (for a width of 0, "qgkv must be [B, S, 0]").
    for (heads, d) in [(HKV + 1, D), (HKV, 0)] {
        let e = refusal(WIDTH, heads, d);
        assert!(e.contains("past_key must be [B, P, 2, D] with D > 0") && e.contains(&format!("[1, 0, {heads}, {d}]")), "{e}");
        assert!(!e.contains("qgkv"), "{e}");
    }
}

/// The prepared form over a batch whose rows read `past_lengths` of one padded cache.
fn batch_session(dir: &std::path::Path) -> Session {
    let path = dir.join("attention-lengths.onnx");
    let mut b = GraphBuilder::new("attention", &path).unwrap();
    let dims = |rest: &[usize]| -> Vec<Dim> {
        [Dim::Named("b"), Dim::Named("t")].into_iter().chain(rest.iter().map(|&d| Dim::Fixed(d as i64))).collect()
    };
    let past = [Dim::Named("b"), Dim::Named("p"), Dim::Fixed(HKV as i64), Dim::Fixed(D as i64)];
    b.input("q", data_type::FLOAT, &dims(&[HQ, D]));
    b.input("k", data_type::FLOAT, &dims(&[HKV, D]));
    b.input("v", data_type::FLOAT, &dims(&[HKV, D]));
    b.input("past_key", data_type::FLOAT, &past);
    b.input("past_value", data_type::FLOAT, &past);
    b.input("past_lengths", data_type::INT64, &[Dim::Named("rows")]);
    b.output("out", data_type::FLOAT, &dims(&[HQ * D]));
    b.output("new_key", data_type::FLOAT, &dims(&[HKV, D]));
    b.output("new_value", data_type::FLOAT, &dims(&[HKV, D]));
    b.node_named(
        "CausalAttention",
        deltadoc::ops::DOMAIN,
        &["q", "k", "v", "past_key", "past_value", "", "", "", "", "past_lengths"],
        &["out", "new_key", "new_value"],
        vec![("num_heads", Attr::Int(HQ as i64)), ("kv_num_heads", Attr::Int(HKV as i64))],
    );
    b.finish(&path, &[("", 23), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap()
}

/// `s` on batch rows of one new token each over caches `[B, P, HKV, D]` of which row b reads
/// `lengths[b]`: the output, or the op's error.
fn attend_rows(
    s: &mut Session,
    q: &[f32],
    kv: [&[f32]; 2],
    cache: [&[f32]; 2],
    p: usize,
    lengths: &[i64],
) -> Result<Vec<f32>, String> {
    let b = q.len() / (HQ * D);
    let t = |shape: Vec<usize>, data: &[f32]| {
        Tensor::from_array(ArrayD::from_shape_vec(IxDyn(&shape), data.to_vec()).unwrap()).unwrap().into_dyn()
    };
    let values: Vec<(&str, ort::value::DynValue)> = vec![
        ("q", t(vec![b, 1, HQ, D], q)),
        ("k", t(vec![b, 1, HKV, D], kv[0])),
        ("v", t(vec![b, 1, HKV, D], kv[1])),
        ("past_key", t(vec![b, p, HKV, D], cache[0])),
        ("past_value", t(vec![b, p, HKV, D], cache[1])),
        ("past_lengths", Tensor::from_array(ndarray::Array1::from_vec(lengths.to_vec())).unwrap().into_dyn()),
    ];
    let out = s.run(values).map_err(|e| e.to_string())?;
    Ok(out["out"].try_extract_tensor::<f32>().unwrap().1.to_vec())
}

#[test]
fn each_batch_row_reads_only_its_own_length_of_the_cache_and_a_length_past_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = batch_session(dir.path());
    let mut rng = StdRng::seed_from_u64(9);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let row = HKV * D;
    let (q, k, v) = (draw(2 * HQ * D), draw(2 * row), draw(2 * row));
    // Row 0 reads all p positions, row 1 its first `short`; the rest of row 1 is never read. At
    // 2,100 positions row 0's keys are split across the threads (decode over a long cache) while
    // row 1's 1,500 are not, as when each is alone: bit for bit what each gives alone.
    for (p, short) in [(6, 2), (2100, 1500)] {
        let (pk, pv) = (draw(2 * p * row), draw(2 * p * row));
        let both = attend_rows(&mut s, &q, [&k, &v], [&pk, &pv], p, &[p as i64, short as i64]).unwrap();
        let (fk, fv) = (&pk[..p * row], &pv[..p * row]);
        let first = attend_rows(&mut s, &q[..HQ * D], [&k[..row], &v[..row]], [fk, fv], p, &[p as i64]).unwrap();
        let (rk, rv) = (&pk[p * row..(p + short) * row], &pv[p * row..(p + short) * row]);
        let second = attend_rows(&mut s, &q[HQ * D..], [&k[row..], &v[row..]], [rk, rv], short, &[short as i64]).unwrap();
        assert_eq!(both[..HQ * D], first[..], "{p} positions: row 0");
        assert_eq!(both[HQ * D..], second[..], "{p} positions: row 1");
    }
    let p = 6;
    let (pk, pv) = (draw(2 * p * row), draw(2 * p * row));

    for lengths in [&[7, 2][..], &[-1, 2], &[6]] {
        let e = attend_rows(&mut s, &q, [&k, &v], [&pk, &pv], p, lengths).unwrap_err();
        assert!(e.contains("past_lengths must hold 2 lengths of at most the cache's 6 rows"), "{lengths:?}: {e}");
    }
}
