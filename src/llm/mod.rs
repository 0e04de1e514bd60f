//! The model as the orchestration sees it: [`TextModel`], the one seam between documents and
//! the runtime, with the requests it takes and the answers it gives. Stages call it, the
//! orchestration's tests drive it with a fake (`fake`), and [`ort::OrtModel`] (the Qwen3.5
//! ONNX Runtime decoder and vision tower) implements it. Nothing in this file touches ONNX
//! Runtime, so the configuration and the stages, which speak only these types, do not either.
//!
//! Prompts are laid out document first, instruction second (see [`crate::chat::stage_prompt`]),
//! so every stage of a document shares the document's prefill: the decoder state after the
//! prefix is snapshotted once and restored for each further stage instead of prefilling the
//! document again.

#[cfg(test)]
pub(crate) mod fake;
pub mod ort;

use std::path::PathBuf;

use anyhow::Result;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::constrain::Schema;
use crate::tokenizer::Tokenizer;

/// Polled between prefill chunks and tokens; an error stops the model call.
pub type StopCheck<'a> = &'a dyn Fn() -> Result<()>;

/// Prompt tokens per prefill call unless configured otherwise: longer calls run faster and hold
/// larger activations, which the plan counts per call; 512 is where prefill speed levels off on
/// the 0.8B shape (benches/RESULTS.md).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

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

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Seed of the sampler's random stream: the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Limits and choices of the tokens a generation produces.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    /// Stop after this many generated tokens.
    pub max_new_tokens: usize,
    /// How tokens are chosen.
    pub sampling: Sampling,
    /// Tokens that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
}

/// Pixel budgets of the preprocessing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// Images with fewer pixels are enlarged to at least this many (reference: 256²).
    pub min_pixels: u64,
    /// Images with more pixels are shrunk to at most this many; a page costs max_pixels / 1024
    /// prompt tokens at most (reference: 4096², far beyond what a CPU reads in reasonable time).
    pub max_pixels: u64,
}

impl Default for ImageOptions {
    fn default() -> Self {
        // The reference processor's budgets: 256² and 4096² pixels.
        Self { min_pixels: 256 * 256, max_pixels: 4096 * 4096 }
    }
}

impl ImageOptions {
    /// Options whose largest image costs at most `tokens` merged tokens (32×32 pixels each).
    pub fn with_token_budget(self, tokens: u64) -> Self {
        Self { max_pixels: (tokens * 1024).max(self.min_pixels), ..self }
    }
}

/// What the job asks of each page.
#[derive(Clone, Debug)]
pub struct OcrOptions {
    /// Pixel budgets of a page image (its `max_pixels` is the page's token budget × 1,024).
    pub image: ImageOptions,
    /// Most image tokens of one band; a page over it is cut into bands. `None`: one image.
    pub tile_tokens: Option<u64>,
    /// Longest transcription per page, in tokens.
    pub max_new_tokens: usize,
    /// The instruction after the page image.
    pub instruction: String,
    /// Where to write the images the model reads (PNG per page or band), for inspection.
    pub save_images: Option<PathBuf>,
}

/// One page's transcription and what it cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transcription {
    /// The text.
    pub text: String,
    /// Prompt tokens (image tokens included).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
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
    pub options: &'a DecodeOptions,
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
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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

/// [`TextModel::complete_batch`] one request after another: the default, and what a model that
/// batches does with fewer than two requests.
pub fn complete_in_turn<M: TextModel + ?Sized>(
    model: &mut M,
    reqs: &[Request],
    done: &mut dyn FnMut(usize, &Completion),
) -> Result<Vec<Completion>> {
    let mut replies = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let reply = model.complete(r)?;
        done(i, &reply);
        replies.push(reply);
    }
    Ok(replies)
}

/// A text model the pipeline can run.
pub trait TextModel {
    /// Identity for results.
    fn info(&self) -> &ModelInfo;
    /// Its tokenizer.
    fn tokenizer(&self) -> &Tokenizer;
    /// Generates a reply to `prefix ++ suffix`.
    fn complete(&mut self, req: &Request) -> Result<Completion>;
    /// Generates a reply to each request, as [`Self::complete`] on each in turn would, and tells
    /// `done` each reply (with its request's index) as soon as it has it. A model may decode up
    /// to `width` of them together, one step for all, each request prefilled in order and
    /// joining as soon as one before it ends: what requests on one document (the same prefix,
    /// prefilled once) gain, since a decode step costs about the same for several.
    fn complete_batch(
        &mut self,
        reqs: &[Request],
        _width: usize,
        done: &mut dyn FnMut(usize, &Completion),
    ) -> Result<Vec<Completion>> {
        complete_in_turn(self, reqs, done)
    }
    /// Transcribes one page image (`label` names it in saved images and errors); `check` is
    /// polled between prefill chunks and tokens and stops the call when it fails.
    fn transcribe(&mut self, page: &RgbImage, label: &str, opts: &OcrOptions, check: StopCheck) -> Result<Transcription>;
    /// Bytes a context of `context` tokens plans to use (`snapshot`: the prefix is kept for
    /// reuse); `deltadoc model info` shows the plan's terms.
    fn planned_bytes(&self, context: usize, snapshot: bool) -> u64;
    /// The longest context within `budget` bytes, `None` when not even one prefill chunk fits.
    fn max_context_within(&self, budget: u64, snapshot: bool) -> Option<usize>;
    /// Bytes each request decoding at once in a [`Self::complete_batch`] adds to the plan of one
    /// context of `context` tokens.
    fn sequence_bytes(&self, context: usize) -> u64;
}
