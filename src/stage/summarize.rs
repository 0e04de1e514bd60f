//! `summarize`: a summary of the document, map-reduce when it does not fit one context (a
//! summary of each part, then one summary of those).

use std::sync::Arc;

use serde::Deserialize;

use super::text::{self, Generation, SAMPLING_KEYS, SamplingFields};
use super::{Answers, Body, Call, Fields, Part, Runner, Stop, TextStage};
use crate::output::StageResult;

/// Built-in instruction of `summarize` stages.
const INSTRUCTION: &str = "Summarise the document above for a reader who has not seen it: what kind of document it is, \
who is involved, and the key facts, dates, amounts and obligations. Answer in the document's language.";

/// What a `summarize` stage takes in a pipeline file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Replaces the built-in instruction.
    #[serde(default)]
    instruction: Option<String>,
    /// Longest answer per call, in tokens.
    #[serde(default = "text::default_max_new_tokens")]
    max_new_tokens: usize,
    /// Think before answering (off: results should be answers, not reasoning).
    #[serde(default)]
    thinking: bool,
}

struct Summarize {
    name: String,
    instruction: String,
    generation: Generation,
}

pub(super) fn build(fields: &Fields) -> anyhow::Result<Body> {
    let (sampling, c): (SamplingFields, Config) = fields.parse_split(&SAMPLING_KEYS)?;
    Ok(Body::Text(Arc::new(Summarize {
        name: fields.name().to_string(),
        instruction: c.instruction.map(|t| t.trim().to_string()).unwrap_or_else(|| INSTRUCTION.to_string()),
        generation: Generation::new(c.max_new_tokens, c.thinking, &sampling, fields)?,
    })))
}

fn map_instruction(part: Part) -> String {
    format!(
        "The text above is part {} of {} of a longer document. Summarise this part: the key facts, dates, amounts and \
         obligations it contains.",
        part.index, part.of
    )
}

impl TextStage for Summarize {
    fn output_tokens(&self) -> usize {
        self.generation.max_new_tokens
    }

    fn call(&self, part: Option<Part>) -> Call<'_> {
        self.generation.call(part.map_or_else(|| self.instruction.clone(), map_instruction))
    }

    fn longest_instruction(&self) -> String {
        format!("{} {}", map_instruction(Part { index: 999, of: 999 }), self.instruction)
    }

    fn finish(&self, runner: &mut Runner, answers: &mut Answers) -> Result<StageResult, Stop> {
        let reduce = self.generation.call(
            "The text above holds summaries of the consecutive parts of one document. Write one summary of the whole \
             document from them."
                .to_string(),
        );
        text::text_result(runner, &self.name, &reduce, answers)
    }
}
