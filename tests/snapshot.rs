//! Snapshots of the decoder state: restoring one (from memory or from disk, into the same or a
//! new session) continues the sequence bit for bit.

mod common;

use common::*;
use deltadoc::generate::{Decoder, Logits};
use deltadoc::model::ExportOptions;
use deltadoc::model::graph::{KvCache, LinearAttn};
use deltadoc::model::quant::Precision;
use deltadoc::runtime::SessionOptions;
use deltadoc::snapshot::Snapshot;

fn decoder(fx: &str) -> Decoder {
    decoder_with(fx, KvCache::F32)
}

fn decoder_with(fx: &str, kv_cache: KvCache) -> Decoder {
    let opts = ExportOptions { precision: Precision::Fp32, quant_block: None, linear_attn: LinearAttn::Deltadoc, kv_cache };
    Decoder::open(&open(&imported_with(fx, opts)), &SessionOptions::with_threads(2)).unwrap()
}

/// Logits of `tail` (prefilled in one call, then two decode steps) after the current state.
fn continue_with(dec: &mut Decoder, tail: &[u32]) -> Vec<f32> {
    let mut out: Vec<f32> = dec.forward(&tail[..tail.len() - 2], Logits::All).unwrap().iter().copied().collect();
    for &t in &tail[tail.len() - 2..] {
        out.extend(dec.forward(&[t], Logits::All).unwrap().iter().copied());
    }
    out
}

#[test]
fn prefix_reuse_is_bit_exact_in_memory_and_on_disk() {
    // Every cache type: the half-width ones travel through the snapshot as their own element type.
    let cases = ["dense4", "gqa8"].into_iter().flat_map(|fx| [KvCache::F32, KvCache::F16, KvCache::Bf16].map(|kv| (fx, kv)));
    for (fx, kv_cache) in cases {
        let g = Golden::load(fx);
        let ids = g.ids("ids.long");
        let (prefix, stage_a, stage_b) = (&ids[..100], &ids[100..130], &ids[130..]);

        // Uninterrupted: prefix then stage A.
        let mut dec = decoder_with(fx, kv_cache);
        dec.forward(prefix, Logits::Last).unwrap();
        let want = continue_with(&mut dec, stage_a);

        // Prefix once, snapshot, run another stage, restore, then stage A.
        dec.reset().unwrap();
        dec.forward(prefix, Logits::Last).unwrap();
        let snap = dec.snapshot().unwrap();
        assert_eq!(snap.tokens, 100);
        continue_with(&mut dec, stage_b);
        dec.restore(&snap).unwrap();
        assert_eq!(dec.tokens(), 100);
        let got = continue_with(&mut dec, stage_a);
        assert!(got == want, "{fx}/{kv_cache:?}: in-memory restore differs (max |Δ| {:e})", max_abs(&got, &want));

        // Through a file, into a fresh session.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefix.ddsnap");
        snap.save(&path).unwrap();
        let loaded = Snapshot::load(&path).unwrap();
        assert_eq!(loaded, snap);
        let mut fresh = decoder_with(fx, kv_cache);
        fresh.restore(&loaded).unwrap();
        let got = continue_with(&mut fresh, stage_a);
        assert!(got == want, "{fx}/{kv_cache:?}: restore from disk differs (max |Δ| {:e})", max_abs(&got, &want));
        println!("{fx}/{kv_cache:?}: {} bytes of state after 100 tokens; restored continuation bit-identical", snap.bytes());
    }
}

#[test]
fn a_snapshot_only_fits_its_own_model() {
    let g = Golden::load("gqa8");
    let mut dec = decoder("gqa8");
    dec.forward(&g.ids("ids.short"), Logits::Last).unwrap();
    let snap = dec.snapshot().unwrap();
    let mut other = decoder("dense4");
    let e = format!("{:#}", other.restore(&snap).unwrap_err());
    assert!(e.contains("snapshot belongs to model"), "{e}");
    // A hand-edited snapshot with a wrong shape is refused too.
    let mut bad = snap.clone();
    bad.tensors[0].shape[1] += 1;
    let e = format!("{:#}", dec.restore(&bad).unwrap_err());
    assert!(e.contains("does not fit"), "{e}");
}

#[test]
fn an_interrupted_prefill_resumes_bit_exact() {
    let g = Golden::load("gqa8");
    let ids = g.ids("ids.long"); // 150 tokens
    let (chunk, every) = (16, 40); // checkpoints after tokens 48, 96, 144
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("prefill.ddsnap");

    let mut dec = decoder("gqa8");
    let want = dec.prefill(&ids, chunk, |_, _| Ok(())).unwrap();

    // A "crash" after 7 chunks (112 tokens): the last checkpoint is at token 96.
    let err = dec
        .prefill_resumable(
            &ids,
            chunk,
            &ckpt,
            every,
            |done, _| {
                if done >= 112 { anyhow::bail!("simulated crash") } else { Ok(()) }
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("simulated crash"));
    assert!(ckpt.is_file());

    // A new process (new session) picks it up.
    let mut fresh = decoder("gqa8");
    let mut calls = Vec::new();
    let r = fresh
        .prefill_resumable(&ids, chunk, &ckpt, every, |done, n| {
            calls.push((done, n));
            Ok(())
        })
        .unwrap();
    assert_eq!(r.resumed_at, 96);
    // The restored prefix is reported first, as done but not computed; then each chunk.
    assert_eq!(calls[..3], [(96, 0), (112, 16), (128, 16)]);
    assert_eq!(calls.last(), Some(&(150, 6)));
    assert!(r.logits == want, "resumed prefill differs: max |Δ| {:e}", max_abs(&r.logits, &want));
    assert!(r.checkpoint_bytes > 0);
    assert!(!ckpt.is_file(), "checkpoint removed once the prefill completed");

    // A checkpoint of another prompt is ignored, not applied.
    let mut other = ids.clone();
    other[5] ^= 1;
    let _ = dec.prefill_resumable(&other, chunk, &ckpt, every, |done, _| if done >= 64 { anyhow::bail!("stop") } else { Ok(()) });
    let r = fresh.prefill_resumable(&ids, chunk, &ckpt, every, |_, _| Ok(())).unwrap();
    assert_eq!(r.resumed_at, 0);
    assert!(r.logits == want);
}

#[test]
fn a_resumed_bench_adds_the_earlier_runs_time_and_peak() {
    use deltadoc::bench::{self, BenchOptions, Mark};
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("bench.ddsnap");
    let model = open(&imported("gqa8", Precision::Fp32));
    let (chunk, every, tokens) = (16, 32, 150);
    let prompt = bench::random_prompt(&model.manifest.config, tokens, 7);
    let session = SessionOptions::with_threads(2);
    let opts = BenchOptions {
        prompt_tokens: tokens,
        gen_tokens: 2,
        prefill_chunk: chunk,
        seed: 7,
        stages: 1,
        stage_tokens: 1,
        batch: 1,
        checkpoint: Some((ckpt.clone(), every)),
    };
    // An earlier run of the same bench died after token 112; its last checkpoint is at 96, where
    // its log says the prefill had taken 1000 s and 1 TiB.
    let crash = || {
        let mut dec = Decoder::open(&model, &session).unwrap();
        let _ = dec.prefill_resumable(
            &prompt,
            chunk,
            &ckpt,
            every,
            |done, _| {
                if done > 100 { anyhow::bail!("killed") } else { Ok(()) }
            },
        );
    };
    crash();
    let log = bench::timing_log(&ckpt);
    let earlier = Mark { tokens: 96, prefill_s: 1000.0, peak_rss_bytes: 1 << 40 };
    let lost = Mark { tokens: 112, prefill_s: 1010.0, peak_rss_bytes: 1 << 40 };
    let line = |m: &Mark| serde_json::to_string(m).unwrap();
    std::fs::write(&log, format!("{}\n{}\n{{\"tokens\":12", line(&earlier), line(&lost))).unwrap();

    let r = bench::run(&model, &session, &opts).unwrap();
    assert_eq!((r.resumed_from_token, r.timed_from_token), (96, 0));
    assert!(r.prefill_tokens_per_s < 150.0 / 1000.0, "{r:?}");
    assert!(r.ttft_s > 1000.0);
    assert_eq!(r.peak_rss_bytes, 1 << 40);
    assert!(r.checkpoint_bytes > 0 && !ckpt.is_file());
    // The log keeps the marks up to the resume point (not the dead run's work past it, nor its
    // torn line), then one per chunk computed by the new run.
    let marks = bench::read_marks(&log);
    let tokens_seen: Vec<usize> = marks.iter().map(|m| m.tokens).collect();
    assert_eq!(tokens_seen, [96, 112, 128, 144, 150]);
    assert!(marks.windows(2).all(|w| w[1].prefill_s > w[0].prefill_s && w[1].peak_rss_bytes == 1 << 40));
    assert!(marks[1] != lost);

    // Without the earlier run's timing the rate covers only what this run computed.
    crash();
    std::fs::remove_file(&log).unwrap();
    let r = bench::run(&model, &session, &opts).unwrap();
    assert_eq!((r.resumed_from_token, r.timed_from_token), (96, 96));
    // A fresh run (no checkpoint) starts a new log.
    let r = bench::run(&model, &session, &opts).unwrap();
    assert_eq!((r.resumed_from_token, r.timed_from_token), (0, 0));
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), tokens.div_ceil(chunk));
}
