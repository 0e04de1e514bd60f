//! A model for tests of the orchestration: a byte-per-token tokenizer, answers from a script,
//! and a record of every call, so that chunking, map-reduce, merging, retries and schedules run
//! in milliseconds and their logic can be asserted (a random-weight model's text cannot be).

use std::collections::VecDeque;

use anyhow::{Result, bail};
use image::RgbImage;

use super::{Completion, ModelInfo, OcrOptions, Request, StopCheck, TextModel, Transcription};
use crate::tokenizer::Tokenizer;

/// One call the fake model received.
#[derive(Clone, Debug)]
pub(crate) struct Asked {
    /// The document part of the prompt, as text.
    pub document: String,
    /// The instruction part, as text.
    pub instruction: String,
    /// The call carried a schema constraint.
    pub constrained: bool,
}

/// What the fake model answers.
pub(crate) enum Answer {
    /// This text.
    Text(String),
    /// This error (a model failure).
    Fail(String),
}

/// The fake model.
pub(crate) struct FakeModel {
    info: ModelInfo,
    tokenizer: Tokenizer,
    /// Answers in order; when they run out, `fallback` answers.
    script: VecDeque<Answer>,
    fallback: Box<dyn FnMut(&Asked) -> Answer + Send>,
    /// Every call, in order.
    pub asked: Vec<Asked>,
    /// Every batch asked: its calls and how many of them may decode at once.
    pub batches: Vec<(usize, usize)>,
}

/// The bytes of ids below 256 (the byte tokenizer's), as text; special tokens are left out.
fn text_of(ids: &[u32]) -> String {
    String::from_utf8_lossy(&ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect::<Vec<_>>()).into_owned()
}

impl FakeModel {
    /// A model whose every answer `fallback` decides; `max_context` tokens.
    pub fn new(max_context: usize, fallback: impl FnMut(&Asked) -> Answer + Send + 'static) -> Self {
        let info = ModelInfo {
            name: "fake".into(),
            source: "test".into(),
            precision: "none".into(),
            random_weights: true,
            max_context,
            vision: false,
        };
        Self {
            info,
            tokenizer: Tokenizer::bytes(),
            script: VecDeque::new(),
            fallback: Box::new(fallback),
            asked: Vec::new(),
            batches: Vec::new(),
        }
    }

    /// Answers these first, in order.
    pub fn script(mut self, answers: impl IntoIterator<Item = Answer>) -> Self {
        self.script.extend(answers);
        self
    }
}

impl TextModel for FakeModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn complete(&mut self, req: &Request) -> Result<Completion> {
        let asked = Asked { document: text_of(req.prefix), instruction: text_of(req.suffix), constrained: req.schema.is_some() };
        (req.check)()?;
        let answer = self.script.pop_front().unwrap_or_else(|| (self.fallback)(&asked));
        self.asked.push(asked);
        let text = match answer {
            Answer::Text(t) => t,
            Answer::Fail(why) => bail!("{why}"),
        };
        let prompt_tokens = req.prefix.len() + req.suffix.len();
        Ok(Completion {
            generated_tokens: text.len(),
            text,
            prompt_tokens,
            prefilled_tokens: prompt_tokens,
            stopped_by: "stop token 248046".into(),
            ..Completion::default()
        })
    }

    /// Answers in turn, as the default does, recording the batch.
    fn complete_batch(
        &mut self,
        reqs: &[Request],
        width: usize,
        done: &mut dyn FnMut(usize, &Completion),
    ) -> Result<Vec<Completion>> {
        self.batches.push((reqs.len(), width));
        super::complete_listed(self, reqs, width, done)
    }

    fn serve(&mut self, requests: &mut dyn super::Requests, _: usize) -> Result<()> {
        super::serve_in_turn(self, requests)
    }

    fn transcribe(&mut self, page: &RgbImage, label: &str, _: &OcrOptions, _: StopCheck) -> Result<Transcription> {
        let text = format!("{label}: {}×{} pixels", page.width(), page.height());
        Ok(Transcription { generated_tokens: text.len(), text, prompt_tokens: 64 })
    }

    /// A kilobyte per token of context: a budget caps the context where tests want it.
    fn planned_bytes(&self, context: usize, _: bool) -> u64 {
        context as u64 * 1024
    }

    /// As much again as one context, as a model that decodes a batch together would hold (this
    /// one answers its requests in turn).
    fn sequence_bytes(&self, context: usize) -> u64 {
        context as u64 * 1024
    }

    fn max_context_within(&self, budget: u64, _: bool) -> Option<usize> {
        let fit = (budget / 1024) as usize;
        (fit >= 512).then_some(fit.min(self.info.max_context))
    }
}
