//! `extract`: fields as JSON matching the stage's JSON Schema. Generation is constrained by the
//! schema ([`crate::constrain`]) and gets as many tokens as the longest output the schema
//! accepts, so the JSON always completes; a long document is extracted per chunk and the parts
//! merged by the schema ([`super::merge`]) with the chunk and pages of every value.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use serde::Deserialize;
use serde_json::Value;

use super::merge;
use super::text::{self, SAMPLING_KEYS, SamplingFields};
use super::{Answers, Body, Call, Fields, Finish, Part, Stop, TextStage};
use crate::constrain::Schema;
use crate::failure::{Failure, Reason};
use crate::llm::Sampling;
use crate::output::StageResult;
use crate::tokenizer::Tokenizer;

/// What an `extract` stage takes in a pipeline file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// What to extract.
    #[serde(default)]
    instruction: String,
    /// The JSON Schema of the output, inline or the path of a JSON or YAML file relative to the
    /// pipeline file.
    #[serde(default)]
    schema: Option<Value>,
    /// Think before the JSON (at most `think_budget` tokens, then `</think>` is forced).
    #[serde(default)]
    thinking: bool,
    /// Tokens the model may think before the JSON starts.
    #[serde(default = "default_think_budget")]
    think_budget: usize,
    /// Keep the reasoning in the result, beside the fields.
    #[serde(default)]
    keep_reasoning: bool,
}

fn default_think_budget() -> usize {
    1024
}

struct Extract {
    name: String,
    instruction: String,
    schema: Schema,
    thinking: bool,
    think_budget: usize,
    keep_reasoning: bool,
    sampling: Sampling,
}

pub(super) fn build(fields: &Fields) -> Result<Body> {
    let (sampling, c): (SamplingFields, Config) = fields.parse_split(&SAMPLING_KEYS)?;
    let instruction = c.instruction.trim().to_string();
    if instruction.is_empty() {
        return Err(fields.error("instruction", "an `extract` stage needs an instruction"));
    }
    let Some(schema) = &c.schema else { return Err(fields.error("schema", "an `extract` stage needs a JSON Schema")) };
    let file = fields.file();
    let schema = load_schema(file.path, schema).and_then(Schema::new).map_err(|e| fields.error("schema", format!("{e:#}")))?;
    let context = file.context_tokens;
    if schema.max_tokens() > context / 2 {
        let msg = format!(
            "outputs can take up to {} tokens, more than half the context ({context}); lower maxLength/maxItems",
            schema.max_tokens()
        );
        return Err(fields.error("schema", msg));
    }
    Ok(Body::Text(Arc::new(Extract {
        name: fields.name().to_string(),
        instruction,
        schema,
        thinking: c.thinking,
        think_budget: c.think_budget,
        keep_reasoning: c.keep_reasoning,
        sampling: sampling.check(fields)?,
    })))
}

/// An inline schema, or the JSON/YAML file a string names (relative to the pipeline file).
fn load_schema(pipeline_file: &Path, v: &Value) -> Result<Value> {
    let Value::String(rel) = v else { return Ok(v.clone()) };
    let dir = crate::util::absolute(pipeline_file)?.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = dir.join(rel);
    let text = std::fs::read_to_string(&path).with_context(|| format!("schema file {}: cannot read", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

impl Extract {
    /// The instruction as the model sees it: followed by the schema it must follow (the
    /// constraint enforces it either way; a real model answers better when it sees it).
    fn with_schema(&self, instruction: String) -> String {
        format!("{instruction}\n\nReply with one JSON object that matches this JSON Schema:\n{}", self.schema.value())
    }

    fn map_instruction(&self, part: Part) -> String {
        format!(
            "The text above is part {} of {} of a longer document. Fill the fields from this part only: use null or an \
             empty list for what it does not state.\n\nInstruction: {}",
            part.index, part.of, self.instruction
        )
    }

    fn bad(&self, msg: String) -> Stop {
        Stop::Failed(Failure::new(Reason::Model, self.name.clone(), msg))
    }
}

impl TextStage for Extract {
    /// The longest output the schema accepts (plus the thinking budget), so the JSON always
    /// completes.
    fn output_tokens(&self) -> usize {
        self.schema.max_tokens() + 1 + if self.thinking { self.think_budget } else { 0 }
    }

    fn call(&self, part: Option<Part>) -> Call<'_> {
        let instruction = part.map_or_else(|| self.instruction.clone(), |p| self.map_instruction(p));
        Call {
            instruction: self.with_schema(instruction),
            options: text::options(self.output_tokens(), &self.sampling),
            thinking: self.thinking,
            schema: Some(&self.schema),
            think_budget: self.thinking.then_some(self.think_budget),
        }
    }

    fn longest_instruction(&self) -> String {
        self.with_schema(format!("{} {}", self.map_instruction(Part { index: 999, of: 999 }), self.instruction))
    }

    fn detail(&self) -> Option<String> {
        Some(format!("output ≤ {} tokens", self.output_tokens()))
    }

    /// Each chunk's JSON parsed and validated, merged by the schema (with provenance) and
    /// validated again.
    fn finish(&self, _: &Tokenizer, answers: &mut Answers) -> Result<Finish<'_>, Stop> {
        let chunks = &answers.chunked.chunks;
        let mut parts = Vec::new();
        for (c, chunk) in answers.calls.iter().zip(chunks) {
            let v: Value = serde_json::from_str(&c.text).map_err(|e| {
                self.bad(format!("chunk {}: constrained output is not JSON ({e}; stopped by {})", chunk.index, c.stopped_by))
            })?;
            self.schema.validate(&v).map_err(|e| self.bad(format!("chunk {}: {e:#}", chunk.index)))?;
            parts.push(v);
        }
        let merge_parts: Vec<merge::Part> = parts
            .iter()
            .zip(chunks)
            .map(|(value, c)| merge::Part { value, chunk: c.index, pages: [c.first_page, c.last_page] })
            .collect();
        let (merged, provenance) = merge::merge(self.schema.value(), &merge_parts);
        self.schema.validate(&merged).map_err(|e| self.bad(format!("merged output of {} chunks: {e:#}", parts.len())))?;
        let calls = &answers.calls;
        let mask_s: f64 = calls.iter().map(|c| c.mask_s).sum();
        let mask_steps: usize = calls.iter().map(|c| c.mask_steps).sum();
        Ok(Finish::Done(Box::new(StageResult {
            output: merged,
            parts: if parts.len() > 1 { parts } else { Vec::new() },
            schema: Some(self.schema.value().clone()),
            provenance: serde_json::to_value(provenance).ok(),
            reasoning: if self.keep_reasoning { calls.iter().filter_map(|c| c.reasoning.clone()).collect() } else { Vec::new() },
            mask_ms_per_token: (mask_steps > 0).then(|| 1e3 * mask_s / mask_steps as f64),
            ..StageResult::default()
        })))
    }
}
