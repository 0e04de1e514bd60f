//! Cost of the JSON Schema constraint per generated token next to the decode step it rides on,
//! in one run on one model:
//!
//!   cargo bench --bench constrain -- [MODEL_DIR] [TOKENS]
//!
//! MODEL_DIR defaults to target/test-models/tiny (`cargo run -- model synth --shape tiny --out
//! target/test-models/tiny`); pass a `model synth --shape 0.8b` folder for the real shape.
//! The constraint is the contracts schema (pipelines/schemas/contract.json); the tokens come
//! from walks that pick uniformly among the allowed tokens (a random-weight model's output),
//! restarted until TOKENS (default 2000) masks were computed. The decode steps are the model's
//! own single-token forward passes. Prints the mask and step times and their ratio.

use std::time::Instant;

use deltadoc::constrain::{Schema, Vocabulary};
use deltadoc::generate::{Decoder, Logits};
use deltadoc::model::ModelDir;
use deltadoc::runtime::SessionOptions;
use deltadoc::tokenizer::IM_END;

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

    // Mask cost: random walks through the schema.
    let mut masks = Vec::new();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let vocab_n = (deltadoc::tokenizer::SPECIAL_START as usize) + deltadoc::tokenizer::SPECIALS.len();
    let mut logits = vec![0f32; vocab_n];
    let mut documents = 0;
    while masks.len() < tokens {
        let mut c = vocab.constraint(&schema)?;
        documents += 1;
        loop {
            logits.iter_mut().for_each(|l| *l = 0.0);
            let t = Instant::now();
            c.apply(&mut logits)?;
            masks.push(t.elapsed().as_secs_f64() * 1e3);
            let allowed: Vec<u32> = (0..vocab_n as u32).filter(|&i| logits[i as usize].is_finite()).collect();
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

    // Decode steps of the same model, 2 threads.
    let opts = SessionOptions { threads: 2, ..SessionOptions::default() };
    let mut dec = Decoder::open(&model, &opts)?;
    let prompt = tok.encode("The parties agree as follows. ")?;
    dec.prefill(&prompt, 512, |_, _| Ok(()))?;
    let mut steps = Vec::new();
    let mut next = prompt[0];
    for _ in 0..64 {
        let t = Instant::now();
        let l = dec.forward(&[next], Logits::Last)?;
        steps.push(t.elapsed().as_secs_f64() * 1e3);
        next = deltadoc::generate::argmax(l.row(0).as_slice().unwrap_or(&[0.0]));
    }

    let (mask_p50, mask_p95) = (percentile(&mut masks, 0.5), percentile(&mut masks, 0.95));
    let mask_mean = masks.iter().sum::<f64>() / masks.len() as f64;
    let step_p50 = percentile(&mut steps, 0.5);
    println!("model            {dir} ({})", model.manifest.source);
    println!("vocabulary index {index_s:.2} s (once per model)");
    println!("schema           pipelines/schemas/contract.json, {} walks, {} tokens", documents, masks.len());
    println!("mask per token   mean {mask_mean:.3} ms, p50 {mask_p50:.3} ms, p95 {mask_p95:.3} ms");
    println!("decode step      p50 {step_p50:.2} ms (2 threads)");
    println!("mask / step      {:.1} % (mean mask over median step)", 100.0 * mask_mean / step_p50);
    Ok(())
}
