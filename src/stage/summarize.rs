//! `summarize`: a summary of the document, map-reduce when it does not fit one context (a
//! summary of each part, then one summary of those).

use std::sync::Arc;

use serde::Deserialize;

use super::text::{self, FreeText, Generation, SAMPLING_KEYS, SamplingFields};
use super::{Body, Fields, Part};

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

pub(super) fn build(fields: &Fields) -> anyhow::Result<Body> {
    let (sampling, c): (SamplingFields, Config) = fields.parse_split(&SAMPLING_KEYS)?;
    Ok(Body::Text(Arc::new(FreeText {
        name: fields.name().to_string(),
        instruction: c.instruction.map(|t| t.trim().to_string()).unwrap_or_else(|| INSTRUCTION.to_string()),
        map: map_instruction,
        reduce: reduce_instruction,
        generation: Generation::new(c.max_new_tokens, c.thinking, &sampling, fields)?,
    })))
}

/// A part is summarised on its own terms, whatever the stage's instruction.
fn map_instruction(_: &str, part: Part) -> String {
    format!(
        "The text above is part {} of {} of a longer document. Summarise this part: the key facts, dates, amounts and \
         obligations it contains.",
        part.index, part.of
    )
}

fn reduce_instruction(_: &str) -> String {
    "The text above holds summaries of the consecutive parts of one document. Write one summary of the whole document \
     from them."
        .to_string()
}
