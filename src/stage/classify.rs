//! `classify`: one label for the document, out of the `labels` its pipeline lists. The answer
//! is constrained to those labels (a JSON string whose schema is their enum), so it is always
//! one of them whatever the model does. A long document gets a label per chunk, and the label
//! most chunks gave wins (on a tie, the one given first in document order); the per-chunk
//! labels stay in `parts`.
//!
//! ```yaml
//! - name: doctype
//!   kind: classify
//!   labels: [contract, invoice, letter, other]
//!   instruction: What kind of document is this?   # optional
//! ```

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::text::{self, SAMPLING_KEYS, SamplingFields};
use super::{Answers, Body, Call, Fields, Finish, Part, Stop, TextStage};
use crate::constrain::Schema;
use crate::failure::{Failure, Reason};
use crate::llm::Sampling;
use crate::output::StageResult;
use crate::tokenizer::Tokenizer;

/// Instruction of a `classify` stage that does not set one.
const INSTRUCTION: &str = "Which of the labels below fits the document above best?";

/// What a `classify` stage takes in a pipeline file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The labels to choose from (two or more, distinct).
    #[serde(default)]
    labels: Vec<String>,
    /// The question the label answers.
    #[serde(default)]
    instruction: Option<String>,
}

struct Classify {
    name: String,
    instruction: String,
    labels: Vec<String>,
    /// `{"enum": labels}`: the answer is one of them, as a JSON string.
    schema: Schema,
    sampling: Sampling,
}

pub(super) fn build(fields: &Fields) -> anyhow::Result<Body> {
    let (sampling, c): (SamplingFields, Config) = fields.parse_split(&SAMPLING_KEYS)?;
    let labels: Vec<String> = c.labels.iter().map(|l| l.trim().to_string()).collect();
    if labels.len() < 2 {
        return Err(fields.error("labels", "a `classify` stage needs at least two labels"));
    }
    if let Some(l) = labels.iter().find(|l| l.is_empty() || l.len() > 200) {
        return Err(fields.error("labels", format!("label {l:?} must have 1 to 200 characters")));
    }
    if let Some(l) = labels.iter().enumerate().find_map(|(i, l)| labels[..i].contains(l).then_some(l)) {
        return Err(fields.error("labels", format!("label {l:?} appears twice")));
    }
    let schema = Schema::new(json!({ "enum": labels })).map_err(|e| fields.error("labels", format!("{e:#}")))?;
    Ok(Body::Text(Arc::new(Classify {
        name: fields.name().to_string(),
        instruction: c.instruction.map(|t| t.trim().to_string()).unwrap_or_else(|| INSTRUCTION.to_string()),
        labels,
        schema,
        sampling: sampling.check(fields)?,
    })))
}

impl Classify {
    fn ask(&self, question: String) -> Call<'_> {
        let quoted: Vec<String> = self.labels.iter().map(|l| Value::from(l.as_str()).to_string()).collect();
        Call {
            instruction: format!("{question}\n\nReply with exactly one of these labels, as a JSON string: {}", quoted.join(", ")),
            options: text::options(self.schema.max_tokens() + 1, &self.sampling),
            thinking: false,
            schema: Some(&self.schema),
            think_budget: None,
        }
    }

    fn map_question(&self, part: Part) -> String {
        format!(
            "The text above is part {} of {} of a longer document. Judging by this part: {}",
            part.index, part.of, self.instruction
        )
    }

    /// The label an answer gives (the constraint allows nothing else; checked all the same).
    fn label(&self, chunk: usize, text: &str) -> Result<String, Stop> {
        let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        match value.as_str() {
            Some(l) if self.labels.iter().any(|x| x == l) => Ok(l.to_string()),
            _ => Err(Stop::Failed(Failure::new(
                Reason::Model,
                self.name.clone(),
                format!("chunk {chunk}: constrained answer {text:?} is not one of the labels"),
            ))),
        }
    }
}

impl TextStage for Classify {
    fn output_tokens(&self) -> usize {
        self.schema.max_tokens() + 1
    }

    fn call(&self, part: Option<Part>) -> Call<'_> {
        self.ask(part.map_or_else(|| self.instruction.clone(), |p| self.map_question(p)))
    }

    fn longest_instruction(&self) -> String {
        self.ask(self.map_question(Part { index: 999, of: 999 })).instruction
    }

    fn detail(&self) -> Option<String> {
        Some(format!("labels {}", self.labels.join(" | ")))
    }

    fn finish(&self, _: &Tokenizer, answers: &mut Answers) -> Result<Finish<'_>, Stop> {
        let chunks = &answers.chunked.chunks;
        let labels: Vec<String> =
            answers.calls.iter().zip(chunks).map(|(c, chunk)| self.label(chunk.index, &c.text)).collect::<Result<_, _>>()?;
        // Most votes; on a tie the label given first in document order.
        let count = |l: &String| labels.iter().filter(|x| *x == l).count();
        let winner = labels.iter().fold(None::<&String>, |best, l| match best {
            Some(b) if count(b) >= count(l) => Some(b),
            _ => Some(l),
        });
        Ok(Finish::Done(Box::new(StageResult {
            output: winner.cloned().unwrap_or_default().into(),
            parts: if labels.len() > 1 { labels.iter().map(|l| Value::from(l.as_str())).collect() } else { Vec::new() },
            ..StageResult::default()
        })))
    }
}
