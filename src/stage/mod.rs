//! Stages: what a pipeline does to a document with the model. Each kind is one file that owns
//! its configuration fields and their checks, its prompts, how it runs and what it puts in the
//! result; [`KINDS`] registers it. The pipeline runs the stages in order and knows none of
//! their internals.
//!
//! Two shapes of stage exist. A [`PageStage`] works on the pages extraction left without text
//! (the `ocr` kind reads their images) before the document is chunked. A [`TextStage`] runs on
//! the chunks: the pipeline asks it for one [`Call`] per chunk, so that all stages of a chunk
//! share one prefill of it, then hands it every answer to [`finish`](TextStage::finish)
//! (combine them with more calls, merge them, vote). docs/architecture.md, "Adding a stage
//! kind", walks through `classify.rs` as the example.

mod classify;
mod extract;
mod journal;
mod merge;
mod ocr;
mod prompt;
mod runner;
mod summarize;
mod text;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_saphyr::Spanned;

pub use journal::Journal;
pub use ocr::{DEFAULT_PAGE_TOKENS, OCR_INSTRUCTION};
pub use runner::{Asked, Call, Runner, Stop};

use crate::chunk::Chunked;
use crate::extract::Page;
use crate::extract::isolated::Extraction;
use crate::llm::Completion;
use crate::output::StageResult;
use crate::tokenizer::Tokenizer;

/// A stage as written in a pipeline file: its fields, each with its place in the file.
pub type StageEntry = Spanned<BTreeMap<String, Spanned<Value>>>;

/// How a kind turns its fields into a stage.
type Build = fn(&Fields) -> Result<Body>;

/// Every stage kind: the name `kind:` takes and how to build one. A new kind is a file of its
/// own and one line here.
const KINDS: &[(&str, Build)] = &[
    ("summarize", summarize::build),
    ("prompt", prompt::build),
    ("extract", extract::build),
    ("ocr", ocr::build),
    ("classify", classify::build),
];

/// A configured, checked stage.
#[derive(Clone)]
pub struct Stage {
    name: String,
    kind: &'static str,
    /// What it does.
    pub body: Body,
}

/// What a stage does, by its shape.
#[derive(Clone)]
pub enum Body {
    /// Runs on the pages extraction could not read, before chunking.
    Pages(Arc<dyn PageStage>),
    /// Runs on the document's text, chunk by chunk.
    Text(Arc<dyn TextStage>),
}

impl Stage {
    /// Its name (the key of its output in the result).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its kind, as `kind:` names it.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// One line for `deltadoc config check`.
    pub fn describe(&self) -> String {
        let detail = match &self.body {
            Body::Text(s) => s.detail(),
            Body::Pages(_) => None,
        };
        match detail {
            Some(d) => format!("{} ({}, {d})", self.name, self.kind),
            None => format!("{} ({})", self.name, self.kind),
        }
    }
}

impl fmt::Debug for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.kind)
    }
}

/// The pages a page stage reads.
pub struct PageDoc<'a> {
    /// The document.
    pub source: &'a Path,
    /// Where its page images are composed (never in this process).
    pub extraction: &'a Extraction,
    /// Every page; those with method `ocr` are the stage's to fill in.
    pub pages: &'a mut [Page],
}

/// A stage that reads page images.
pub trait PageStage: Send + Sync {
    /// Reads the pages extraction left without text, filling in their text.
    fn run(&self, runner: &mut Runner, doc: &mut PageDoc) -> Result<StageResult, Stop>;
}

/// Which piece of a chunked document a call is about (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// This part.
    pub index: usize,
    /// Parts in all.
    pub of: usize,
}

/// The answers of a text stage for every chunk, for [`TextStage::finish`].
pub struct Answers<'a> {
    /// Every call so far, the chunks' in order first; the answers to each [`Finish::Ask`] are
    /// appended.
    pub calls: Vec<Completion>,
    /// Where the answers of the last round begin in `calls`: 0 while only the chunks' are in.
    pub from: usize,
    /// The chunks the calls answered.
    pub chunked: &'a Chunked,
    /// Tokens of document text one call can take.
    pub budget: usize,
    /// Inputs that had to be cut to fit a context (reported as a warning).
    pub truncated: usize,
}

/// What a text stage's [`TextStage::finish`] gives.
pub enum Finish<'s> {
    /// The stage's result (boxed: it is far larger than the other variant).
    Done(Box<StageResult>),
    /// These documents, each asked `call`, before the stage can finish.
    Ask(Vec<Vec<u32>>, Call<'s>),
}

/// A stage that runs on the document's text.
pub trait TextStage: Send + Sync {
    /// Tokens one of its calls may generate.
    fn output_tokens(&self) -> usize;
    /// The call on the whole document (`None`) or on one part of it.
    fn call(&self, part: Option<Part>) -> Call<'_>;
    /// The longest instruction any of its calls carries, for the token budget.
    fn longest_instruction(&self) -> String;
    /// The stage's result from the answers, or the calls it needs answered first (a reduce
    /// step). The pipeline asks again once they are in `answers`, decoding the calls every
    /// stage asks in the same round together.
    fn finish(&self, tok: &Tokenizer, answers: &mut Answers) -> Result<Finish<'_>, Stop>;
    /// What `deltadoc config check` says about it besides its name and kind.
    fn detail(&self) -> Option<String> {
        None
    }
}

/// Tokens a stage needs in a context besides the document: its prompt around the document at
/// its longest, and its output.
pub fn reserve(stage: &dyn TextStage, tok: &Tokenizer) -> Result<usize> {
    let (prefix, suffix) = crate::chat::stage_prompt(tok, &[], &stage.longest_instruction(), true)?;
    Ok(prefix.len() + suffix.len() + 4 + stage.output_tokens())
}

/// What a pipeline file says around its stages, which some kinds check against.
pub struct PipelineFile<'a> {
    /// The pipeline file (locations in errors; schema files resolve next to it).
    pub path: &'a Path,
    /// The pipeline's context in tokens.
    pub context_tokens: usize,
}

/// One stage's fields as a kind reads them: everything but `name` and `kind`.
pub struct Fields<'a> {
    file: &'a PipelineFile<'a>,
    index: usize,
    entry: &'a StageEntry,
    name: String,
}

impl Fields<'_> {
    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pipeline file around the stage.
    pub fn file(&self) -> &PipelineFile<'_> {
        self.file
    }

    /// The fields as the kind's configuration type; an error names the field and its place.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        self.parse_keys(|k| k != "name" && k != "kind")
    }

    /// The fields named in `keys` as `A` (a group several kinds share), the others as `B`.
    pub fn parse_split<A: DeserializeOwned, B: DeserializeOwned>(&self, keys: &[&str]) -> Result<(A, B)> {
        Ok((self.parse_keys(|k| keys.contains(&k))?, self.parse_keys(|k| k != "name" && k != "kind" && !keys.contains(&k))?))
    }

    fn parse_keys<T: DeserializeOwned>(&self, keep: impl Fn(&str) -> bool) -> Result<T> {
        let map: serde_json::Map<String, Value> =
            self.entry.value.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.value.clone())).collect();
        serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
            let field = e.path().iter().next().map(|s| s.to_string()).unwrap_or_default();
            // Unknown and missing fields fail at the stage itself; name them from the message.
            let field = if field.is_empty() || field == "." { named_field(e.inner()).unwrap_or_default() } else { field };
            self.error(&field, e.into_inner())
        })
    }

    /// An error about `field` (empty: the stage as a whole), at its place in the file.
    pub fn error(&self, field: &str, msg: impl fmt::Display) -> anyhow::Error {
        let at = self.entry.value.get(field).map(|v| &v.referenced).unwrap_or(&self.entry.referenced);
        let path = if field.is_empty() { format!("stages[{}]", self.index) } else { format!("stages[{}].{field}", self.index) };
        anyhow!("{}:{}:{}: field `{path}`: {msg}", self.file.path.display(), at.line(), at.column())
    }
}

/// The field an "unknown field" or "missing field" error names.
fn named_field(e: &serde_json::Error) -> Option<String> {
    let msg = e.to_string();
    let rest = msg.strip_prefix("unknown field `").or_else(|| msg.strip_prefix("missing field `"))?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Builds every stage of a pipeline file, checking what no single kind can: names present,
/// well-formed and unique, kinds known, at most one page stage, at least one stage.
pub fn build_all(file: &PipelineFile, entries: &[StageEntry]) -> Result<Vec<Stage>> {
    if entries.is_empty() {
        bail!("{}: field `stages`: at least one stage is needed", file.path.display());
    }
    let mut stages: Vec<Stage> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let located = Fields { file, index, entry, name: String::new() };
        let text = |key: &str| -> Result<String> {
            match entry.value.get(key).map(|v| &v.value) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(located.error(key, format!("expected a string, found {other}"))),
                None => Err(located.error("", format!("`{key}` is missing"))),
            }
        };
        let name = text("name")?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(located.error("name", format!("{name:?} must be letters, digits, '-' or '_'")));
        }
        if stages.iter().any(|s| s.name() == name) {
            return Err(located.error("name", format!("stage {name:?} appears twice")));
        }
        let kind = text("kind")?;
        let Some(&(kind, build)) = KINDS.iter().find(|(k, _)| *k == kind) else {
            let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
            return Err(located.error("kind", format!("unknown kind {kind:?}, expected one of {}", known.join(", "))));
        };
        let body = build(&Fields { name: name.clone(), ..located })?;
        let stage = Stage { name, kind, body };
        let pages = |s: &Stage| matches!(s.body, Body::Pages(_));
        if pages(&stage) && stages.iter().any(pages) {
            bail!("{}: field `stages`: at most one `ocr` stage", file.path.display());
        }
        stages.push(stage);
    }
    Ok(stages)
}
