//! `deltadoc bench`: prefill and decode speed, time to first token, peak memory and carried state
//! of one model folder on random prompt tokens.

use std::time::Instant;

use anyhow::{Result, bail};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::generate::{Decoder, Logits, argmax};
use crate::model::ModelDir;
use crate::progress::Progress;
use crate::runtime::SessionOptions;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens to decode after the prompt (greedy).
    pub gen_tokens: usize,
    /// Prompt tokens per prefill call.
    pub prefill_chunk: usize,
    /// Seed of the random prompt.
    pub seed: u64,
    /// Stages run on the same prompt through a snapshot (1 = no prefix reuse measured).
    pub stages: usize,
    /// Instruction tokens each stage prefills after the restored prompt.
    pub stage_tokens: usize,
}

/// One measurement; the first five fields are the stable keys of `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Prompt tokens per second of prefill (all chunks, logits of the last token only).
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second after the first one.
    pub decode_tokens_per_s: f64,
    /// Seconds from the start of prefill to the first generated token.
    pub ttft_s: f64,
    /// Peak resident memory of the process (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// KV cache of the attention layers + conv and recurrent state, bytes, at the end.
    pub kv_state_bytes: u64,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub gen_tokens: usize,
    /// Prefill chunk.
    pub prefill_chunk: usize,
    /// Intra-op threads.
    pub threads: usize,
    /// Seconds to open the session (graph optimisation and weight loading).
    pub load_s: f64,
    /// Seconds of the untimed warm-up call (one prefill chunk, then a reset): ONNX Runtime's
    /// arena and the operators' buffers grow on the first call, which would otherwise count as
    /// prefill (llama-bench warms up too).
    pub warmup_s: f64,
    /// Weight precision of the model folder.
    pub precision: String,
    /// Which operators ran the DeltaNet layers.
    pub linear_attn: String,
    /// Where the weights came from.
    pub source: String,
    /// With `stages > 1`: seconds of each stage after the shared prefill (restore + instruction
    /// prefill + decode).
    pub stage_s: Vec<f64>,
    /// With `stages > 1`: (prefill + all stages) / (prefill + one stage); 1.0 would be free reuse.
    pub prefix_reuse_ratio: Option<f64>,
    /// Bytes of the prompt's snapshot.
    pub snapshot_bytes: usize,
}

/// Runs the benchmark on `model`.
pub fn run(model: &ModelDir, session: &SessionOptions, opts: &BenchOptions) -> Result<BenchReport> {
    let cfg = &model.manifest.config;
    if opts.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    if opts.prompt_tokens + opts.gen_tokens > cfg.max_position_embeddings {
        bail!(
            "{} prompt + {} generated tokens exceed the model's context of {}",
            opts.prompt_tokens,
            opts.gen_tokens,
            cfg.max_position_embeddings
        );
    }
    // Ordinary tokens only (no specials), within the model's vocabulary.
    let limit = cfg.vocab_size.min(crate::tokenizer::SPECIAL_START as usize) as u32;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let prompt: Vec<u32> = (0..opts.prompt_tokens).map(|_| rng.random_range(0..limit)).collect();

    let t_load = Instant::now();
    let mut dec = Decoder::open(model, session)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let t_warm = Instant::now();
    dec.forward(&prompt[..opts.prefill_chunk.clamp(1, prompt.len())], Logits::Last)?;
    dec.reset()?;
    let warmup_s = t_warm.elapsed().as_secs_f64();

    let mut progress = Progress::new(prompt.len() as u64, "prefill");
    let t0 = Instant::now();
    let last = dec.prefill(&prompt, opts.prefill_chunk, |n| {
        progress.inc(n as u64);
        Ok(())
    })?;
    let prefill_s = t0.elapsed().as_secs_f64();
    progress.finish();
    // Greedy over real tokens only (the padded vocabulary rows are never chosen).
    let pick = |row: &[f32]| argmax(&row[..limit as usize]);
    let tok = pick(&last);
    let ttft_s = t0.elapsed().as_secs_f64();

    let snap = if opts.stages > 1 { Some(dec.snapshot()?) } else { None };
    let decode = |dec: &mut Decoder, mut tok: u32| -> Result<()> {
        for _ in 1..opts.gen_tokens {
            let l = dec.forward(&[tok], Logits::Last)?;
            tok = pick(l.row(0).as_slice().expect("contiguous logits"));
        }
        Ok(())
    };
    let t1 = Instant::now();
    decode(&mut dec, tok)?;
    let decode_s = t1.elapsed().as_secs_f64();
    let decoded = opts.gen_tokens.saturating_sub(1);
    let kv_state_bytes = dec.state_bytes() as u64;

    // Prefix reuse: every stage continues the prefilled prompt with its own instruction.
    let mut stage_s = Vec::new();
    if let Some(snap) = &snap {
        for _ in 0..opts.stages {
            let instruction: Vec<u32> = (0..opts.stage_tokens.max(1)).map(|_| rng.random_range(0..limit)).collect();
            let t = Instant::now();
            dec.restore(snap)?;
            let l = dec.forward(&instruction, Logits::Last)?;
            decode(&mut dec, pick(l.row(0).as_slice().expect("contiguous logits")))?;
            stage_s.push(t.elapsed().as_secs_f64());
        }
    }
    let prefix_reuse_ratio = (!stage_s.is_empty()).then(|| (prefill_s + stage_s.iter().sum::<f64>()) / (prefill_s + stage_s[0]));

    Ok(BenchReport {
        prefill_tokens_per_s: opts.prompt_tokens as f64 / prefill_s,
        decode_tokens_per_s: if decoded > 0 { decoded as f64 / decode_s } else { 0.0 },
        ttft_s,
        peak_rss_bytes: crate::metrics::ProcessMemory::read().peak_bytes,
        kv_state_bytes,
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        prefill_chunk: opts.prefill_chunk,
        threads: session.threads,
        load_s,
        warmup_s,
        precision: model.manifest.precision.name().into(),
        linear_attn: format!("{:?}", model.manifest.linear_attn).to_lowercase(),
        source: model.manifest.source.clone(),
        stage_s,
        prefix_reuse_ratio,
        snapshot_bytes: snap.as_ref().map(|s| s.bytes()).unwrap_or(0),
    })
}
