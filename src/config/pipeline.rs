//! Pipeline definitions (`pipelines/*.yaml`): where documents come from, which stages run on
//! them, where results and failures go. Errors name the file, line and field.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::values::{CronExpr, Dur, GlobPattern, TimeZoneName, at, parse_yaml};
use crate::stage::{self, PipelineFile, Stage, StageEntry};
use crate::util::absolute;

/// One pipeline: where documents come from, what runs on them, where results go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Unique name (metrics label, ledger key, `--pipeline`).
    pub name: Spanned<String>,
    /// Bump it to have already processed documents processed again.
    #[serde(default = "one")]
    pub version: u32,
    /// What the pipeline is for.
    #[serde(default)]
    pub description: String,
    /// Higher runs first when several pipelines have work.
    #[serde(default)]
    pub priority: i32,
    /// Watched folders.
    pub inboxes: Vec<InboxSpec>,
    /// Result folder (mirrors the inbox layout).
    pub output: Spanned<PathBuf>,
    /// Failed documents and their error JSON (default: `<output>/../quarantine/<name>`).
    #[serde(default)]
    pub quarantine: Option<Spanned<PathBuf>>,
    /// Move failed documents out of the inbox or leave them and copy.
    #[serde(default)]
    pub quarantine_mode: QuarantineMode,
    /// What to do with a file whose content was already processed.
    #[serde(default)]
    pub duplicates: DuplicatePolicy,
    /// Absent: documents run as they arrive. Present: in the cron window only.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// Token budget.
    #[serde(default)]
    pub context: ContextSpec,
    /// Model stages, in order, as written; each kind reads its own fields (`src/stage/`).
    pub(crate) stages: Vec<StageEntry>,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// One inbox folder.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxSpec {
    /// The folder.
    pub path: Spanned<PathBuf>,
    /// Only paths (relative to the folder) matching one of these are taken; empty = all.
    #[serde(default)]
    pub include: Vec<GlobPattern>,
    /// Paths matching any of these are never taken.
    #[serde(default)]
    pub exclude: Vec<GlobPattern>,
    /// Descend into sub-folders.
    #[serde(default = "yes")]
    pub recursive: bool,
}

/// Where failed documents go.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineMode {
    /// Take the file out of the inbox.
    #[default]
    Move,
    /// Leave the inbox untouched.
    Copy,
}

/// Content already processed under another name.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DuplicatePolicy {
    /// Record it as a duplicate, write nothing.
    #[default]
    Skip,
    /// Process it again.
    Reprocess,
}

/// A cron window.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Five-field cron expression (`0 2 * * *`).
    pub cron: CronExpr,
    /// IANA time zone the expression is read in.
    #[serde(default = "utc")]
    pub timezone: TimeZoneName,
    /// How long a run may take before it is reported as overrunning.
    pub window: Dur,
}

fn utc() -> TimeZoneName {
    TimeZoneName { name: "UTC".into(), tz: jiff::tz::TimeZone::UTC }
}

/// Context budget of a pipeline.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextSpec {
    /// Tokens per model context (capped by the model's own maximum).
    pub max_tokens: usize,
    /// Tokens of a chunk repeated at the start of the next one.
    pub overlap: usize,
}

impl Default for ContextSpec {
    fn default() -> Self {
        Self { max_tokens: 262_144, overlap: 256 }
    }
}

/// A pipeline with its source file and resolved paths.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// As written.
    pub spec: PipelineSpec,
    /// The YAML file it came from.
    pub file: PathBuf,
    /// Inbox folders, absolute.
    pub inboxes: Vec<PathBuf>,
    /// Output folder, absolute.
    pub output: PathBuf,
    /// Quarantine folder, absolute.
    pub quarantine: PathBuf,
    /// The stages, built and checked.
    pub(crate) stages: Vec<Stage>,
}

impl Pipeline {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.spec.name.value
    }
}

/// Loads every `*.yaml` of `dir` and checks them together (unique names, no output folder
/// inside an inbox).
pub fn load_pipelines(dir: &Path, data_dir: Option<&Path>) -> Result<Vec<Pipeline>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the pipelines folder", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no pipeline definitions (*.yaml)", dir.display());
    }
    let mut out: Vec<Pipeline> = Vec::new();
    for f in files {
        let p = load_pipeline(&f, data_dir)?;
        if let Some(other) = out.iter().find(|o| o.name() == p.name()) {
            bail!("{}: field `name`: pipeline {:?} is also defined in {}", at(&f, &p.spec.name), p.name(), other.file.display());
        }
        out.push(p);
    }
    // An output folder inside any inbox would feed results back in forever.
    for p in &out {
        let quarantine_at = p.spec.quarantine.as_ref().map_or_else(|| at(&p.file, &p.spec.output), |q| at(&p.file, q));
        for (dir, what, place) in
            [(&p.output, "output", at(&p.file, &p.spec.output)), (&p.quarantine, "quarantine", quarantine_at)]
        {
            for q in &out {
                for inbox in &q.inboxes {
                    if dir.starts_with(inbox) || inbox.starts_with(dir) {
                        bail!(
                            "{}: field `{what}`: {} overlaps inbox {} of pipeline {:?}; results would be taken as new documents",
                            place,
                            dir.display(),
                            inbox.display(),
                            q.name()
                        );
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(out)
}

/// Loads and checks one pipeline file; relative paths are relative to `data_dir`, else to the
/// folder holding the pipelines folder (the repository or install root).
pub fn load_pipeline(file: &Path, data_dir: Option<&Path>) -> Result<Pipeline> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let spec: PipelineSpec = parse_yaml(&text, &file.display().to_string())?;
    let root = match data_dir {
        Some(d) => d.to_path_buf(),
        None => absolute(file)?.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default(),
    };
    let name = &spec.name.value;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("{}: field `name`: {name:?} must be letters, digits, '-' or '_' (it is a metrics label)", at(file, &spec.name));
    }
    if spec.inboxes.is_empty() {
        bail!("{}: field `inboxes`: at least one inbox folder is needed", file.display());
    }
    if spec.context.max_tokens < 1024 || spec.context.overlap * 2 >= spec.context.max_tokens {
        bail!("{}: field `context`: max_tokens must be ≥ 1024 and overlap less than half of it", file.display());
    }
    let stages = stage::build_all(&PipelineFile { path: file, context_tokens: spec.context.max_tokens }, &spec.stages)?;
    let inboxes: Vec<PathBuf> = spec.inboxes.iter().map(|i| root.join(&i.path.value)).collect();
    let output = root.join(&spec.output.value);
    let quarantine = match &spec.quarantine {
        Some(q) => root.join(&q.value),
        None => output.parent().unwrap_or(&output).join("quarantine").join(name),
    };
    Ok(Pipeline { spec, file: file.to_path_buf(), inboxes, output, quarantine, stages })
}
