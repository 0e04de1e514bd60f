//! Running the decoder graph: chunked prefill carrying KV cache and DeltaNet state between calls
//! ([`Decoder`]), crash-safe prefill (`resumable`), token-by-token decode and sampling.

mod batch;
mod carried;
mod decoder;
mod resumable;
mod sampling;

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use ndarray::Array2;

pub use batch::Batch;
pub use decoder::{Decoder, Logits, PromptFeed};
pub use resumable::{Resumed, last_checkpoint};
pub use sampling::{Sampler, argmax};

pub use crate::llm::{DEFAULT_PREFILL_CHUNK, DecodeOptions, Sampling};
use crate::progress::Progress;
use crate::snapshot::Snapshot;

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
    let mut seq = Sequence::new(opts);
    let mut rows = Vec::new();
    loop {
        let tok = match seq.choose(&mut logits, filter.as_deref_mut(), &mut on_token)? {
            Next::Feed(tok) => tok,
            Next::Ended(why) => return Ok((seq.out, why)),
        };
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
}

/// A sequence joining a [`Decoding`]: the logits of its last prompt token, its settings and its
/// constraint.
pub struct Member<F> {
    /// Logits of the sequence's last prompt token.
    pub logits: Vec<f32>,
    /// Token limit, sampling and stop tokens of this sequence.
    pub opts: DecodeOptions,
    /// Its constraint, if any.
    pub filter: Option<F>,
}

/// A sequence that left a [`Decoding`]: the caller's id for it, its tokens, why it ended, and
/// its constraint back.
pub struct Ended<F> {
    /// The id it joined with.
    pub id: usize,
    /// The tokens it generated (stop token excluded).
    pub tokens: Vec<u32>,
    /// `max_new_tokens` or `stop token <id>`.
    pub why: String,
    /// Its constraint, with what it counted.
    pub filter: Option<F>,
}

/// A member while it decodes.
struct Running<F> {
    id: usize,
    logits: Vec<f32>,
    seq: Sequence,
    filter: Option<F>,
}

/// [`decode`] for several sequences at once: one model call a step for all that have not ended,
/// each with its own sampling, stop tokens, limit and constraint. Sequences join between steps
/// (after their own prefill: a caller refills the rows that free) and leave when they end. The
/// constraints compute the next step's masks on a thread of their own while the model runs the
/// step (so the head computes every row: the rows the sequences allow differ).
pub struct Decoding<F> {
    /// The batch rows, once a sequence joined.
    batch: Option<Batch>,
    /// The member each batch row holds.
    held: Vec<Running<F>>,
}

impl<F> Default for Decoding<F> {
    fn default() -> Self {
        Self { batch: None, held: Vec::new() }
    }
}

impl<F: TokenFilter + Send> Decoding<F> {
    /// No sequence yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sequences decoding.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Ids of the sequences decoding, in batch order.
    pub fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.held.iter().map(|r| r.id)
    }

    /// Sequence `id` joins with `member`'s settings from `state` (`dec` right after its prefill,
    /// as [`Decoder::snapshot`] took it), with cache room for its token limit; its first token is
    /// chosen at the next [`Self::step`].
    pub fn join(&mut self, dec: &Decoder, id: usize, member: Member<F>, state: Snapshot) -> Result<()> {
        let room = member.opts.max_new_tokens;
        match &mut self.batch {
            Some(b) => b.join(dec, state, room)?,
            None => self.batch = Some(Batch::new(dec, vec![state], room)?),
        }
        let Member { logits, opts, filter } = member;
        self.held.push(Running { id, logits, seq: Sequence::new(&opts), filter });
        Ok(())
    }

    /// Sequence `id` leaves before it ended (its caller gave it up); the others go on.
    pub fn leave(&mut self, id: usize) -> Result<()> {
        let Some(row) = self.held.iter().position(|r| r.id == id) else { return Ok(()) };
        if let Some(b) = self.batch.as_mut() {
            b.remove(row)?;
        }
        self.held.remove(row);
        Ok(())
    }

    /// Chooses every sequence's next token (`on_token(id, token)` sees each), lets those that
    /// ended leave and returns them, and runs the model one step for the others.
    pub fn step(&mut self, dec: &mut Decoder, mut on_token: impl FnMut(usize, u32) -> Result<()>) -> Result<Vec<Ended<F>>> {
        let Some(batch) = self.batch.as_mut() else { return Ok(Vec::new()) };
        let mut tokens = Vec::with_capacity(self.held.len());
        let mut leaving = Vec::new();
        for (row, r) in self.held.iter_mut().enumerate() {
            let id = r.id;
            match r.seq.choose(&mut r.logits, r.filter.as_mut(), &mut |t| on_token(id, t))? {
                Next::Feed(tok) => tokens.push(tok),
                Next::Ended(why) => leaving.push((row, why)),
            }
        }
        let mut ended = Vec::with_capacity(leaving.len());
        for (row, why) in leaving.into_iter().rev() {
            batch.remove(row)?;
            let r = self.held.remove(row);
            ended.push(Ended { id: r.id, tokens: r.seq.out, why, filter: r.filter });
        }
        ended.reverse();
        if self.held.is_empty() {
            return Ok(ended);
        }
        let held = &mut self.held;
        let logits = std::thread::scope(|s| -> Result<Array2<f32>> {
            let masks = s.spawn(|| -> Result<()> {
                let mut scratch = Vec::new();
                for f in held.iter_mut().filter_map(|r| r.filter.as_mut()) {
                    f.allowed(&mut scratch)?;
                }
                Ok(())
            });
            let logits = batch.step(dec, &tokens, &[]);
            masks.join().map_err(|_| anyhow!("the constraints' mask thread panicked"))??;
            logits
        })?;
        for (row, r) in self.held.iter_mut().enumerate() {
            r.logits = logits.row(row).to_vec();
        }
        Ok(ended)
    }
}

/// What a sequence does after a step: feed a token to the next, or end.
enum Next {
    Feed(u32),
    Ended(String),
}

/// One sequence's side of a decode loop: its sampler, settings and tokens so far.
struct Sequence {
    opts: DecodeOptions,
    sampler: Sampler,
    out: Vec<u32>,
}

impl Sequence {
    fn new(opts: &DecodeOptions) -> Self {
        Self { opts: opts.clone(), sampler: Sampler::new(opts.sampling.clone()), out: Vec::new() }
    }

    /// Picks the token after `logits` (masked by `filter` first), records it, and says whether
    /// the sequence goes on with it: a stop token (not recorded) or the token limit ends it.
    fn choose<F: TokenFilter + ?Sized>(
        &mut self,
        logits: &mut [f32],
        filter: Option<&mut F>,
        on_token: &mut impl FnMut(u32) -> Result<()>,
    ) -> Result<Next> {
        if self.out.len() >= self.opts.max_new_tokens {
            return Ok(Next::Ended("max_new_tokens".into()));
        }
        let vocab_limit = crate::tokenizer::SPECIAL_START as usize + crate::tokenizer::SPECIALS.len();
        let mut filter = filter;
        if let Some(f) = filter.as_deref_mut() {
            f.mask(logits)?;
        }
        let tok = self.sampler.pick(logits, vocab_limit);
        if self.opts.stop_tokens.contains(&tok) {
            return Ok(Next::Ended(format!("stop token {tok}")));
        }
        if let Some(f) = filter {
            f.accept(tok)?;
        }
        self.out.push(tok);
        on_token(tok)?;
        if self.out.len() == self.opts.max_new_tokens {
            return Ok(Next::Ended("max_new_tokens".into()));
        }
        Ok(Next::Feed(tok))
    }
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
