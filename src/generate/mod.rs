//! Running the decoder graph: chunked prefill carrying KV cache and DeltaNet state between calls
//! ([`Decoder`]), crash-safe prefill (`resumable`), token-by-token decode and sampling.

mod carried;
mod decoder;
mod resumable;
mod sampling;

use std::time::{Duration, Instant};

use anyhow::Result;

pub use decoder::{Decoder, Logits, PromptFeed};
pub use resumable::{Resumed, last_checkpoint};
pub use sampling::{Sampler, argmax};

pub use crate::llm::{DEFAULT_PREFILL_CHUNK, DecodeOptions, Sampling};
use crate::progress::Progress;

/// How a prompt goes through the model.
#[derive(Clone, Debug)]
pub struct Prefill {
    /// Prompt tokens per call (bounds activation memory, not the result).
    pub chunk: usize,
    /// Make the prefill resumable: checkpoint file and interval in tokens.
    pub checkpoint: Option<(std::path::PathBuf, usize)>,
}

impl Default for Prefill {
    fn default() -> Self {
        Self { chunk: DEFAULT_PREFILL_CHUNK, checkpoint: None }
    }
}

/// What a generation did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (stop token excluded).
    pub generated_tokens: usize,
    /// Why generation ended: `max_new_tokens` or `stop token <id>`.
    pub stopped_by: String,
    /// Wall time of the prefill.
    #[serde(with = "secs")]
    pub prefill_time: Duration,
    /// Wall time of the decode loop.
    #[serde(with = "secs")]
    pub decode_time: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Restricts which tokens may come next (constrained decoding).
pub trait TokenFilter {
    /// The tokens that may come next, ascending, into `out`; left empty where every token may
    /// (or where the filter cannot tell before seeing the logits).
    fn allowed(&mut self, out: &mut Vec<u32>) -> Result<()>;
    /// Sets the logits of tokens that may not come next to −∞.
    fn mask(&mut self, logits: &mut [f32]) -> Result<()>;
    /// Records the token that was chosen.
    fn accept(&mut self, token: u32) -> Result<()>;
}

/// Allowed tokens above this share of the vocabulary are computed as the full head: the head
/// then reads nearly every row anyway, and one run over all rows streams them best
/// (benches/RESULTS.md, "Constrained decode steps").
pub const ROWS_WORTH_SKIPPING: f64 = 0.5;

/// Whether a constrained step that allows `share` of the vocabulary (0 to 1) computes only the
/// allowed rows of the head, not all of them ([`ROWS_WORTH_SKIPPING`]).
pub fn computes_allowed_rows(share: f64) -> bool {
    share <= ROWS_WORTH_SKIPPING
}

/// Decodes from the logits of the last prompt token until a stop token or the token limit;
/// `filter` (if any) masks every step, and where it allows few tokens the next step computes
/// only their logits; `on_token` sees every generated token and may abort by returning an
/// error. Returns the tokens and why generation ended.
pub fn decode(
    dec: &mut Decoder,
    mut logits: Vec<f32>,
    opts: &DecodeOptions,
    mut filter: Option<&mut dyn TokenFilter>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, String)> {
    let vocab_limit = crate::tokenizer::SPECIAL_START as usize + crate::tokenizer::SPECIALS.len();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut out = Vec::new();
    let mut rows = Vec::new();
    while out.len() < opts.max_new_tokens {
        if let Some(f) = filter.as_deref_mut() {
            f.mask(&mut logits)?;
        }
        let tok = sampler.pick(&logits, vocab_limit);
        if opts.stop_tokens.contains(&tok) {
            return Ok((out, format!("stop token {tok}")));
        }
        if let Some(f) = filter.as_deref_mut() {
            f.accept(tok)?;
        }
        out.push(tok);
        on_token(tok)?;
        if out.len() == opts.max_new_tokens {
            break;
        }
        rows.clear();
        // A float head computes every row whatever it is given: no list to build for it.
        if let Some(f) = filter.as_deref_mut().filter(|_| dec.head_takes_rows()) {
            f.allowed(&mut rows)?;
            if !computes_allowed_rows(rows.len() as f64 / logits.len() as f64) {
                rows.clear();
            }
        }
        logits = dec.forward_rows(&[tok], &rows)?.row(0).to_vec();
    }
    Ok((out, "max_new_tokens".into()))
}

/// Prefills `prompt` and decodes until a stop token or the token limit; `on_token` sees every
/// generated token (stop tokens excluded) as it is produced.
pub fn generate(
    dec: &mut Decoder,
    prompt: &[u32],
    prefill: &Prefill,
    opts: &DecodeOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    dec.reserve(dec.tokens() + prompt.len() + opts.max_new_tokens);
    let t0 = Instant::now();
    // Prompts of several chunks take seconds to minutes on a CPU: report progress.
    let mut progress = (prompt.len() > prefill.chunk).then(|| Progress::new(prompt.len() as u64, "prefill"));
    let tick = |done: usize, _: usize| {
        if let Some(p) = progress.as_mut() {
            p.reach(done as u64);
        }
        Ok(())
    };
    let logits = match &prefill.checkpoint {
        Some((path, every)) => {
            let r = dec.prefill_resumable(prompt, prefill.chunk, path, *every, tick)?;
            if r.checkpoint_bytes > 0 {
                tracing::info!("prefill checkpoints: {} bytes each, every {every} tokens", r.checkpoint_bytes);
            }
            r.logits
        }
        None => dec.prefill(prompt, prefill.chunk, tick)?,
    };
    if let Some(p) = &progress {
        p.finish();
    }
    stats.prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let (out, stopped_by) = decode(dec, logits, opts, None, on_token)?;
    stats.stopped_by = stopped_by;
    stats.decode_time = t1.elapsed();
    stats.generated_tokens = out.len();
    Ok((out, stats))
}
