//! What a stage runs its model calls through: the model, the attempt's deadline and shutdown
//! signal (polled between prefill chunks and tokens), and the step and prefill callbacks that
//! drive the ledger's stage column and the progress display.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use image::RgbImage;

use super::journal::{Journal, Key, KeyBuilder};
use crate::chat;
use crate::constrain::Schema;
use crate::failure::{Failure, Reason};
use crate::llm::{Completion, DecodeOptions, OcrOptions, Request, TextModel, Transcription};
use crate::tokenizer::Tokenizer;

/// How an attempt ended other than with a result.
#[derive(Debug)]
pub enum Stop {
    /// The document failed (counts as an attempt).
    Failed(Failure),
    /// Shutdown was requested: put the job back, it did not fail.
    Interrupted,
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

/// One model call a text stage asks for on a piece of the document.
#[derive(Clone)]
pub struct Call<'a> {
    /// The instruction after the document.
    pub instruction: String,
    /// Limits and sampling.
    pub options: DecodeOptions,
    /// Think before answering.
    pub thinking: bool,
    /// Constrain the answer to JSON matching this schema.
    pub schema: Option<&'a Schema>,
    /// With a schema and thinking: the think block's budget.
    pub think_budget: Option<usize>,
}

/// One call of a [`Runner::call_batch`].
pub struct Asked<'a> {
    /// The stage asking (progress, errors).
    pub stage: &'a str,
    /// The document's tokens.
    pub document: &'a [u32],
    /// What it asks.
    pub call: &'a Call<'a>,
    /// Keep the document's prefill for the call after it, which is on the same document.
    pub keep: bool,
}

/// The model and the attempt's limits, as stages see them.
pub struct Runner<'a> {
    /// The model.
    pub model: &'a mut dyn TextModel,
    /// The attempt fails with `timeout` after this instant.
    pub deadline: Instant,
    /// Set on shutdown: the attempt stops at the next chunk or token.
    pub shutdown: &'a AtomicBool,
    /// Set when another worker took the job over (its lease was lost, `daemon/heartbeat.rs`):
    /// the attempt stops the same way, its work being someone else's now.
    pub abandoned: &'a AtomicBool,
    /// Told when a step starts (ledger stage, progress display).
    pub on_step: &'a mut dyn FnMut(&str),
    /// Told how many prompt tokens each prefill chunk consumed.
    pub on_prefill: &'a dyn Fn(usize),
    /// Told at every interruption check (between steps, prefill chunks and tokens): the
    /// attempt is making progress.
    pub heartbeat: &'a dyn Fn(),
    /// Told when a child process starts (`true`) and stops decoding the document's bytes: the
    /// daemon only waits meanwhile, so if it dies then, the document is not to blame.
    pub on_child: &'a dyn Fn(bool),
    /// Where the job's completed model calls are kept for its later attempts (the daemon's
    /// jobs; `None`: every call is computed).
    pub journal: Option<&'a Journal>,
}

impl Runner<'_> {
    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.model.tokenizer()
    }

    /// Runs `f`, which waits for a child process that decodes the document's bytes.
    pub fn in_child<T>(&self, f: impl FnOnce() -> T) -> T {
        (self.on_child)(true);
        let r = f();
        (self.on_child)(false);
        r
    }

    /// A step named `name` starts.
    pub fn step(&mut self, name: &str) {
        (self.on_step)(name);
    }

    /// Stops the attempt on timeout or shutdown.
    pub fn check(&self, stage: &str) -> Result<(), Stop> {
        (self.heartbeat)();
        interruption([self.shutdown, self.abandoned], self.deadline, stage).map_or(Ok(()), Err)
    }

    /// Runs every call of `asked` and returns their answers in order: each prompt is prefilled
    /// in turn (a document shared with the call before it reused, as `keep` says) and decoded
    /// with up to `width - 1` others, joining as soon as one ends (`TextModel::complete_batch`),
    /// giving what each would give alone. Calls an earlier attempt answered come from the job's
    /// journal; the others are kept there as each ends.
    pub fn call_batch(&mut self, asked: &[Asked], width: usize) -> Result<Vec<Completion>, Stop> {
        let mut stages: Vec<&str> = Vec::new();
        for a in asked {
            if !stages.contains(&a.stage) {
                stages.push(a.stage);
            }
        }
        let step = stages.join("+");
        self.step(&step);
        let model_err = |stage: &str, e: anyhow::Error| Failure::new(Reason::Model, stage, format!("{e:#}"));
        let mut prompts = Vec::with_capacity(asked.len());
        for a in asked {
            let tok = self.model.tokenizer();
            let p =
                chat::stage_prompt(tok, a.document, &a.call.instruction, a.call.thinking).map_err(|e| model_err(a.stage, e))?;
            prompts.push(p);
        }
        let name = &self.model.info().name;
        let keys: Vec<Option<Key>> =
            prompts.iter().zip(asked).map(|((p, s), a)| self.journal.map(|_| completion_key(name, p, s, a.call))).collect();
        let mut answers: Vec<Option<Completion>> = keys
            .iter()
            .zip(asked)
            .map(|(k, a)| {
                let done = self.journal.zip(k.as_ref()).and_then(|(j, k)| j.get::<Completion>(k))?;
                tracing::info!(
                    "{}: answer of an earlier attempt ({} tokens), from the job's journal",
                    a.stage,
                    done.generated_tokens
                );
                Some(done)
            })
            .collect();
        let pending: Vec<usize> = (0..asked.len()).filter(|&i| answers[i].is_none()).collect();
        if !pending.is_empty() {
            let (on_prefill, model) = (self.on_prefill, &mut *self.model);
            let result = interruptible([self.shutdown, self.abandoned], self.deadline, self.heartbeat, &step, |check| {
                let requests: Vec<Request> = pending
                    .iter()
                    .map(|&i| Request {
                        prefix: &prompts[i].0,
                        suffix: &prompts[i].1,
                        keep_prefix: asked[i].keep,
                        options: &asked[i].call.options,
                        check,
                        on_prefill,
                        schema: asked[i].call.schema,
                        think_budget: asked[i].call.think_budget,
                    })
                    .collect();
                // Each answer is kept as soon as it is there: should a later one fail, or the
                // process die, the next attempt asks only for what is missing.
                let journal = self.journal;
                model.complete_batch(&requests, width, &mut |r, c| {
                    if let (Some(j), Some(k)) = (journal, &keys[pending[r]]) {
                        j.put(k, c);
                    }
                })
            })?;
            let done = result.map_err(|e| model_err(&step, e))?;
            for (i, c) in pending.into_iter().zip(done) {
                answers[i] = Some(c);
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Transcribes one page image for stage `stage`; a page that cannot be read is the inner
    /// error, an interruption the outer one.
    pub fn transcribe(
        &mut self,
        stage: &str,
        page: &RgbImage,
        label: &str,
        opts: &OcrOptions,
    ) -> Result<anyhow::Result<Transcription>, Stop> {
        // Images asked for on disk are written by the call itself: it runs.
        let journal = self.journal.filter(|_| opts.save_images.is_none());
        let key = journal.map(|_| transcription_key(&self.model.info().name, page, opts));
        if let Some(done) = journal.zip(key.as_ref()).and_then(|(j, k)| j.get::<Transcription>(k)) {
            tracing::info!("{stage}: {label} transcribed by an earlier attempt, from the job's journal");
            return Ok(Ok(done));
        }
        let model = &mut *self.model;
        let result = interruptible([self.shutdown, self.abandoned], self.deadline, self.heartbeat, stage, |check| {
            model.transcribe(page, label, opts, check)
        })?;
        if let (Ok(done), Some(j), Some(k)) = (&result, journal, &key) {
            j.put(k, done);
        }
        Ok(result)
    }
}

/// What decides a text call's answer (`stage/journal.rs`).
fn completion_key(model: &str, prefix: &[u32], suffix: &[u32], call: &Call) -> Key {
    let (o, s) = (&call.options, &call.options.sampling);
    KeyBuilder::new("complete", model)
        .ids(prefix)
        .ids(suffix)
        .number(o.max_new_tokens as u64)
        .ids(&o.stop_tokens)
        .number(s.temperature.to_bits().into())
        .number(s.top_k as u64)
        .number(s.top_p.to_bits().into())
        .number(s.seed)
        .text(&call.schema.map(|x| x.value().to_string()).unwrap_or_default())
        .number(call.think_budget.map_or(u64::MAX, |b| b as u64))
        .finish()
}

/// What decides a page's transcription.
fn transcription_key(model: &str, page: &RgbImage, opts: &OcrOptions) -> Key {
    KeyBuilder::new("transcribe", model)
        .number(page.width().into())
        .number(page.height().into())
        .bytes(page.as_raw())
        .number(opts.image.min_pixels)
        .number(opts.image.max_pixels)
        .number(opts.tile_tokens.unwrap_or(u64::MAX))
        .number(opts.max_new_tokens as u64)
        .text(&opts.instruction)
        .finish()
}

/// Why the attempt must stop now (shutdown, a lost lease, or past the deadline), if it must.
fn interruption(stop: [&AtomicBool; 2], deadline: Instant, stage: &str) -> Option<Stop> {
    if stop.iter().any(|s| s.load(Ordering::Relaxed)) {
        return Some(Stop::Interrupted);
    }
    (Instant::now() > deadline)
        .then(|| Failure::new(Reason::Timeout, stage, "the document ran past its time limit (limits.document_timeout)").into())
}

/// The error a model call sees when it is told to stop; it carries the reason back through the
/// model's `anyhow` errors.
#[derive(Debug, thiserror::Error)]
#[error("stopped")]
struct Stopped(Stop);

/// Runs a model call that polls `check` between chunks and tokens. The model sees an opaque
/// error when it is told to stop; the reason (shutdown, timeout) comes back out as a [`Stop`].
fn interruptible<T>(
    stop: [&AtomicBool; 2],
    deadline: Instant,
    heartbeat: &dyn Fn(),
    stage: &str,
    f: impl FnOnce(&dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<T>,
) -> Result<anyhow::Result<T>, Stop> {
    let check = || -> anyhow::Result<()> {
        heartbeat();
        interruption(stop, deadline, stage).map_or(Ok(()), |stop| Err(Stopped(stop).into()))
    };
    match f(&check) {
        Err(e) => match e.downcast::<Stopped>() {
            Ok(Stopped(stop)) => Err(stop),
            Err(e) => Ok(Err(e)),
        },
        Ok(v) => Ok(Ok(v)),
    }
}
