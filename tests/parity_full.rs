//! Parity at the real 0.8B shape (vocabulary 248,320, 24 layers, random weights). The checkpoint
//! is ~3 GB, so it is made locally and this test is ignored by default:
//!
//!   .venv/bin/python onnx/make_goldens.py --shape-08b /tmp/big
//!   DELTADOC_FULL_FIXTURE=/tmp/big/qwen35-0.8b-random cargo test --release --test parity_full -- --ignored --nocapture
//!
//! Results go into onnx/README.md.

mod common;

use common::*;
use deltadoc::generate::{self, DecodeOptions, Decoder, Prefill, Sampling};
use deltadoc::model::quant::Precision;
use deltadoc::runtime::SessionOptions;

fn fixture() -> String {
    std::env::var("DELTADOC_FULL_FIXTURE").expect("set DELTADOC_FULL_FIXTURE to the folder make_goldens.py --shape-08b wrote")
}

#[test]
#[ignore = "needs a locally generated 0.8B-shape checkpoint (see the file's docs)"]
fn real_08b_shape_matches_transformers() {
    let fx = fixture();
    let g = Golden::load(&fx);
    let opts = SessionOptions::with_threads(2);
    for p in [Precision::Fp32, Precision::Fp16, Precision::Int8, Precision::Int4] {
        let t0 = std::time::Instant::now();
        let dir = imported(&fx, p);
        let import_s = t0.elapsed().as_secs_f64();
        let mut dec = Decoder::open(&open(&dir), &opts).unwrap();
        let ids = g.ids("ids.long");
        let (_, want) = g.f32("logits.long");
        let got = logits_in_chunks(&mut dec, &ids, 64);
        let v = want.len() / ids.len();
        let err = max_abs(&got, &want);
        let top1 = top1_agreement(&got, &want, v);
        println!(
            "0.8b/{}: import {import_s:.1}s; {} tokens in chunks of 64: max |Δlogit| = {err:.3e}, top-1 = {:.1}%",
            p.name(),
            ids.len(),
            top1 * 100.0
        );
        if p != Precision::Fp32 {
            continue;
        }
        assert!(err <= 1e-4, "fp32 max |Δlogit| {err:.3e}");
        // Prefill + decode through the recurrent kernel.
        dec.reset().unwrap();
        let ids = g.ids("decode.ids");
        let k = g.ids("decode.k")[0] as usize;
        let (_, want) = g.f32("decode.logits");
        let got = prefill_then_decode(&mut dec, &ids, k, 50);
        let err = max_abs(&got, &want);
        println!("0.8b/fp32: prefill {k} + decode {}: max |Δlogit| = {err:.3e}", ids.len() - k);
        assert!(err <= 1e-4, "decode path max |Δlogit| {err:.3e}");
        // Greedy.
        dec.reset().unwrap();
        let prefill = Prefill { chunk: 64, checkpoint: None };
        let o = DecodeOptions { max_new_tokens: 32, sampling: Sampling::default(), stop_tokens: vec![] };
        let (got, _) = generate::generate(&mut dec, &g.ids("greedy.prompt"), &prefill, &o, |_| Ok(())).unwrap();
        assert_eq!(got, g.ids("greedy.tokens"), "greedy tokens");
        println!("0.8b/fp32: greedy 32 tokens identical");
    }
}
