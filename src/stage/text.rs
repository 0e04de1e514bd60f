//! What the text stages share: their sampling fields, their decode options, and the stage whose
//! answer is free text (`summarize`, `prompt`) with the reduce step that combines the answers of
//! several chunks into one.

use serde::Deserialize;

use super::{Answers, Call, Fields, Finish, Part, Stop, TextStage};
use crate::failure::{Failure, Reason};
use crate::llm::{DecodeOptions, Sampling};
use crate::output::StageResult;
use crate::tokenizer::{STOP_TOKENS, Tokenizer};

/// Generation limit of a stage that does not set `max_new_tokens`.
pub(super) fn default_max_new_tokens() -> usize {
    512
}

/// The fields of [`SamplingFields`], which several kinds take.
pub(super) const SAMPLING_KEYS: [&str; 4] = ["temperature", "top_k", "top_p", "seed"];

/// How a stage's tokens are chosen (`temperature`, `top_k`, `top_p`, `seed` in the file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SamplingFields {
    /// 0 = greedy.
    #[serde(default)]
    temperature: f32,
    /// 0 = no top-k cut.
    #[serde(default)]
    top_k: usize,
    /// Nucleus mass.
    #[serde(default = "one")]
    top_p: f32,
    /// Sampling seed.
    #[serde(default)]
    seed: u64,
}

fn one() -> f32 {
    1.0
}

impl SamplingFields {
    /// The sampler's settings, once checked.
    pub(super) fn check(&self, fields: &Fields) -> anyhow::Result<Sampling> {
        if !(self.temperature >= 0.0 && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(fields.error("", "temperature must be ≥ 0 and top_p in (0, 1]"));
        }
        Ok(Sampling { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed })
    }
}

/// A stage's decode options: at most `max_new_tokens`, ending at the end of the turn.
pub(super) fn options(max_new_tokens: usize, sampling: &Sampling) -> DecodeOptions {
    DecodeOptions { max_new_tokens, sampling: sampling.clone(), stop_tokens: STOP_TOKENS.to_vec() }
}

/// How a stage whose answers are free text generates them.
pub(super) struct Generation {
    /// Longest answer per call.
    pub max_new_tokens: usize,
    /// Think before answering.
    pub thinking: bool,
    /// How tokens are chosen.
    pub sampling: Sampling,
}

impl Generation {
    /// Checked settings from a stage's fields.
    pub(super) fn new(max_new_tokens: usize, thinking: bool, sampling: &SamplingFields, fields: &Fields) -> anyhow::Result<Self> {
        Ok(Self { max_new_tokens: check_max_new_tokens(max_new_tokens, fields)?, thinking, sampling: sampling.check(fields)? })
    }

    /// The call that asks `instruction`.
    pub(super) fn call(&self, instruction: String) -> Call<'static> {
        Call {
            instruction,
            options: options(self.max_new_tokens, &self.sampling),
            thinking: self.thinking,
            schema: None,
            think_budget: None,
        }
    }
}

/// Checks `max_new_tokens`.
pub(super) fn check_max_new_tokens(n: usize, fields: &Fields) -> anyhow::Result<usize> {
    if n == 0 {
        return Err(fields.error("max_new_tokens", "must be at least 1"));
    }
    Ok(n)
}

/// A stage whose answer is free text to one instruction: asked of the whole document, or of
/// each part of a long one and the answers then combined. Its kind's file writes the
/// instructions.
pub(super) struct FreeText {
    /// The stage's name.
    pub name: String,
    /// The instruction over a whole document.
    pub instruction: String,
    /// The instruction over one part of a long document, from the stage's instruction.
    pub map: fn(&str, Part) -> String,
    /// The instruction that combines the parts' answers, from the stage's instruction.
    pub reduce: fn(&str) -> String,
    /// How the answers are generated.
    pub generation: Generation,
}

impl TextStage for FreeText {
    fn output_tokens(&self) -> usize {
        self.generation.max_new_tokens
    }

    fn call(&self, part: Option<Part>) -> Call<'_> {
        self.generation.call(part.map_or_else(|| self.instruction.clone(), |p| (self.map)(&self.instruction, p)))
    }

    fn longest_instruction(&self) -> String {
        format!("{} {}", (self.map)(&self.instruction, Part { index: 999, of: 999 }), self.instruction)
    }

    /// One chunk's answer as is; several are combined by reduce calls, in rounds: answers that
    /// do not fit one context together are combined in groups first, round after round, until
    /// one answer is left. An answer longer than a whole context is cut (and counted in
    /// `answers.truncated`).
    fn finish(&self, tok: &Tokenizer, answers: &mut Answers) -> Result<Finish<'_>, Stop> {
        let chunks = &answers.chunked.chunks;
        let first = answers.from == 0;
        if let [only] = &answers.calls[answers.from..] {
            let parts =
                if first { Vec::new() } else { answers.calls[..chunks.len()].iter().map(|c| c.text.clone().into()).collect() };
            return Ok(Finish::Done(Box::new(StageResult { output: only.text.clone().into(), parts, ..StageResult::default() })));
        }
        let level: Vec<String> = if first {
            answers
                .calls
                .iter()
                .zip(chunks)
                .map(|(p, c)| format!("Part {} (pages {}–{}):\n{}", c.index + 1, c.first_page, c.last_page, p.text.trim()))
                .collect()
        } else {
            answers.calls[answers.from..].iter().map(|c| c.text.clone()).collect()
        };
        let groups = group(tok, &self.name, &level, answers)?;
        Ok(Finish::Ask(groups, self.generation.call((self.reduce)(&self.instruction))))
    }
}

/// Consecutive answers gathered into contexts of at most `answers.budget` tokens each.
fn group(tok: &Tokenizer, stage: &str, level: &[String], answers: &mut Answers) -> Result<Vec<Vec<u32>>, Stop> {
    let budget = answers.budget;
    let mut groups: Vec<Vec<u32>> = vec![Vec::new()];
    for t in level {
        let mut e =
            tok.encode(&format!("{t}\n\n")).map_err(|e| Failure::new(Reason::Model, stage, format!("tokenizer: {e:#}")))?;
        if e.len() > budget {
            answers.truncated += 1;
            e.truncate(budget);
        }
        if groups.last().is_some_and(|g| !g.is_empty() && g.len() + e.len() > budget) {
            groups.push(Vec::new());
        }
        groups.last_mut().expect("one group").extend(e);
    }
    Ok(groups)
}
