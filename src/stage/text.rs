//! What the text stages share: their sampling fields, their decode options, and the stage whose
//! answer is free text (`summarize`, `prompt`) with the reduce step that combines the answers of
//! several chunks into one.

use serde::Deserialize;

use super::{Answers, Call, Fields, Part, Runner, Stop, TextStage};
use crate::failure::{Failure, Reason};
use crate::llm::{DecodeOptions, Sampling};
use crate::output::StageResult;
use crate::tokenizer::STOP_TOKENS;

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

    fn finish(&self, runner: &mut Runner, answers: &mut Answers) -> Result<StageResult, Stop> {
        let reduce = self.generation.call((self.reduce)(&self.instruction));
        text_result(runner, &self.name, &reduce, answers)
    }
}

/// A stage whose answer is text: one chunk's answer as is, several combined by `reduce`.
fn text_result(runner: &mut Runner, stage: &str, reduce: &Call, answers: &mut Answers) -> Result<StageResult, Stop> {
    let parts: Vec<String> = answers.calls.iter().map(|c| c.text.clone()).collect();
    if let [only] = parts.as_slice() {
        return Ok(StageResult { output: only.clone().into(), ..StageResult::default() });
    }
    let output = combine(runner, stage, reduce, &parts, answers)?;
    Ok(StageResult { output: output.into(), parts: parts.into_iter().map(Into::into).collect(), ..StageResult::default() })
}

/// Combines the part answers with `reduce` calls; answers that do not fit one context together
/// are combined in groups first, level after level, until one answer is left. An answer longer
/// than a whole context is cut (and counted in `answers.truncated`).
fn combine(runner: &mut Runner, stage: &str, reduce: &Call, parts: &[String], answers: &mut Answers) -> Result<String, Stop> {
    let budget = answers.budget;
    let mut level: Vec<String> = parts
        .iter()
        .zip(&answers.chunked.chunks)
        .map(|(p, c)| format!("Part {} (pages {}–{}):\n{}", c.index + 1, c.first_page, c.last_page, p.trim()))
        .collect();
    loop {
        let tok = runner.tokenizer();
        let encoded: Vec<Vec<u32>> = level
            .iter()
            .map(|t| tok.encode(&format!("{t}\n\n")))
            .collect::<Result<_, _>>()
            .map_err(|e| Failure::new(Reason::Model, stage, format!("tokenizer: {e:#}")))?;
        // Group consecutive answers into contexts of at most `budget` tokens.
        let mut groups: Vec<Vec<u32>> = vec![Vec::new()];
        for mut e in encoded {
            if e.len() > budget {
                answers.truncated += 1;
                e.truncate(budget);
            }
            if groups.last().is_some_and(|g| !g.is_empty() && g.len() + e.len() > budget) {
                groups.push(Vec::new());
            }
            groups.last_mut().expect("one group").extend(e);
        }
        let mut next = Vec::new();
        for g in &groups {
            let done = runner.call(stage, g, reduce, false)?;
            next.push(done.text.clone());
            answers.calls.push(done);
        }
        if let [one] = next.as_slice() {
            return Ok(one.clone());
        }
        level = next;
    }
}
