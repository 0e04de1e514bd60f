//! `deltadoc bench`: prefill and decode speed, time to first token, peak memory and carried state
//! of one model folder on random prompt tokens.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::generate::{Batch, Decoder, Logits, argmax, last_checkpoint};
use crate::model::ModelDir;
use crate::model::config::TextConfig;
use crate::model::graph::KvCache;
use crate::model::plan::{Footprint, StateCopy};
use crate::ops::op_time::{self, OpTime};
use crate::progress::Progress;
use crate::runtime::SessionOptions;
use crate::util::ProcessMemory;

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
    /// Sequences decoded together in one step after the single sequence's decode (1 = none):
    /// copies of the prompt's state, each from a first token of its own.
    pub batch: usize,
    /// Make the prefill resumable: checkpoint file and interval in tokens. Rerunning the same
    /// command after the process died resumes the prefill, and the report adds the time spent
    /// before (kept per chunk in [`timing_log`]).
    pub checkpoint: Option<(PathBuf, usize)>,
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
    /// Block length of int8/int4 weights; absent for float precisions.
    pub quant_block: Option<usize>,
    /// Which operators ran the DeltaNet layers.
    pub linear_attn: String,
    /// Element type of the attention KV cache.
    pub kv_cache: String,
    /// Whether attention computed in bf16 (a bf16 cache on a CPU with AVX512_BF16).
    pub bf16_attention: bool,
    /// Where the weights came from.
    pub source: String,
    /// With `stages > 1`: seconds of each stage after the shared prefill (restore + instruction
    /// prefill + decode).
    pub stage_s: Vec<f64>,
    /// With `stages > 1`: (prefill + all stages) / (prefill + one stage); 1.0 would be free reuse.
    pub prefix_reuse_ratio: Option<f64>,
    /// With `stages > 1`: seconds of all stages as the pipeline runs them (each instruction
    /// prefilled after the restored prompt in turn, then all decoded together, `worker.max_batch`).
    pub stages_together_s: Option<f64>,
    /// With `stages > 1`: (prefill + the stages together) / (prefill + one stage).
    pub stages_together_ratio: Option<f64>,
    /// Bytes of the prompt's snapshot.
    pub snapshot_bytes: usize,
    /// Bytes of each prefill checkpoint on disk (0 without `--checkpoint`).
    pub checkpoint_bytes: usize,
    /// Prompt tokens restored from a checkpoint by this process (0 = prefilled from the start).
    pub resumed_from_token: usize,
    /// First prompt token the prefill time covers: 0 unless the timing of the processes before
    /// a resume was lost, in which case the rate covers the tokens from here on.
    pub timed_from_token: usize,
    /// Memory the plan of `deltadoc model info` expects for this run (context = prompt +
    /// generated tokens; the stages' snapshot of the prompt, or the largest checkpoint).
    pub planned_bytes: u64,
    /// Seconds of the decode steps after the first token.
    pub decode_s: f64,
    /// Sequences of the batched decode (1: not measured).
    pub batch: usize,
    /// With `batch > 1`: generated tokens per second of all the batch's sequences together, as
    /// many steps as the single sequence's decode.
    pub batch_decode_tokens_per_s: Option<f64>,
    /// deltadoc's operators over the batch's steps, as `decode_ops`.
    pub batch_decode_ops: Vec<OpTime>,
    /// deltadoc's operators over those decode steps: where the steps' time went, and the weight
    /// bytes `QuantMatMul` read (its rate inside the calls is the weight stream's).
    pub decode_ops: Vec<OpTime>,
}

/// One line of a resumable run's timing log: after `tokens` prompt tokens, the prefill had taken
/// `prefill_s` seconds over all processes so far, and their peak RSS was `peak_rss_bytes`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Mark {
    /// Prompt tokens in the state.
    pub tokens: usize,
    /// Seconds of prefill up to here, summed over the processes that contributed.
    pub prefill_s: f64,
    /// Highest peak RSS of those processes.
    pub peak_rss_bytes: u64,
}

/// Where a resumable run keeps its [`Mark`]s (JSON lines beside the checkpoint). It stays after
/// the run: its lines are the prefill's speed at every depth of the context.
pub fn timing_log(checkpoint: &Path) -> PathBuf {
    let mut name = checkpoint.as_os_str().to_owned();
    name.push(".timing.jsonl");
    PathBuf::from(name)
}

/// The marks of a timing log; a torn last line (the process died while writing it) is skipped.
pub fn read_marks(path: &Path) -> Vec<Mark> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Starts the timing log over with `marks` (through a temporary file, so that a crash leaves
/// either log whole) and opens it for the marks to come.
fn restart_log(path: &Path, marks: &[Mark]) -> Result<std::fs::File> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut text = String::new();
    for m in marks {
        text += &serde_json::to_string(m)?;
        text.push('\n');
    }
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("{}: cannot write", path.display()))?;
    std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("{}: cannot write", path.display()))
}

/// What the timed prefill of a bench left.
struct Prefilled {
    /// Logits of the last prompt token.
    logits: Vec<f32>,
    /// Seconds of prefill, earlier processes of a resumed run included.
    seconds: f64,
    /// Bytes of each checkpoint written.
    checkpoint_bytes: usize,
    /// Tokens restored from a checkpoint.
    resumed_from: usize,
    /// First token `seconds` covers.
    timed_from: usize,
    /// Peak RSS of the earlier processes.
    earlier_peak: u64,
}

/// A prefill through `checkpoint`, saved every `every` tokens (0: never, the timing log only).
fn prefill_resumable(
    dec: &mut Decoder,
    prompt: &[u32],
    chunk: usize,
    (checkpoint, every): (&Path, usize),
    progress: &mut Progress,
) -> Result<Prefilled> {
    let log_path = timing_log(checkpoint);
    let earlier = read_marks(&log_path);
    let mut log: Option<std::fs::File> = None;
    let (mut base_s, mut timed_from, mut base_peak) = (0.0, 0, 0);
    let t0 = Instant::now();
    let r = dec.prefill_resumable(prompt, chunk, checkpoint, every, |done, n| {
        progress.reach(done as u64);
        if log.is_none() {
            let resumed = n == 0;
            if resumed {
                match earlier.iter().find(|m| m.tokens == done) {
                    Some(m) => (base_s, base_peak) = (m.prefill_s, m.peak_rss_bytes),
                    None => {
                        tracing::warn!(
                            "{}: no timing for the {done} resumed tokens; the prefill rate covers the tokens after them",
                            log_path.display()
                        );
                        timed_from = done;
                    }
                }
            }
            // A fresh prefill starts a new log; a resumed one keeps the earlier lines up to the
            // resume point (the dead process's lines past it describe work that is redone).
            let kept: Vec<Mark> =
                if resumed { earlier.iter().filter(|m| m.tokens <= done).cloned().collect() } else { Vec::new() };
            log = Some(restart_log(&log_path, &kept)?);
            if resumed {
                return Ok(());
            }
        }
        let mark = Mark {
            tokens: done,
            prefill_s: base_s + t0.elapsed().as_secs_f64(),
            peak_rss_bytes: base_peak.max(ProcessMemory::read().peak_bytes),
        };
        let file = log.as_mut().expect("opened above");
        writeln!(file, "{}", serde_json::to_string(&mark)?).with_context(|| format!("{}: cannot write", log_path.display()))?;
        Ok(())
    })?;
    Ok(Prefilled {
        logits: r.logits,
        seconds: base_s + t0.elapsed().as_secs_f64(),
        checkpoint_bytes: r.checkpoint_bytes,
        resumed_from: r.resumed_at,
        timed_from,
        earlier_peak: base_peak,
    })
}

/// Ordinary tokens only (no specials), within the model's vocabulary: ids `0..` this.
fn ordinary_tokens(cfg: &TextConfig) -> u32 {
    cfg.vocab_size.min(crate::tokenizer::SPECIAL_START as usize) as u32
}

/// The prompt a bench of `tokens` tokens with `seed` runs: the same for every run, so that a
/// resumed run continues its own checkpoint.
pub fn random_prompt(cfg: &TextConfig, tokens: usize, seed: u64) -> Vec<u32> {
    let (mut rng, limit) = (StdRng::seed_from_u64(seed), ordinary_tokens(cfg));
    (0..tokens).map(|_| rng.random_range(0..limit)).collect()
}

/// Runs the benchmark on `model`.
pub fn run(model: &ModelDir, session: &SessionOptions, opts: &BenchOptions) -> Result<BenchReport> {
    let cfg = &model.manifest.config;
    check_fits(cfg, opts)?;
    let limit = ordinary_tokens(cfg);
    let prompt = random_prompt(cfg, opts.prompt_tokens, opts.seed);
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(1));

    let t_load = Instant::now();
    let mut dec = Decoder::open(model, session)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let t_warm = Instant::now();
    dec.forward(&prompt[..opts.prefill_chunk.clamp(1, prompt.len())], Logits::Last)?;
    dec.reset()?;
    dec.reserve(prompt.len() + opts.stage_tokens + opts.gen_tokens);
    let warmup_s = t_warm.elapsed().as_secs_f64();

    let pre = timed_prefill(&mut dec, &prompt, opts)?;
    let prefill_s = pre.seconds;
    let t_pick = Instant::now();
    // Greedy over real tokens only (the padded vocabulary rows are never chosen).
    let pick = |row: &[f32]| argmax(&row[..limit as usize]);
    let tok = pick(&pre.logits);
    let ttft_s = prefill_s + t_pick.elapsed().as_secs_f64();

    let snap = if opts.stages > 1 || opts.batch > 1 { Some(dec.snapshot()?) } else { None };
    let decode = |dec: &mut Decoder, mut tok: u32| -> Result<()> {
        for _ in 1..opts.gen_tokens {
            let l = dec.forward(&[tok], Logits::Last)?;
            tok = pick(l.row(0).as_slice().expect("contiguous logits"));
        }
        Ok(())
    };
    op_time::take();
    let t1 = Instant::now();
    decode(&mut dec, tok)?;
    let decode_s = t1.elapsed().as_secs_f64();
    let decode_ops = op_time::take();
    let decoded = opts.gen_tokens.saturating_sub(1);
    let kv_state_bytes = dec.state_bytes() as u64;

    // Prefix reuse: every stage continues the prefilled prompt with its own instruction.
    let (mut stage_s, mut stages_together_s) = (Vec::new(), None);
    if let Some(snap) = snap.as_ref().filter(|_| opts.stages > 1) {
        let instructions: Vec<Vec<u32>> =
            (0..opts.stages).map(|_| (0..opts.stage_tokens.max(1)).map(|_| rng.random_range(0..limit)).collect()).collect();
        // A stage's first token: its instruction prefilled after the restored prompt.
        let start = |dec: &mut Decoder, instruction: &[u32]| -> Result<u32> {
            dec.restore(snap)?;
            let l = dec.forward(instruction, Logits::Last)?;
            Ok(pick(l.row(0).as_slice().expect("contiguous logits")))
        };
        for instruction in &instructions {
            let t = Instant::now();
            let first = start(&mut dec, instruction)?;
            decode(&mut dec, first)?;
            stage_s.push(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let (mut members, mut tokens) = (Vec::new(), Vec::new());
        for instruction in &instructions {
            tokens.push(start(&mut dec, instruction)?);
            members.push(dec.snapshot()?);
        }
        let mut batch = Batch::new(&dec, members, opts.gen_tokens)?;
        decode_together(&mut dec, &mut batch, &mut tokens, opts.gen_tokens, pick)?;
        stages_together_s = Some(t.elapsed().as_secs_f64());
    }
    // Batched decode: the same steps for `batch` sequences at once.
    let (mut batch_decode_tokens_per_s, mut batch_decode_ops) = (None, Vec::new());
    if let Some(snap) = snap.as_ref().filter(|_| opts.batch > 1) {
        let mut batch = Batch::new(&dec, vec![snap.clone(); opts.batch], opts.gen_tokens)?;
        let mut tokens: Vec<u32> = (0..opts.batch).map(|i| if i == 0 { tok } else { rng.random_range(0..limit) }).collect();
        op_time::take();
        let t = Instant::now();
        decode_together(&mut dec, &mut batch, &mut tokens, opts.gen_tokens, pick)?;
        batch_decode_tokens_per_s = (decoded > 0).then(|| (opts.batch * decoded) as f64 / t.elapsed().as_secs_f64());
        batch_decode_ops = op_time::take();
    }
    let prefix_reuse_ratio = (!stage_s.is_empty()).then(|| (prefill_s + stage_s.iter().sum::<f64>()) / (prefill_s + stage_s[0]));
    let stages_together_ratio = stages_together_s.map(|s| (prefill_s + s) / (prefill_s + stage_s[0]));
    let m = &model.manifest;
    Ok(BenchReport {
        prefill_tokens_per_s: (opts.prompt_tokens - pre.timed_from) as f64 / prefill_s,
        decode_tokens_per_s: if decoded > 0 { decoded as f64 / decode_s } else { 0.0 },
        decode_s,
        decode_ops,
        ttft_s,
        peak_rss_bytes: pre.earlier_peak.max(ProcessMemory::read().peak_bytes),
        kv_state_bytes,
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        prefill_chunk: opts.prefill_chunk,
        threads: session.threads,
        load_s,
        warmup_s,
        precision: m.precision.name().into(),
        quant_block: m.quant_block(),
        linear_attn: format!("{:?}", m.linear_attn).to_lowercase(),
        kv_cache: format!("{:?}", m.kv_cache).to_lowercase(),
        bf16_attention: m.kv_cache == KvCache::Bf16 && crate::ops::attention::bf16_arithmetic(m.config.head_dim),
        source: m.source.clone(),
        stage_s,
        prefix_reuse_ratio,
        stages_together_s,
        stages_together_ratio,
        snapshot_bytes: snap.as_ref().map(|s| s.bytes()).unwrap_or(0),
        checkpoint_bytes: pre.checkpoint_bytes,
        resumed_from_token: pre.resumed_from,
        timed_from_token: pre.timed_from,
        planned_bytes: planned_bytes(model, opts),
        batch: opts.batch.max(1),
        batch_decode_tokens_per_s,
        batch_decode_ops,
    })
}

/// Refuses a prompt and generation that do not fit the model's context.
fn check_fits(cfg: &TextConfig, opts: &BenchOptions) -> Result<()> {
    if opts.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    // The last generated token is never fed back, so it takes no position.
    if opts.prompt_tokens + opts.gen_tokens.saturating_sub(1) > cfg.max_position_embeddings {
        bail!(
            "{} prompt + {} generated tokens exceed the model's context of {}",
            opts.prompt_tokens,
            opts.gen_tokens,
            cfg.max_position_embeddings
        );
    }
    Ok(())
}

/// The timed prefill of the prompt, resumable when the options ask for it; progress shown.
fn timed_prefill(dec: &mut Decoder, prompt: &[u32], opts: &BenchOptions) -> Result<Prefilled> {
    let mut progress = Progress::new(prompt.len() as u64, "prefill");
    let t0 = Instant::now();
    let pre = match &opts.checkpoint {
        Some((path, every)) => prefill_resumable(dec, prompt, opts.prefill_chunk, (path, *every), &mut progress)?,
        None => {
            let logits = dec.prefill(prompt, opts.prefill_chunk, |done, _| {
                progress.reach(done as u64);
                Ok(())
            })?;
            let seconds = t0.elapsed().as_secs_f64();
            Prefilled { logits, seconds, checkpoint_bytes: 0, resumed_from: 0, timed_from: 0, earlier_peak: 0 }
        }
    };
    progress.finish();
    Ok(pre)
}

/// Decodes greedily from `tokens` (one a sequence of `batch`) until each has `gen_tokens`.
fn decode_together(
    dec: &mut Decoder,
    batch: &mut Batch,
    tokens: &mut [u32],
    gen_tokens: usize,
    pick: impl Fn(&[f32]) -> u32,
) -> Result<()> {
    for _ in 1..gen_tokens {
        let l = batch.step(dec, tokens, &[])?;
        for (i, t) in tokens.iter_mut().enumerate() {
            *t = pick(l.row(i).as_slice().expect("contiguous logits"));
        }
    }
    Ok(())
}

/// The memory plan of the run: its context, the state copy it holds (the snapshot stages and the
/// batch share, or the last checkpoint of a resumable prefill) and the batch's sequences.
fn planned_bytes(model: &ModelDir, opts: &BenchOptions) -> u64 {
    let copy = if opts.stages > 1 || opts.batch > 1 {
        StateCopy::Kept(opts.prompt_tokens)
    } else {
        let at = |every: usize| StateCopy::Checkpoint(last_checkpoint(opts.prompt_tokens, opts.prefill_chunk, every));
        opts.checkpoint.as_ref().map_or(StateCopy::None, |(_, every)| at(*every))
    };
    // The bench reads no images, so the vision tower never loads.
    let footprint = Footprint { vision_file: 0, ..Footprint::of(model) };
    let context = opts.prompt_tokens + opts.gen_tokens;
    // A batch (the stages decoded together, or `--batch`'s) holds each sequence's state and a
    // cache row of the whole context beside the single sequence's.
    let batch = match opts.batch.max(opts.stages) {
        0 | 1 => 0,
        b => b as u64 * footprint.sequence_bytes(context),
    };
    footprint.plan(context, opts.prefill_chunk, copy).total_bytes + batch
}
