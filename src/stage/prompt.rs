//! `prompt`: the pipeline's own instruction over the document, map-reduce when it does not fit
//! one context (the instruction answered per part, then the answers combined).

use std::sync::Arc;

use serde::Deserialize;

use super::text::{self, FreeText, Generation, SAMPLING_KEYS, SamplingFields};
use super::{Body, Fields, Part};

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

pub(super) fn build(fields: &Fields) -> anyhow::Result<Body> {
    let (sampling, c): (SamplingFields, Config) = fields.parse_split(&SAMPLING_KEYS)?;
    let instruction = c.instruction.trim().to_string();
    if instruction.is_empty() {
        return Err(fields.error("instruction", "a `prompt` stage needs an instruction"));
    }
    Ok(Body::Text(Arc::new(FreeText {
        name: fields.name().to_string(),
        instruction,
        map: map_instruction,
        reduce: reduce_instruction,
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

fn reduce_instruction(instruction: &str) -> String {
    format!(
        "The text above holds answers to one instruction from the consecutive parts of one document. Combine them into \
         one answer to the instruction, leaving out parts that had nothing.\n\nInstruction: {instruction}"
    )
}
