//! `prompt`: the pipeline's own instruction over the document, map-reduce when it does not fit
//! one context (the instruction answered per part, then the answers combined).

use std::sync::Arc;

use serde::Deserialize;

use super::text::{self, Generation, SAMPLING_KEYS, SamplingFields};
use super::{Answers, Body, Call, Fields, Part, Runner, Stop, TextStage};
use crate::output::StageResult;

/// What a `prompt` stage takes in a pipeline file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// What to do with the document.
    #[serde(default)]
    instruction: String,
    /// Longest answer per call, in tokens.
    #[serde(default = "text::default_max_new_tokens")]
    max_new_tokens: usize,
    /// Think before answering.
    #[serde(default)]
    thinking: bool,
}

struct Prompt {
    name: String,
    instruction: String,
    generation: Generation,
}

pub(super) fn build(fields: &Fields) -> anyhow::Result<Body> {
    let (sampling, c): (SamplingFields, Config) = fields.parse_split(&SAMPLING_KEYS)?;
    let instruction = c.instruction.trim().to_string();
    if instruction.is_empty() {
        return Err(fields.error("instruction", "a `prompt` stage needs an instruction"));
    }
    Ok(Body::Text(Arc::new(Prompt {
        name: fields.name().to_string(),
        instruction,
        generation: Generation::new(c.max_new_tokens, c.thinking, &sampling, fields)?,
    })))
}

/// The instruction for one part of a long document.
fn map_instruction(instruction: &str, part: Part) -> String {
    format!(
        "The text above is part {} of {} of a longer document. Using only this part, follow the instruction; answer \
         \"not in this part\" if the part has nothing for it.\n\nInstruction: {instruction}",
        part.index, part.of
    )
}

impl TextStage for Prompt {
    fn output_tokens(&self) -> usize {
        self.generation.max_new_tokens
    }

    fn call(&self, part: Option<Part>) -> Call<'_> {
        self.generation.call(part.map_or_else(|| self.instruction.clone(), |p| map_instruction(&self.instruction, p)))
    }

    fn longest_instruction(&self) -> String {
        format!("{} {}", map_instruction(&self.instruction, Part { index: 999, of: 999 }), self.instruction)
    }

    fn finish(&self, runner: &mut Runner, answers: &mut Answers) -> Result<StageResult, Stop> {
        let reduce = self.generation.call(format!(
            "The text above holds answers to one instruction from the consecutive parts of one document. Combine them \
             into one answer to the instruction, leaving out parts that had nothing.\n\nInstruction: {}",
            self.instruction
        ));
        text::text_result(runner, &self.name, &reduce, answers)
    }
}
