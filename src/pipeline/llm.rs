//! The model as the pipeline sees it: a [`TextModel`] trait (so the daemon can be tested and
//! extended without a model) and [`OrtModel`], the Qwen3.5 runtime behind it.
//!
//! Prompts are laid out document first, instruction second, so every stage of a document shares
//! the document's prefill: the decoder state after the prefix is snapshotted once and restored
//! for each further stage instead of prefilling the document again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::constrain::{Constraint, Schema, Vocabulary};
use crate::extract::{self, page_image};
use crate::generate::{self, Decoder, GenerateOptions, Sampling, TokenFilter};
use crate::model::ModelDir;
use crate::model::plan::{Footprint, MemoryPlan, StateCopy};
use crate::model::vision::VisionConfig;
use crate::ocr::{OcrOptions, Transcription};
use crate::runtime::SessionOptions;
use crate::snapshot::{Snapshot, ids_digest};
use crate::tokenizer::{IM_END, IM_START, STOP_TOKENS, THINK_END, Tokenizer};
use crate::vision::encoder::VisionEncoder;
use crate::vision::preprocess;

/// Polled between prefill chunks and tokens; an error stops the model call.
pub type Check<'a> = &'a dyn Fn() -> Result<()>;

/// What results say about the model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// Model identity (source + precision + config digest).
    pub name: String,
    /// Where the weights came from (`import:…` or `synth:…`).
    pub source: String,
    /// Storage precision of the weights.
    pub precision: String,
    /// The weights are random (a synthesised demo model): outputs are meaningless.
    pub random_weights: bool,
    /// Longest context the model takes.
    pub max_context: usize,
    /// Whether the model folder has the vision tower (`vision.onnx`) the `ocr` stage reads
    /// page images with.
    pub vision: bool,
}

/// One generation request: a chat prompt split into a shareable prefix and a stage suffix.
pub struct Request<'a> {
    /// Prompt ids up to and including the document.
    pub prefix: &'a [u32],
    /// The rest of the prompt (instruction, end of turn, assistant header).
    pub suffix: &'a [u32],
    /// Keep the state after `prefix` for the next request with the same prefix.
    pub keep_prefix: bool,
    /// Limits and sampling.
    pub options: &'a GenerateOptions,
    /// Called between prefill chunks and decode steps: an error aborts (timeout, shutdown).
    pub check: &'a dyn Fn() -> Result<()>,
    /// Called with the number of prompt tokens each prefill chunk consumed (progress).
    pub on_prefill: &'a dyn Fn(usize),
    /// Constrain the reply to JSON matching this schema.
    pub schema: Option<&'a Schema>,
    /// With a schema: the reply first thinks (up to this many tokens, then `</think>` is
    /// forced) and the schema applies after `</think>`.
    pub think_budget: Option<usize>,
}

/// What one generation produced.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Completion {
    /// Generated text (special tokens and the empty think block removed).
    pub text: String,
    /// Prompt tokens of the request.
    pub prompt_tokens: usize,
    /// Prompt tokens actually prefilled (less when the prefix was reused).
    pub prefilled_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Why generation stopped.
    pub stopped_by: String,
    /// Seconds from the request to the first generated token.
    pub ttft_s: f64,
    /// Seconds of prefill.
    pub prefill_s: f64,
    /// Seconds of decoding.
    pub decode_s: f64,
    /// Bytes of KV cache and DeltaNet state at the end.
    pub state_bytes: usize,
    /// The think block's text, when the reply thought first.
    pub reasoning: Option<String>,
    /// Seconds spent computing constraint masks, and masks computed.
    pub mask_s: f64,
    /// Constraint masks computed (tokens generated under the schema).
    pub mask_steps: usize,
}

/// The schema constraint, applied after an optional think block.
struct SchemaFilter {
    constraint: Constraint,
    /// Thinking tokens left; `None` once `</think>` was generated (or without thinking).
    thinking: Option<usize>,
}

impl TokenFilter for SchemaFilter {
    fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        match self.thinking {
            None => self.constraint.apply(logits),
            // Budget spent: end the think block now.
            Some(0) => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if i != THINK_END as usize {
                        *l = f32::NEG_INFINITY;
                    }
                }
                Ok(())
            }
            // Still thinking: anything but ending the reply before the JSON came.
            Some(_) => {
                for t in STOP_TOKENS {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                Ok(())
            }
        }
    }

    fn accept(&mut self, token: u32) -> Result<()> {
        match self.thinking {
            None => self.constraint.commit(token),
            Some(_) if token == THINK_END => {
                self.thinking = None;
                Ok(())
            }
            Some(n) => {
                self.thinking = Some(n.saturating_sub(1));
                Ok(())
            }
        }
    }
}

/// A text model the pipeline can run.
pub trait TextModel {
    /// Identity for results.
    fn info(&self) -> &ModelInfo;
    /// Its tokenizer.
    fn tokenizer(&self) -> &Tokenizer;
    /// Generates a reply to `prefix ++ suffix`.
    fn complete(&mut self, req: &Request) -> Result<Completion>;
    /// Transcribes page `page` (1-based) of `source`, an image file or PDF as extraction
    /// detected (`mime`); `check` is polled between prefill chunks and tokens and stops the call
    /// when it fails.
    fn transcribe(&mut self, source: &Path, mime: &str, page: u32, opts: &OcrOptions, check: Check) -> Result<Transcription>;
    /// Memory a context of `context` tokens needs (`snapshot`: the prefix is kept for reuse).
    fn plan(&self, context: usize, snapshot: bool) -> MemoryPlan;
    /// The longest context within `budget` bytes, `None` when not even one prefill chunk fits.
    fn max_context_within(&self, budget: u64, snapshot: bool) -> Option<usize>;
}

/// The ONNX Runtime Qwen3.5 decoder with prefix reuse.
pub struct OrtModel {
    info: ModelInfo,
    footprint: Footprint,
    tokenizer: Tokenizer,
    decoder: Decoder,
    /// The vocabulary indexed for constrained decoding (built on first use: about a second).
    vocabulary: Option<Vocabulary>,
    /// State after the last kept prefix, and that prefix's digest.
    kept: Option<(String, Snapshot)>,
    /// Prefill chunk (tokens per call).
    pub prefill_chunk: usize,
    /// Folder for crash-safe prefill checkpoints of long prefixes (`None` = none).
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many prefix tokens.
    pub checkpoint_every: usize,
    /// The vision graph and how to open it; opened on the first page image.
    vision: Option<(VisionConfig, PathBuf)>,
    encoder: Option<VisionEncoder>,
    session: SessionOptions,
    /// The PDF whose pages are being transcribed, parsed once for all of them.
    open_pdf: Option<(PathBuf, pdf_extract::Document)>,
}

impl OrtModel {
    /// Loads a model folder.
    pub fn open(dir: &ModelDir, opts: &SessionOptions) -> Result<Self> {
        let m = &dir.manifest;
        let info = ModelInfo {
            name: m.identity(),
            source: m.source.clone(),
            precision: m.precision.name().into(),
            random_weights: m.source.starts_with("synth:"),
            max_context: m.config.max_position_embeddings,
            vision: m.vision_config.is_some(),
        };
        Ok(Self {
            info,
            footprint: Footprint::of(dir),
            tokenizer: dir.tokenizer()?,
            decoder: Decoder::open(dir, opts)?,
            vocabulary: None,
            kept: None,
            prefill_chunk: 512,
            checkpoint_dir: None,
            checkpoint_every: 16_384,
            vision: dir.vision().ok().map(|(c, p)| (c.clone(), p)),
            encoder: None,
            session: opts.clone(),
            open_pdf: None,
        })
    }

    fn state_copy(&self, context: usize, snapshot: bool) -> StateCopy {
        let every = self.checkpoint_dir.as_ref().map(|_| self.checkpoint_every);
        state_copy(context, self.prefill_chunk, snapshot, every)
    }

    fn prefill_prefix(&mut self, req: &Request) -> Result<(Vec<f32>, usize)> {
        let digest = ids_digest(req.prefix);
        if let Some((d, snap)) = &self.kept
            && *d == digest
        {
            self.decoder.restore(snap)?;
            return Ok((Vec::new(), 0));
        }
        self.kept = None;
        // Only computed tokens count: a prefix restored from a checkpoint reports 0.
        let tick = |_: usize, n: usize| {
            (req.on_prefill)(n);
            (req.check)()
        };
        // Long prefixes get a checkpoint so a crash or restart resumes instead of starting over.
        let logits = match &self.checkpoint_dir {
            Some(dir) if resumable(req.prefix.len(), self.checkpoint_every) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("{}.ddsnap", &digest[..16]));
                self.decoder.prefill_resumable(req.prefix, self.prefill_chunk, &path, self.checkpoint_every, tick)?.logits
            }
            _ => {
                self.decoder.reset()?;
                self.decoder.prefill(req.prefix, self.prefill_chunk, tick)?
            }
        };
        if req.keep_prefix {
            self.kept = Some((digest, self.decoder.snapshot()?));
        }
        Ok((logits, req.prefix.len()))
    }
}

impl TextModel for OrtModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn complete(&mut self, req: &Request) -> Result<Completion> {
        let total = req.prefix.len() + req.suffix.len();
        if total >= self.info.max_context {
            bail!("prompt of {total} tokens does not fit the model context of {}", self.info.max_context);
        }
        self.decoder.reserve(total + req.options.max_new_tokens);
        let t0 = Instant::now();
        let (mut logits, mut prefilled) = self.prefill_prefix(req)?;
        if !req.suffix.is_empty() {
            logits = self.decoder.prefill(req.suffix, self.prefill_chunk, |_, n| {
                (req.on_prefill)(n);
                (req.check)()
            })?;
            prefilled += req.suffix.len();
        }
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut filter = match req.schema {
            Some(schema) => {
                if self.vocabulary.is_none() {
                    self.vocabulary = Some(Vocabulary::new(&self.tokenizer)?);
                }
                let constraint = self.vocabulary.as_ref().map(|v| v.constraint(schema)).transpose()?;
                constraint.map(|constraint| SchemaFilter { constraint, thinking: req.think_budget })
            }
            None => None,
        };
        let mut ttft = None;
        let t1 = Instant::now();
        let (ids, stopped_by) =
            generate::decode(&mut self.decoder, logits, req.options, filter.as_mut().map(|f| f as &mut dyn TokenFilter), |_| {
                ttft.get_or_insert_with(|| t0.elapsed());
                (req.check)()
            })?;
        let raw = self.tokenizer.decode(&ids)?;
        let reasoning = match (req.think_budget, raw.find("</think>")) {
            (Some(_), Some(at)) => Some(raw[..at].trim().to_string()),
            _ => None,
        };
        let text = clean_reply(&raw);
        let (mask_s, mask_steps) = filter.map_or((0.0, 0), |f| (f.constraint.mask_time.as_secs_f64(), f.constraint.steps));
        Ok(Completion {
            reasoning,
            mask_s,
            mask_steps,
            text,
            prompt_tokens: total,
            prefilled_tokens: prefilled,
            generated_tokens: ids.len(),
            stopped_by,
            ttft_s: ttft.unwrap_or(Duration::ZERO).as_secs_f64(),
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
            state_bytes: self.decoder.state_bytes(),
        })
    }

    fn plan(&self, context: usize, snapshot: bool) -> MemoryPlan {
        self.footprint.plan(context, self.prefill_chunk, self.state_copy(context, snapshot))
    }

    fn max_context_within(&self, budget: u64, snapshot: bool) -> Option<usize> {
        let copy = |t| self.state_copy(t, snapshot);
        self.footprint.max_context_within(budget, self.info.max_context, self.prefill_chunk, copy)
    }

    fn transcribe(&mut self, source: &Path, mime: &str, page: u32, opts: &OcrOptions, check: Check) -> Result<Transcription> {
        if self.encoder.is_none() {
            let Some((cfg, path)) = &self.vision else {
                bail!("model {} has no vision tower (imported text-only), so image pages cannot be read", self.info.name)
            };
            self.encoder = Some(VisionEncoder::from_graph(path, cfg, &self.session)?);
        }
        let img = if mime == "application/pdf" {
            if self.open_pdf.as_ref().is_none_or(|(p, _)| p != source) {
                let bytes = std::fs::read(source).with_context(|| format!("{}: cannot read", source.display()))?;
                let doc = extract::pdf::open_document(&bytes).map_err(|(_, e)| anyhow!("{e}"))?;
                self.open_pdf = Some((source.to_path_buf(), doc));
            }
            let (_, doc) = self.open_pdf.as_ref().expect("opened above");
            page_image::page_image(doc, page, &opts.image)?.image
        } else {
            preprocess::load(source, &opts.image)?
        };
        let label = format!("{}.p{page}", source.file_stem().unwrap_or_default().to_string_lossy());
        let enc = self.encoder.as_mut().expect("opened above");
        let opts = OcrOptions { prefill_chunk: self.prefill_chunk, ..opts.clone() };
        crate::ocr::transcribe(&mut self.decoder, enc, &self.tokenizer, &img, &opts, &label, check)
    }
}

/// Drops a leftover think block and surrounding whitespace from a reply.
fn clean_reply(text: &str) -> String {
    let t = match text.find("</think>") {
        Some(at) => &text[at + "</think>".len()..],
        None => text,
    };
    t.trim().to_string()
}

/// Prompt ids of a stage: the user turn holds the document and then the instruction; the
/// returned split point ends the document so stages share it.
pub fn stage_prompt(tok: &Tokenizer, document: &[u32], instruction: &str, thinking: bool) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut prefix = vec![IM_START];
    prefix.extend(tok.encode("user\n")?);
    prefix.extend_from_slice(document);
    let mut suffix = tok.encode(&format!("\n\n{}", instruction.trim()))?;
    suffix.push(IM_END);
    suffix.extend(tok.encode("\n")?);
    suffix.extend(tok.assistant_header(thinking)?);
    Ok((prefix, suffix))
}

/// Generation options of a stage.
pub fn stage_options(max_new_tokens: usize, sampling: Sampling) -> GenerateOptions {
    GenerateOptions { max_new_tokens, prefill_chunk: 512, sampling, stop_tokens: STOP_TOKENS.to_vec(), checkpoint: None }
}

/// Prompt tokens a stage adds around the document (template + instruction), for budgeting.
pub fn overhead_tokens(tok: &Tokenizer, instruction: &str) -> Result<usize> {
    let (p, s) = stage_prompt(tok, &[], instruction, true)?;
    Ok(p.len() + s.len() + 4)
}

/// Whether a prefix of `tokens` is prefilled resumably, with a checkpoint every `every` tokens.
fn resumable(tokens: usize, every: usize) -> bool {
    tokens > every
}

/// The copy of the decoder state a context of `context` tokens holds beside its cache, as
/// [`OrtModel::prefill_prefix`] makes them: the kept prefix when stages share it (never smaller
/// than a checkpoint of it), otherwise a long prefix's last checkpoint (`checkpoint_every`:
/// `None` when checkpoints are off), which late in a 262K prefill outweighs the cache it copies.
fn state_copy(context: usize, chunk: usize, snapshot: bool, checkpoint_every: Option<usize>) -> StateCopy {
    match checkpoint_every {
        _ if snapshot => StateCopy::Kept(context),
        Some(every) if resumable(context, every) => StateCopy::Checkpoint(generate::last_checkpoint(context, chunk, every)),
        _ => StateCopy::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_counts_the_copy_the_prefill_makes() {
        // Stages sharing a prefix keep all of it, checkpoints or not.
        assert_eq!(state_copy(262_144, 512, true, Some(16_384)), StateCopy::Kept(262_144));
        assert_eq!(state_copy(8192, 512, true, None), StateCopy::Kept(8192));
        // One stage: a prefix past the interval checkpoints, the last time on the chunk boundary
        // before its end.
        assert_eq!(state_copy(262_144, 512, false, Some(16_384)), StateCopy::Checkpoint(245_760));
        assert_eq!(state_copy(16_385, 512, false, Some(16_384)), StateCopy::Checkpoint(16_384));
        // A prefix within the interval, or checkpoints off: no copy.
        assert_eq!(state_copy(16_384, 512, false, Some(16_384)), StateCopy::None);
        assert_eq!(state_copy(262_144, 512, false, None), StateCopy::None);
    }
}
