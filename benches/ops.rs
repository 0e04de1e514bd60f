//! Operators alone, side by side in one run, at one layer of the real 0.8B shape, 2 intra-op
//! threads:
//! - DeltaNet: deltadoc's `ai.deltadoc` ops against ONNX Runtime's built-in `com.microsoft`
//!   LinearAttention / CausalConvWithState (16 heads, 128×128 state, conv over 6144 channels);
//! - attention: deltadoc's blockwise `CausalAttentionF16` (f16 cache) and `CausalAttentionBF16`
//!   (bf16 cache, bf16 arithmetic where the CPU has AVX512_BF16) against ORT's
//!   `GroupQueryAttention` (f32 cache) (8 query heads, 2 KV heads, head width 256).
//!
//! - block-quantised matmul: deltadoc's `QuantMatMul` against ORT's `MatMulNBits` (the same codes
//!   and scales, activations quantised to int8 by both) at the 0.8B head and 0.8B and 9B layer shapes for
//!   M = 1, 4 and 16 rows, int8 in blocks of 128 and int4 in blocks of 32, each as weight GB/s and
//!   as a fraction of this machine's read bandwidth (measured in the same run).
//!
//!   cargo bench --bench ops [-- TOKENS [CALL_TOKENS [CONTEXT...]]]   (defaults 4096, 512, 4096 32768)
//!   cargo bench --bench ops -- matmul [SHAPE]                         (the matmul section alone)
//!
//! SHAPE picks the matmul shapes whose name contains it (e.g. `head`).
//!
//! Each DeltaNet op runs on TOKENS tokens in calls of CALL_TOKENS (state carried between calls),
//! as the model's chunked prefill feeds it; plus single-token decode steps. Attention runs one
//! call of CALL_TOKENS and one decode step after CONTEXT tokens of (random) cache. Prints ms and
//! the ratio.

use std::time::Instant;

#[path = "../tests/common/quant_node.rs"]
mod quant_node;

use deltadoc::onnx::proto::data_type;
use deltadoc::onnx::{Attr, Dim, GraphBuilder};
use deltadoc::runtime::{self, SessionOptions};
use ndarray::{ArrayD, IxDyn};
use ort::session::Session;
use ort::value::Tensor;
use quant_node::{Codes, Op};
use rand::{RngExt, SeedableRng, rngs::StdRng};

const HEADS: usize = 16;
const D: usize = 128;
const CONV_C: usize = 6144;
const K: usize = 4;
const Q_HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD: usize = 256;

fn random(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn tensor(shape: &[usize], data: Vec<f32>) -> ort::value::DynValue {
    Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), data).unwrap()).unwrap().into_dyn()
}

fn dims(d: &[i64]) -> Vec<Dim> {
    d.iter().map(|&x| if x < 0 { Dim::Named("t") } else { Dim::Fixed(x) }).collect()
}

/// Graph with one rule op: inputs q, k, v [1,T,H·D] (q/k already L2-normalised), g, beta [1,T,H],
/// state [1,H,D,D].
fn rule_graph(dir: &std::path::Path, builtin: bool) -> Session {
    let path = dir.join(if builtin { "rule_builtin.onnx" } else { "rule_deltadoc.onnx" });
    let mut b = GraphBuilder::new("rule", &path).unwrap();
    let hd = (HEADS * D) as i64;
    for n in ["q", "k", "v"] {
        b.input(n, data_type::FLOAT, &dims(&[1, -1, hd]));
    }
    for n in ["g", "beta"] {
        b.input(n, data_type::FLOAT, &dims(&[1, -1, HEADS as i64]));
    }
    let sd = [1, HEADS as i64, D as i64, D as i64];
    b.input("state", data_type::FLOAT, &dims(&sd));
    b.output("o", data_type::FLOAT, &dims(&[1, -1, hd]));
    b.output("state_out", data_type::FLOAT, &dims(&sd));
    let scale = Attr::Float((D as f32).powf(-0.5));
    if builtin {
        b.node_named(
            "LinearAttention",
            "com.microsoft",
            &["q", "k", "v", "state", "g", "beta"],
            &["o", "state_out"],
            vec![
                ("q_num_heads", Attr::Int(HEADS as i64)),
                ("kv_num_heads", Attr::Int(HEADS as i64)),
                ("update_rule", Attr::Str("gated_delta".into())),
                ("scale", scale),
                ("chunk_size", Attr::Int(64)),
            ],
        );
    } else {
        // use_qk_l2norm=1 as in the model graph: our op normalises, ORT's expects normalised input.
        b.node_named(
            "GatedDeltaRule",
            deltadoc::ops::DOMAIN,
            &["q", "k", "v", "g", "beta", "state"],
            &["o", "state_out"],
            vec![("num_k_heads", Attr::Int(HEADS as i64)), ("num_v_heads", Attr::Int(HEADS as i64)), ("scale", scale)],
        );
    }
    b.finish(&path, &[("", 23), ("com.microsoft", 1), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap()
}

/// Graph with one conv op: x [1,T,C] channels last (the model's layout), state [1,C,K−1].
fn conv_graph(dir: &std::path::Path, builtin: bool) -> Session {
    let path = dir.join(if builtin { "conv_builtin.onnx" } else { "conv_deltadoc.onnx" });
    let mut b = GraphBuilder::new("conv", &path).unwrap();
    b.input("x", data_type::FLOAT, &dims(&[1, -1, CONV_C as i64]));
    b.input("state", data_type::FLOAT, &dims(&[1, CONV_C as i64, K as i64 - 1]));
    b.output("y", data_type::FLOAT, &dims(&[1, -1, CONV_C as i64]));
    b.output("state_out", data_type::FLOAT, &dims(&[1, CONV_C as i64, K as i64 - 1]));
    let w = random(CONV_C * K, -0.5, 0.5, 9);
    let silu = || vec![("activation", Attr::Str("silu".into()))];
    if builtin {
        // As the exported model does: transpose to channels-first around ORT's op.
        let w3 = b.f32s("w", &[CONV_C as i64, 1, K as i64], &w).unwrap();
        let xt = b.op("Transpose", &["x"], vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
        b.node_named("CausalConvWithState", "com.microsoft", &[&xt, &w3, "", "state"], &["y_cf", "state_out"], silu());
        b.node_named("Transpose", "", &["y_cf"], &["y"], vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
    } else {
        let w2 = b.f32s("w", &[CONV_C as i64, K as i64], &w).unwrap();
        b.node_named("CausalConv1dWithState", deltadoc::ops::DOMAIN, &["x", &w2, "state"], &["y", "state_out"], silu());
    }
    b.finish(&path, &[("", 23), ("com.microsoft", 1), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap()
}

fn l2norm_rows(x: &mut [f32]) {
    for row in x.chunks_exact_mut(D) {
        let n = (row.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
        row.iter_mut().for_each(|v| *v /= n);
    }
}

/// Seconds to run `tokens` through the rule op in calls of `call`, state carried; best of 3.
fn time_rule(s: &mut Session, tokens: usize, call: usize) -> f64 {
    let hd = HEADS * D;
    let mut q = random(tokens * hd, -1.0, 1.0, 1);
    let mut k = random(tokens * hd, -1.0, 1.0, 2);
    l2norm_rows(&mut q);
    l2norm_rows(&mut k);
    let v = random(tokens * hd, -1.0, 1.0, 3);
    let g = random(tokens * HEADS, -0.5, -0.01, 4);
    let beta = random(tokens * HEADS, 0.05, 0.95, 5);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut state = tensor(&[1, HEADS, D, D], vec![0.0; HEADS * D * D]);
        let t0 = Instant::now();
        let mut start = 0;
        while start < tokens {
            let n = call.min(tokens - start);
            let slice = |x: &[f32], w: usize| x[start * w..(start + n) * w].to_vec();
            let inputs = vec![
                ("q", tensor(&[1, n, hd], slice(&q, hd))),
                ("k", tensor(&[1, n, hd], slice(&k, hd))),
                ("v", tensor(&[1, n, hd], slice(&v, hd))),
                ("g", tensor(&[1, n, HEADS], slice(&g, HEADS))),
                ("beta", tensor(&[1, n, HEADS], slice(&beta, HEADS))),
                ("state", state),
            ];
            let mut out = s.run(inputs).unwrap();
            state = out.remove("state_out").unwrap();
            start += n;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best
}

/// Seconds to run `tokens` through the conv op in calls of `call`; best of 3.
fn time_conv(s: &mut Session, tokens: usize, call: usize) -> f64 {
    let x = random(tokens * CONV_C, -1.0, 1.0, 6);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut state = tensor(&[1, CONV_C, K - 1], vec![0.0; CONV_C * (K - 1)]);
        let t0 = Instant::now();
        let mut start = 0;
        while start < tokens {
            let n = call.min(tokens - start);
            let xs = tensor(&[1, n, CONV_C], x[start * CONV_C..(start + n) * CONV_C].to_vec());
            let mut out = s.run(vec![("x", xs), ("state", state)]).unwrap();
            state = out.remove("state_out").unwrap();
            start += n;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best
}

/// Which attention op, by its cache: ORT's GroupQueryAttention (f32) or deltadoc's f16 / bf16 op.
#[derive(Clone, Copy, PartialEq)]
enum Cache {
    OrtF32,
    F16,
    Bf16,
}

/// Graph with one attention op: q [1,S,Hq·D], k, v [1,S,Hkv·D], past_key/past_value
/// ([1,Hkv,P,D] for ORT, which returns the grown cache; [1,P,Hkv,D] for deltadoc, which returns
/// the call's rows for the caller to append) and, for ORT, its sequence-length inputs.
fn attention_graph(dir: &std::path::Path, cache: Cache) -> Session {
    let (name, cache_ty, op) = match cache {
        Cache::OrtF32 => ("attn_builtin.onnx", data_type::FLOAT, "GroupQueryAttention"),
        Cache::F16 => ("attn_f16.onnx", data_type::FLOAT16, "CausalAttentionF16"),
        Cache::Bf16 => ("attn_bf16.onnx", data_type::BFLOAT16, "CausalAttentionBF16"),
    };
    let builtin = cache == Cache::OrtF32;
    let path = dir.join(name);
    let mut b = GraphBuilder::new("attn", &path).unwrap();
    let (q, kv) = ((Q_HEADS * HEAD) as i64, (KV_HEADS * HEAD) as i64);
    b.input("q", data_type::FLOAT, &dims(&[1, -1, q]));
    b.input("k", data_type::FLOAT, &dims(&[1, -1, kv]));
    b.input("v", data_type::FLOAT, &dims(&[1, -1, kv]));
    let (heads, head) = (Dim::Fixed(KV_HEADS as i64), Dim::Fixed(HEAD as i64));
    let (cache, present) = if builtin {
        let c = [Dim::Fixed(1), heads, Dim::Named("p"), head];
        (c.clone(), c)
    } else {
        ([Dim::Fixed(1), Dim::Named("p"), heads.clone(), head.clone()], [Dim::Fixed(1), Dim::Named("s"), heads, head])
    };
    b.input("past_key", cache_ty, &cache);
    b.input("past_value", cache_ty, &cache);
    b.output("out", data_type::FLOAT, &dims(&[1, -1, q]));
    b.output("present_key", cache_ty, &present);
    b.output("present_value", cache_ty, &present);
    let heads = vec![
        ("num_heads", Attr::Int(Q_HEADS as i64)),
        ("kv_num_heads", Attr::Int(KV_HEADS as i64)),
        ("scale", Attr::Float((HEAD as f32).powf(-0.5))),
    ];
    if builtin {
        b.input("seqlens_k", data_type::INT32, &[Dim::Fixed(1)]);
        b.input("total_sequence_length", data_type::INT32, &[]);
        b.node_named(
            op,
            "com.microsoft",
            &["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
            &["out", "present_key", "present_value"],
            heads,
        );
    } else {
        let shape = |b: &mut GraphBuilder, x: &str, h: usize| b.reshape(x, &[0, 0, h as i64, HEAD as i64]).unwrap();
        let (q4, k4, v4) = (shape(&mut b, "q", Q_HEADS), shape(&mut b, "k", KV_HEADS), shape(&mut b, "v", KV_HEADS));
        let out = b.fresh("out");
        b.node_named(
            op,
            deltadoc::ops::DOMAIN,
            &[&q4, &k4, &v4, "past_key", "past_value"],
            &[&out, "present_key", "present_value"],
            heads,
        );
        b.node_named("Identity", "", &[&out], &["out"], vec![]);
    }
    b.finish(&path, &[("", 23), ("com.microsoft", 1), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap()
}

/// Seconds of one attention call of `n` new tokens after `past` cached ones; best of 3.
fn time_attention(s: &mut Session, kind: Cache, past: usize, n: usize) -> f64 {
    let cache_len = KV_HEADS * past * HEAD;
    let builtin = kind == Cache::OrtF32;
    let cache = |seed| -> ort::value::DynValue {
        let data = random(cache_len, -1.0, 1.0, seed);
        let shape = if builtin { [1, KV_HEADS, past, HEAD] } else { [1, past, KV_HEADS, HEAD] };
        match kind {
            Cache::OrtF32 => tensor(&shape, data),
            Cache::F16 => narrow(&shape, data.iter().map(|&x| half::f16::from_f32(x)).collect()),
            Cache::Bf16 => narrow(&shape, data.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        }
    };
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut inputs = vec![
            ("q", tensor(&[1, n, Q_HEADS * HEAD], random(n * Q_HEADS * HEAD, -1.0, 1.0, 10))),
            ("k", tensor(&[1, n, KV_HEADS * HEAD], random(n * KV_HEADS * HEAD, -1.0, 1.0, 11))),
            ("v", tensor(&[1, n, KV_HEADS * HEAD], random(n * KV_HEADS * HEAD, -1.0, 1.0, 12))),
            ("past_key", cache(7)),
            ("past_value", cache(8)),
        ];
        if builtin {
            let total = (past + n) as i32;
            inputs.push(("seqlens_k", Tensor::from_array(([1usize], vec![total - 1])).unwrap().into_dyn()));
            inputs.push(("total_sequence_length", Tensor::from_array(((), vec![total])).unwrap().into_dyn()));
        }
        let t0 = Instant::now();
        s.run(inputs).unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best
}

/// A tensor of 16-bit floats.
fn narrow<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
    shape: &[usize],
    data: Vec<T>,
) -> ort::value::DynValue {
    Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), data).unwrap()).unwrap().into_dyn()
}

/// Weights a decode step streams: more than any cache holds, so each matmul reads its weights
/// from memory as the model's layers do one after another.
const STREAMED_BYTES: usize = 768 << 20;

/// Graph of `copies` independent `[n, k]` matmuls of one input `x [m, k]`, each with its own
/// random weights: deltadoc's `QuantMatMul` or ORT's `MatMulNBits` (accuracy level 4, as the
/// model graph).
fn matmul_graph(dir: &std::path::Path, (n, k): (usize, usize), bits: u32, block: usize, copies: usize, ours: bool) -> Session {
    let path = dir.join(format!("matmul_{n}x{k}_{bits}_{ours}.onnx"));
    let mut b = GraphBuilder::new("matmul", &path).unwrap();
    b.input("x", data_type::FLOAT, &[Dim::Named("m"), Dim::Fixed(k as i64)]);
    let blocks = k.div_ceil(block);
    let blob = block * bits as usize / 8;
    let mut rng = StdRng::seed_from_u64(11);
    for c in 0..copies {
        let codes: Vec<u8> = (0..n * blocks * blob).map(|_| rng.random()).collect();
        let scales: Vec<f32> = (0..n * blocks).map(|_| rng.random_range(0.001f32..0.01)).collect();
        let out = format!("y{c}");
        b.output(&out, data_type::FLOAT, &[Dim::Named("m"), Dim::Fixed(n as i64)]);
        // The same codes and scales: as they are for MatMulNBits (accuracy level 4, as the
        // model graph had it), packed in panels for ours.
        let op = if ours { Op::Ours } else { Op::NBits(4) };
        quant_node::add(&mut b, op, &Codes { codes: &codes, scales: &scales, n, k, bits, block }, "x", &[], vec![], &out);
    }
    b.finish(&path, &[("", 23), ("com.microsoft", 1), (deltadoc::ops::DOMAIN, 1)], &[]).unwrap();
    runtime::open_session(&path, &SessionOptions::with_threads(2)).unwrap()
}

/// Seconds for one run of all the matmuls of `s` on `m` rows; best of 5 after a warm-up.
fn time_matmul(s: &mut Session, m: usize, k: usize) -> f64 {
    let x = random(m * k, -1.0, 1.0, 12);
    let mut best = f64::MAX;
    for round in 0..6 {
        let t0 = Instant::now();
        s.run(vec![("x", tensor(&[m, k], x.clone()))]).unwrap();
        if round > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    best
}

/// This machine's read bandwidth, bytes per second: 1 GiB of f32 summed by 2 threads, a half
/// each, in 16 independent lanes (so the sum vectorises); best of 3.
fn read_bandwidth() -> f64 {
    let data = random(1 << 28, 0.0, 1.0, 13);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let halves: Vec<_> = data
                .chunks(data.len() / 2)
                .map(|half| {
                    s.spawn(move || {
                        let mut acc = [0f32; 16];
                        for c in half.chunks_exact(16) {
                            for l in 0..16 {
                                acc[l] += c[l];
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            halves.into_iter().map(|h| h.join().unwrap()).sum()
        });
        std::hint::black_box(total);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / best
}

/// The matmul section: both operators at each shape whose name contains `only` (all for ""),
/// precision and M.
fn matmul_section(dir: &std::path::Path, only: &str) {
    let ceiling = read_bandwidth();
    println!(
        "block-quantised matmul, 2 threads, {} MB of weights per run; read bandwidth {:.1} GB/s; deltadoc isa {:?}",
        STREAMED_BYTES >> 20,
        ceiling / 1e9,
        deltadoc::ops::quant_matmul::Isa::detect()
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8} {:>16} {:>16}",
        "shape (N x K), precision, M", "deltadoc ms", "ORT ms", "ratio", "deltadoc GB/s", "ORT GB/s"
    );
    let shapes: [(&str, (usize, usize)); 6] = [
        ("0.8B head", (248320, 1024)),
        ("0.8B qkv", (6144, 1024)),
        ("0.8B mlp up", (3584, 1024)),
        ("0.8B mlp down", (1024, 3584)),
        ("9B mlp up", (12288, 4096)),
        ("9B mlp down", (4096, 12288)),
    ];
    for (name, (n, k)) in shapes.into_iter().filter(|(name, _)| name.contains(only)) {
        for (bits, block) in [(8u32, 128usize), (4, 32)] {
            let bytes = n * k.div_ceil(block) * (block * bits as usize / 8 + 4);
            let copies = STREAMED_BYTES.div_ceil(bytes);
            // Its own folder, removed after the shape: the graphs of every shape together (2 × 768
            // MB each) filled a 15 GB temporary disk.
            let shape_dir = tempfile::tempdir_in(dir).unwrap();
            let mut ours = matmul_graph(shape_dir.path(), (n, k), bits, block, copies, true);
            let mut theirs = matmul_graph(shape_dir.path(), (n, k), bits, block, copies, false);
            for m in [1, 4, 16, 64, 512] {
                let (a, b) = (time_matmul(&mut ours, m, k), time_matmul(&mut theirs, m, k));
                let gbs = |t: f64| (bytes * copies) as f64 / t / 1e9;
                println!(
                    "{:<34} {:>12.3} {:>12.3} {:>7.2}x {:>8.1} ({:>3.0}%) {:>8.1} ({:>3.0}%)",
                    format!("{name} {n}x{k} int{bits}/{block} M={m}"),
                    a * 1e3 / copies as f64,
                    b * 1e3 / copies as f64,
                    b / a,
                    gbs(a),
                    gbs(a) * 1e11 / ceiling,
                    gbs(b),
                    gbs(b) * 1e11 / ceiling
                );
            }
        }
    }
}

/// One result line: milliseconds per `per` repetitions for both, and ORT's time over ours.
fn row(what: &str, ours: f64, ort: f64, per: usize) {
    let ms = |s: f64| s * 1e3 / per as f64;
    println!("{what:<34} {:>12.3} {:>12.3} {:>7.2}x", ms(ours), ms(ort), ort / ours);
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if let Some(at) = args.iter().position(|a| a == "matmul") {
        matmul_section(dir.path(), args.get(at + 1).map_or("", |s| s.as_str()));
        return;
    }
    let args: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let tokens = args.first().copied().unwrap_or(4096);
    let call = args.get(1).copied().unwrap_or(512);
    println!("one 0.8B DeltaNet layer (16 heads, 128x128 state, conv 6144 ch), 2 threads; {tokens} tokens in calls of {call}");
    println!("{:<34} {:>12} {:>12} {:>8}", "op", "deltadoc ms", "ORT ms", "ratio");
    let steps = 64;
    let (mut ours, mut theirs) = (rule_graph(dir.path(), false), rule_graph(dir.path(), true));
    row("gated delta rule, prefill", time_rule(&mut ours, tokens, call), time_rule(&mut theirs, tokens, call), 1);
    row("gated delta rule, decode/tok", time_rule(&mut ours, steps, 1), time_rule(&mut theirs, steps, 1), steps);
    let (mut ours, mut theirs) = (conv_graph(dir.path(), false), conv_graph(dir.path(), true));
    row("causal conv, prefill", time_conv(&mut ours, tokens, call), time_conv(&mut theirs, tokens, call), 1);
    row("causal conv, decode/tok", time_conv(&mut ours, steps, 1), time_conv(&mut theirs, steps, 1), steps);
    let contexts: Vec<usize> = if args.len() > 2 { args[2..].to_vec() } else { vec![4096, 32768] };
    println!(
        "one 0.8B attention layer (8 query heads, 2 KV heads, width 256): deltadoc f16 / bf16 cache vs ORT GroupQueryAttention f32 cache; bf16 arithmetic on this CPU: {}",
        deltadoc::ops::attention::bf16_arithmetic(HEAD)
    );
    let mut theirs = attention_graph(dir.path(), Cache::OrtF32);
    let mut ours = [(Cache::F16, "f16"), (Cache::Bf16, "bf16")].map(|(c, name)| (c, name, attention_graph(dir.path(), c)));
    for past in contexts {
        for n in [call, 1] {
            let ort = time_attention(&mut theirs, Cache::OrtF32, past, n);
            for (cache, name, session) in &mut ours {
                let what = if n == 1 {
                    format!("attention {name}, decode at {past}")
                } else {
                    format!("attention {name}, {n} after {past}")
                };
                row(&what, time_attention(session, *cache, past, n), ort, 1);
            }
        }
    }
    matmul_section(dir.path(), "");
    println!("ratio = ORT time / deltadoc time (> 1: deltadoc faster)");
}
