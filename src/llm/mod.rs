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
//!
//! A model answers a stream of requests ([`TextModel::serve`]): one call's, or those of several
//! documents in flight, each on a thread of its own with a [`host::Hosted`] model (`host`).

#[cfg(test)]
pub(crate) mod fake;
pub mod host;
pub mod ort;

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{Result, bail};
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
#[derive(Clone, Copy)]
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

/// Work a [`Requests`] source hands the model between decode steps.
pub type Work = Box<dyn FnOnce(&mut dyn TextModel) + Send>;

/// What a [`Requests`] source has for [`TextModel::serve`] next.
pub enum Next {
    /// Request `id` waits to start.
    Start(usize),
    /// Work that needs the model itself between decode steps (a page to transcribe, a question
    /// about the memory plan).
    Run(Work),
    /// Nothing waits now: ask again after the next decode step.
    Later,
    /// Nothing more will come: finish the requests decoding, then return.
    End,
}

/// Requests that come while others decode: one call's ([`TextModel::complete_batch`]), or those
/// of several documents in flight (`llm/host.rs`).
pub trait Requests {
    /// What to do next. `idle`: no request decodes, so the source may wait for one to come.
    fn next(&mut self, idle: bool) -> Next;
    /// Request `id`, which [`Self::next`] gave and which is not done yet.
    fn request(&self, id: usize) -> Request<'_>;
    /// Request `id` ended: its reply, or why it failed (its prefill, its check, or the model).
    fn done(&mut self, id: usize, reply: Result<Completion>);
    /// Documents whose requests may come interleaved: the model keeps the state after each
    /// one's prefix, not only after the last.
    fn documents(&self) -> usize {
        1
    }
}

/// [`TextModel::serve`] one request after another: what a model that does not batch does.
pub fn serve_in_turn(model: &mut dyn TextModel, requests: &mut dyn Requests) -> Result<()> {
    loop {
        match requests.next(true) {
            Next::Start(id) => {
                let reply = model.complete(&requests.request(id));
                requests.done(id, reply);
            }
            Next::Run(work) => work(model),
            Next::Later => {}
            Next::End => return Ok(()),
        }
    }
}

/// The requests of one [`TextModel::complete_batch`] call, started in order; each reply is told
/// to `done` as it comes. After a failure no further request starts and those decoding stop at
/// their next check: the call has failed.
struct Listed<'r, 'a> {
    reqs: &'r [Request<'a>],
    /// Each request's check, failing too once the call failed.
    checks: Vec<Box<dyn Fn() -> Result<()> + 'r>>,
    started: usize,
    replies: Vec<Option<Completion>>,
    failed: Option<anyhow::Error>,
    call_failed: Rc<Cell<bool>>,
    done: &'r mut dyn FnMut(usize, &Completion),
}

impl Requests for Listed<'_, '_> {
    fn next(&mut self, _: bool) -> Next {
        if self.failed.is_some() || self.started == self.reqs.len() {
            return Next::End;
        }
        self.started += 1;
        Next::Start(self.started - 1)
    }

    fn request(&self, id: usize) -> Request<'_> {
        Request { check: &*self.checks[id], ..self.reqs[id] }
    }

    fn done(&mut self, id: usize, reply: Result<Completion>) {
        match reply {
            Ok(c) => {
                (self.done)(id, &c);
                self.replies[id] = Some(c);
            }
            Err(e) => {
                self.call_failed.set(true);
                self.failed.get_or_insert(e);
            }
        }
    }
}

/// [`TextModel::complete_batch`] through [`TextModel::serve`]: the requests in order, the first
/// failure the call's.
pub fn complete_listed<M: TextModel + ?Sized>(
    model: &mut M,
    reqs: &[Request],
    width: usize,
    done: &mut dyn FnMut(usize, &Completion),
) -> Result<Vec<Completion>> {
    let call_failed = Rc::new(Cell::new(false));
    let checks = reqs
        .iter()
        .map(|r| {
            let (check, failed) = (r.check, call_failed.clone());
            Box::new(move || if failed.get() { bail!("another request of the call failed") } else { check() })
                as Box<dyn Fn() -> Result<()>>
        })
        .collect();
    let replies = vec![None; reqs.len()];
    let mut listed = Listed { reqs, checks, started: 0, replies, failed: None, call_failed, done };
    model.serve(&mut listed, width)?;
    match listed.failed {
        Some(e) => Err(e),
        None => Ok(listed.replies.into_iter().flatten().collect()),
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
    /// Generates a reply to each request, as [`Self::complete`] on each in turn would, and tells
    /// `done` each reply (with its request's index) as soon as it has it. A model may decode up
    /// to `width` of them together, one step for all, each request prefilled in order and
    /// joining as soon as one before it ends: what requests on one document (the same prefix,
    /// prefilled once) gain, since a decode step costs about the same for several.
    fn complete_batch(
        &mut self,
        reqs: &[Request],
        width: usize,
        done: &mut dyn FnMut(usize, &Completion),
    ) -> Result<Vec<Completion>> {
        complete_listed(self, reqs, width, done)
    }
    /// Answers the requests `requests` gives until it says [`Next::End`], decoding up to `width`
    /// of them together where the model batches, starting each as a row frees, and runs the work
    /// it hands over between steps. A request that fails (its prefill, its check, or a step of
    /// the model under it) is told so and the others go on.
    fn serve(&mut self, requests: &mut dyn Requests, width: usize) -> Result<()>;
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
