//! Cost of the JSON Schema constraint per generated token next to the decode step it rides on,
//! and what the step saves when the head computes only the allowed tokens, in one run on one
//! model:
//!
//!   cargo bench --bench constrain -- [MODEL_DIR] [TOKENS]
//!
//! MODEL_DIR defaults to target/test-models/tiny (`cargo run -- model synth --shape tiny --out
//! target/test-models/tiny`); pass a `model synth --shape 0.8b --precision int8` folder for the
//! real shape (the int8/int4 heads take the allowed rows; a float head computes them all).
//! The constraint is the contracts schema (pipelines/schemas/contract.json); the tokens come
//! from walks that pick uniformly among the allowed tokens (a random-weight model's output),
//! restarted until TOKENS (default 2000) masks were computed. The decode steps are the model's
//! own single-token forward passes: for 48 of the walk's steps, spread over it, the full head
//! and then the head restricted to that step's allowed tokens. Prints the mask and step times,
//! the steps by the share of the vocabulary they allow, and the constrained step (mask and
//! forward pass) with the full head and as the decode loop now runs it.

use std::time::Instant;

use deltadoc::constrain::{Schema, Vocabulary};
use deltadoc::generate::{Decoder, Logits};
use deltadoc::model::ModelDir;
use deltadoc::runtime::SessionOptions;
use deltadoc::tokenizer::IM_END;

/// Steps whose allowed tokens are kept to time the decode steps with.
const SAMPLED_STEPS: usize = 48;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let dir = args.first().cloned().unwrap_or_else(|| "target/test-models/tiny".into());
    let tokens: usize = args.get(1).map(|t| t.parse()).transpose()?.unwrap_or(2000);
    let model = ModelDir::open(std::path::Path::new(&dir))?;
    let tok = model.tokenizer()?;

    let t = Instant::now();
    let vocab = Vocabulary::new(&tok)?;
    let index_s = t.elapsed().as_secs_f64();
    let schema_text = std::fs::read_to_string("pipelines/schemas/contract.json")?;
    let schema = Schema::new(serde_json::from_str(&schema_text)?)?;

    // Mask cost: random walks through the schema. A sample of the steps' allowed tokens is kept
    // for the decode steps below.
    let mut masks = Vec::new();
    let mut fractions = Vec::new();
    let mut sample: Vec<Vec<u32>> = Vec::new();
    let every = (tokens / SAMPLED_STEPS).max(1);
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let vocab_n = (deltadoc::tokenizer::SPECIAL_START as usize) + deltadoc::tokenizer::SPECIALS.len();
    let mut logits = vec![0f32; vocab_n];
    let mut allowed = Vec::new();
    let mut documents = 0;
    while masks.len() < tokens {
        let mut c = vocab.constraint(&schema)?;
        documents += 1;
        loop {
            // What the decode loop does per step: the allowed tokens (for the head), then the mask.
            let t = Instant::now();
            c.allowed(&mut allowed)?;
            c.apply(&mut logits)?;
            masks.push(t.elapsed().as_secs_f64() * 1e3);
            fractions.push(allowed.len() as f64 / vocab_n as f64);
            if masks.len() % every == 0 && sample.len() < SAMPLED_STEPS {
                sample.push(allowed.clone());
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let pick = allowed[(rng % allowed.len() as u64) as usize];
            if pick == IM_END {
                break;
            }
            c.commit(pick)?;
        }
    }

    // Decode steps of the same model, 2 threads: for each sampled step the full head and the head
    // computing only that step's allowed tokens, one after the other.
    let opts = SessionOptions::with_threads(2);
    let mut dec = Decoder::open(&model, &opts)?;
    let prompt = tok.encode("The parties agree as follows. ")?;
    dec.prefill(&prompt, 512, |_, _| Ok(()))?;
    let mut next = prompt[0];
    // (allowed fraction, full ms, rows ms)
    let mut steps = Vec::new();
    for _ in 0..2 {
        for rows in &sample {
            let t = Instant::now();
            let l = dec.forward(&[next], Logits::Last)?;
            let full = t.elapsed().as_secs_f64() * 1e3;
            next = deltadoc::generate::argmax(l.row(0).as_slice().unwrap_or(&[0.0]));
            let t = Instant::now();
            dec.forward_rows(&[next], rows)?;
            steps.push((rows.len() as f64 / vocab_n as f64, full, t.elapsed().as_secs_f64() * 1e3));
        }
    }
    steps.drain(..sample.len()); // the first pass warms up

    let (mask_p50, mask_p95) = (percentile(&mut masks.clone(), 0.5), percentile(&mut masks, 0.95));
    let mask_mean = masks.iter().sum::<f64>() / masks.len() as f64;
    let mut full: Vec<f64> = steps.iter().map(|s| s.1).collect();
    let step_p50 = percentile(&mut full, 0.5);
    println!("model            {dir} ({})", model.manifest.source);
    println!("vocabulary index {index_s:.2} s (once per model)");
    println!("schema           pipelines/schemas/contract.json, {} walks, {} tokens", documents, masks.len());
    println!("mask per token   mean {mask_mean:.3} ms, p50 {mask_p50:.3} ms, p95 {mask_p95:.3} ms (allowed list and mask)");
    println!("decode step      p50 {step_p50:.2} ms (2 threads, full head)");
    println!("mask / step      {:.1} % (mean mask over median step)", 100.0 * mask_mean / step_p50);
    println!(
        "head rows        {} (the graph computes only the allowed tokens)",
        if dec.head_takes_rows() { "yes" } else { "no: float head" }
    );
    println!(
        "{:<24} {:>8} {:>8} {:>12} {:>12} {:>8}",
        "allowed share of vocab", "steps", "sampled", "full ms p50", "rows ms p50", "ratio"
    );
    for (lo, hi) in [(0.0, 0.001), (0.001, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.01)] {
        let within = |f: f64| f >= lo && f < hi;
        let count = fractions.iter().filter(|&&f| within(f)).count();
        let mut f: Vec<f64> = steps.iter().filter(|s| within(s.0)).map(|s| s.1).collect();
        let mut r: Vec<f64> = steps.iter().filter(|s| within(s.0)).map(|s| s.2).collect();
        let share = format!("{:.1} % - {:.1} %", lo * 100.0, hi.min(1.0) * 100.0);
        if f.is_empty() {
            println!("{share:<24} {count:>8} {:>8}", 0);
            continue;
        }
        let (fp, rp) = (percentile(&mut f, 0.5), percentile(&mut r, 0.5));
        println!("{share:<24} {count:>8} {:>8} {fp:>12.2} {rp:>12.2} {:>7.2}x", f.len(), fp / rp);
    }
    // The walk's steps as the decode loop runs them: rows below its threshold, the full head
    // above; each step's time the median of its share bucket's sampled steps.
    let policy = deltadoc::generate::computes_allowed_rows;
    let median_of = |sparse: bool, pick: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = steps.iter().filter(|s| policy(s.0) == sparse).map(pick).collect();
        if v.is_empty() { 0.0 } else { percentile(&mut v, 0.5) }
    };
    let sparse = fractions.iter().filter(|&&f| policy(f)).count() as f64 / fractions.len() as f64;
    let today = mask_mean + step_p50;
    let now = mask_mean + sparse * median_of(true, |s| s.2) + (1.0 - sparse) * median_of(false, |s| s.1);
    println!(
        "constrained step {today:.2} ms with the full head, {now:.2} ms with the allowed rows ({:.2}x; {:.0} % of the walk's steps allow at most {:.0} % of the vocabulary)",
        today / now,
        sparse * 100.0,
        deltadoc::generate::ROWS_WORTH_SKIPPING * 100.0
    );
    Ok(())
}
