//! `deltadoc bench`: prefill and decode speed, time to first token, peak memory against the
//! plan, prefix reuse; the measurement is [`crate::bench`], the report is here.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{Outcome, mib};
use crate::bench::{BenchOptions, BenchReport};
use crate::generate::DEFAULT_PREFILL_CHUNK;
use crate::model::ModelDir;
use crate::runtime::SessionOptions;

/// What `deltadoc bench` takes.
#[derive(Args)]
pub(super) struct BenchArgs {
    /// Model folder (from `model import` or `model synth`).
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens (random ordinary tokens, seeded).
    #[arg(long)]
    prompt_tokens: usize,
    /// Tokens to generate greedily after the prompt.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Tokens per prefill call: longer calls run faster and hold larger activations.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Run this many stages on the prompt through a snapshot (prefix reuse): one after another,
    /// then as the pipeline runs them, decoded together.
    #[arg(long, default_value_t = 1)]
    stages: usize,
    /// Instruction tokens per stage.
    #[arg(long, default_value_t = 32)]
    stage_tokens: usize,
    /// Also decode this many sequences together, one step for all (copies of the prompt's state,
    /// each from its own first token), and report their tokens per second together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Make the prefill resumable (a 262K prompt is hours): save the state to this file every
    /// --checkpoint-every tokens; rerunning the same command resumes, and the report counts
    /// the time of the earlier runs (FILE.timing.jsonl keeps it, and the rate at every depth).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Tokens between checkpoints; 0 saves none and only writes the timing log.
    #[arg(long, default_value_t = 8192)]
    checkpoint_every: usize,
    /// Have ONNX Runtime profile every node of every run (its own nodes among deltadoc's) and
    /// write the trace to PREFIX_<date>.json (Chrome trace format) when the bench ends.
    #[arg(long, value_name = "PREFIX")]
    ort_profile: Option<PathBuf>,
}

/// Measures and prints the report (a table, or one JSON object).
pub(super) fn run(a: BenchArgs) -> Result<Outcome> {
    let m = ModelDir::open(&a.model)?;
    let opts = BenchOptions {
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        prefill_chunk: a.prefill_chunk,
        seed: a.seed,
        stages: a.stages,
        stage_tokens: a.stage_tokens,
        batch: a.batch,
        checkpoint: a.checkpoint.map(|p| (p, a.checkpoint_every)),
    };
    let session = SessionOptions { profile: a.ort_profile, ..SessionOptions::with_threads(a.threads) };
    let r = crate::bench::run(&m, &session, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_table(&m, &r);
    }
    Ok(Outcome::Success)
}

fn print_table(m: &ModelDir, r: &BenchReport) {
    println!("model          {} ({}, {} DeltaNet ops)", m.dir.display(), m.manifest.precision_label(), r.linear_attn);
    let arithmetic = if r.bf16_attention { "bf16 arithmetic" } else { "f32 arithmetic" };
    println!("KV cache       {} ({arithmetic})", r.kv_cache);
    println!("threads        {}", r.threads);
    println!("load           {:.2} s", r.load_s);
    println!("warm-up call   {:.2} s", r.warmup_s);
    println!("prefill        {} tokens, {:.1} tok/s (chunks of {})", r.prompt_tokens, r.prefill_tokens_per_s, r.prefill_chunk);
    if r.resumed_from_token > 0 {
        println!(
            "resumed        at token {}; rate over tokens {}.. with the earlier runs' time",
            r.resumed_from_token, r.timed_from_token
        );
    }
    if r.checkpoint_bytes > 0 {
        println!("checkpoint     {:.1} MiB on disk", mib(r.checkpoint_bytes as u64));
    }
    println!("first token    {:.3} s", r.ttft_s);
    println!("decode         {} tokens, {:.2} tok/s", r.gen_tokens, r.decode_tokens_per_s);
    print_step(r);
    if let Some(rate) = r.batch_decode_tokens_per_s {
        println!(
            "batch decode   {} sequences, {rate:.2} tok/s together ({:.2}x one sequence)",
            r.batch,
            rate / r.decode_tokens_per_s
        );
    }
    println!("KV + state     {:.1} MiB", mib(r.kv_state_bytes));
    println!("peak RSS       {:.1} MiB (plan {:.1} MiB)", mib(r.peak_rss_bytes), mib(r.planned_bytes));
    if let Some(ratio) = r.prefix_reuse_ratio {
        let stages: Vec<String> = r.stage_s.iter().map(|s| format!("{s:.2}")).collect();
        println!("stages         {} s each after one shared prefill; total / one stage = {ratio:.2}", stages.join(", "));
        if let (Some(s), Some(together)) = (r.stages_together_s, r.stages_together_ratio) {
            println!("stages batched {s:.2} s for all, decoded together; total / one stage = {together:.2}");
        }
        println!("snapshot       {:.1} MiB", mib(r.snapshot_bytes as u64));
    }
}

/// A decode step's time by deltadoc's operators, the weight stream's rate inside the matmul
/// calls, and what is left: ONNX Runtime's own nodes, the run's fixed cost and the greedy pick.
fn print_step(r: &BenchReport) {
    let steps = r.gen_tokens.saturating_sub(1);
    if steps == 0 || r.decode_ops.is_empty() {
        return;
    }
    let per_step = |s: f64| s * 1e3 / steps as f64;
    for t in &r.decode_ops {
        let stream = if t.weight_bytes > 0 {
            format!(
                ", weights {:.1} MB/step at {:.1} GB/s",
                t.weight_bytes as f64 / 1e6 / steps as f64,
                t.weight_bytes as f64 / t.seconds / 1e9
            )
        } else {
            String::new()
        };
        println!("  {:<22} {:6.2} ms/step, {} calls{stream}", t.op, per_step(t.seconds), t.calls / steps as u64);
        if t.sections > 0 {
            println!(
                "  {:<22} {:6.2} ms/step in {} parallel sections, {:.2} ms of it the pool's own cost",
                "",
                per_step(t.section_seconds),
                t.sections / steps as u64,
                per_step(t.pool_seconds(r.threads))
            );
        }
    }
    let ours: f64 = r.decode_ops.iter().map(|t| t.seconds).sum();
    println!("  {:<22} {:6.2} ms/step", "other nodes, run, pick", per_step(r.decode_s - ours));
}
