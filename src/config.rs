//! Daemon configuration (`config/deltadoc.yaml`) and pipeline definitions (`pipelines/*.yaml`).
//!
//! Every error names the file, the line and the field: values with their own syntax (durations,
//! sizes, cron expressions, time zones, globs) are checked while deserialising, so the YAML
//! reader attaches the location; checks across fields use [`Spanned`] locations.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

/// The shipped `config/deltadoc.yaml`, used when no configuration file is given or found, so a
/// fresh checkout runs with the same defaults that the file documents.
pub const EMBEDDED_DAEMON_CONFIG: &str = include_str!("../config/deltadoc.yaml");

/// Where `deltadoc` looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/deltadoc.yaml";

/// Daemon-wide settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The model every pipeline runs.
    pub model: ModelConfig,
    /// Intra-op threads of the model (0 = all cores).
    #[serde(default)]
    pub threads: usize,
    /// Memory a job may plan to use (weights + KV + state + activations).
    pub memory_budget: ByteSize,
    /// Ledger, checkpoints and other daemon state.
    pub state_dir: PathBuf,
    /// Folder of pipeline definitions (`*.yaml`).
    pub pipelines: PathBuf,
    /// Relative inbox, output and quarantine paths of pipelines are relative to this folder
    /// (absent: the folder holding the pipelines folder). One pipeline file thus serves the demo
    /// (`examples`) and an install (`/srv/deltadoc`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `human` or `json` log lines on stderr.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Watching the inboxes.
    pub ingest: IngestConfig,
    /// Per-document limits and retries.
    pub limits: Limits,
}

/// Which model folder runs the stages.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A model folder written by `deltadoc model import` or `model synth`.
    pub path: PathBuf,
    /// When the folder does not exist, synthesise random weights of this shape there (demo only:
    /// results then say `random_weights: true`).
    #[serde(default)]
    pub synth_if_missing: Option<String>,
}

/// Prometheus endpoint settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Listen address; loopback by default because metrics are not for the open network.
    pub listen: String,
    /// `/readyz` fails when documents are queued and the worker showed no progress this long.
    #[serde(default = "default_stall_after")]
    pub stall_after: Dur,
}

fn default_stall_after() -> Dur {
    Dur(std::time::Duration::from_secs(900))
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Human,
    /// One JSON object per line (journald, Loki).
    Json,
}

/// Inbox watching.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Full rescan of every inbox this often, whatever the watcher says.
    pub rescan_interval: Dur,
    /// A file counts as complete once its size and mtime stayed the same this long.
    pub stable_window: Dur,
    /// Do not use filesystem events at all (network mounts, some containers).
    #[serde(default)]
    pub poll_only: bool,
    /// File names never taken (temp files of scanners, editors and sync tools).
    pub ignore: Vec<GlobPattern>,
}

/// Per-document limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Larger files are refused (`too_large`).
    pub max_file_bytes: ByteSize,
    /// PDFs with more pages are refused (`too_large`).
    pub max_pages: u32,
    /// Wall time of one attempt at one document, all stages.
    pub document_timeout: Dur,
    /// Wall time of the isolated text extraction process.
    pub extract_timeout: Dur,
    /// Address-space cap of the extraction process (decompression bombs).
    pub extract_memory: ByteSize,
    /// Attempts before a document goes to quarantine.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles after each further failure.
    pub retry_backoff: Dur,
}

fn yes() -> bool {
    true
}

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
    /// Model stages, in order.
    pub stages: Vec<StageSpec>,
}

fn one() -> u32 {
    1
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

/// What a model stage does.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    /// Summary of the document (map-reduce when it does not fit one context).
    Summarize,
    /// A pipeline-defined instruction over the document.
    Prompt,
    /// Transcription of image pages by the vision model.
    Ocr,
    /// Fields as JSON matching a JSON Schema (constrained decoding; chunks merged by schema).
    Extract,
}

impl StageKind {
    /// Name used in results and metrics.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Summarize => "summarize",
            StageKind::Prompt => "prompt",
            StageKind::Ocr => "ocr",
            StageKind::Extract => "extract",
        }
    }
}

/// One model stage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Key of the stage's output in the result.
    pub name: Spanned<String>,
    /// What it does.
    pub kind: StageKind,
    /// The instruction (required for `prompt`; replaces the built-in one for the others).
    #[serde(default)]
    pub instruction: Option<Spanned<String>>,
    /// Generation limit.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// `ocr`: image tokens a page may take (1,024 pixels each); bigger scans are downscaled.
    #[serde(default = "default_max_page_tokens")]
    pub max_page_tokens: u64,
    /// `ocr`: cut a page over this many image tokens into bands read as consecutive images.
    #[serde(default)]
    pub tile_tokens: Option<u64>,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    /// 0 = no top-k cut.
    #[serde(default)]
    pub top_k: usize,
    /// Nucleus mass.
    #[serde(default = "one_f32")]
    pub top_p: f32,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
    /// Thinking mode (off by default: results should be answers, not reasoning).
    #[serde(default)]
    pub thinking: bool,
    /// `extract`: the JSON Schema of the output, inline or the path of a JSON or YAML file
    /// relative to the pipeline file.
    #[serde(default)]
    pub schema: Option<Spanned<serde_json::Value>>,
    /// `extract` with thinking: tokens the model may think before the JSON starts.
    #[serde(default = "default_think_budget")]
    pub think_budget: usize,
    /// `extract` with thinking: keep the reasoning in the result, beside the fields.
    #[serde(default)]
    pub keep_reasoning: bool,
    /// The checked schema of an `extract` stage, set while loading.
    #[serde(skip)]
    pub compiled: Option<crate::constrain::Schema>,
}

impl StageSpec {
    /// Tokens the stage may generate: `max_new_tokens`, or for `extract` the longest output
    /// its schema accepts (plus the thinking budget), so that the JSON always completes.
    pub fn output_tokens(&self) -> usize {
        match &self.compiled {
            Some(s) => s.max_tokens() + 1 + if self.thinking { self.think_budget } else { 0 },
            None => self.max_new_tokens,
        }
    }
}

fn default_max_new_tokens() -> usize {
    512
}
fn default_max_page_tokens() -> u64 {
    crate::ocr::DEFAULT_PAGE_TOKENS
}
fn default_think_budget() -> usize {
    1024
}
fn one_f32() -> f32 {
    1.0
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
}

impl Pipeline {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.spec.name.value
    }
}

/// Configuration as loaded: daemon settings with absolute paths, and every pipeline.
#[derive(Clone, Debug)]
pub struct Config {
    /// Daemon settings (paths absolute).
    pub daemon: DaemonConfig,
    /// The file they came from (`None` = embedded defaults).
    pub file: Option<PathBuf>,
    /// Pipelines, sorted by name.
    pub pipelines: Vec<Pipeline>,
}

impl Config {
    /// Loads the daemon configuration (`path`, or `config/deltadoc.yaml` when it exists, or the
    /// embedded defaults), applies `DELTADOC_*` overrides, then loads and checks every pipeline.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (text, file) = match path {
            Some(p) => (std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?, Some(p.into())),
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                (std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?, Some(p))
            }
            None => (EMBEDDED_DAEMON_CONFIG.to_string(), None),
        };
        let shown = file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<embedded config/deltadoc.yaml>".into());
        let mut daemon: DaemonConfig = parse_yaml(&text, &shown)?;
        apply_env_overrides(&mut daemon, |k| std::env::var(k).ok())?;
        if daemon.metrics.stall_after.0 <= daemon.limits.extract_timeout.0 {
            bail!(
                "{shown}: field `metrics.stall_after` ({:?}) must be longer than `limits.extract_timeout` ({:?}): \
                 an extraction shows no progress until it ends, so /readyz would call it stalled",
                daemon.metrics.stall_after.0,
                daemon.limits.extract_timeout.0
            );
        }
        // Relative paths are relative to the repository-style layout: the folder holding `config/`.
        let base = match &file {
            Some(f) => absolute(f)?.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or(std::env::current_dir()?),
            None => std::env::current_dir()?,
        };
        for p in [&mut daemon.model.path, &mut daemon.state_dir, &mut daemon.pipelines] {
            *p = base.join(&*p);
        }
        if let Some(d) = &mut daemon.data_dir {
            *d = base.join(&*d);
        }
        let pipelines = load_pipelines(&daemon.pipelines, daemon.data_dir.as_deref())?;
        Ok(Self { daemon, file, pipelines })
    }

    /// The pipeline called `name`.
    pub fn pipeline(&self, name: &str) -> Result<&Pipeline> {
        self.pipelines.iter().find(|p| p.name() == name).ok_or_else(|| {
            let names: Vec<&str> = self.pipelines.iter().map(|p| p.name()).collect();
            anyhow!("no pipeline named {name:?} (have: {})", names.join(", "))
        })
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

/// Parses YAML into `T`, naming `file` in the error (the YAML reader adds line, column and field).
pub fn parse_yaml<T: for<'de> Deserialize<'de>>(text: &str, file: &str) -> Result<T> {
    serde_saphyr::from_str(text).map_err(|e| anyhow!("{file}: {e}"))
}

/// `DELTADOC_<FIELD>` environment variables override the file; each value is read as YAML of the
/// field's type, so it gets the same checks.
pub fn apply_env_overrides(d: &mut DaemonConfig, var: impl Fn(&str) -> Option<String>) -> Result<()> {
    fn set<T: for<'de> Deserialize<'de>>(slot: &mut T, name: &str, var: &impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = var(name) {
            *slot = serde_saphyr::from_str(&v).map_err(|e| anyhow!("environment variable {name}={v:?}: {e}"))?;
        }
        Ok(())
    }
    set(&mut d.model.path, "DELTADOC_MODEL", &var)?;
    set(&mut d.model.synth_if_missing, "DELTADOC_SYNTH_IF_MISSING", &var)?;
    set(&mut d.threads, "DELTADOC_THREADS", &var)?;
    set(&mut d.memory_budget, "DELTADOC_MEMORY_BUDGET", &var)?;
    set(&mut d.state_dir, "DELTADOC_STATE_DIR", &var)?;
    set(&mut d.pipelines, "DELTADOC_PIPELINES", &var)?;
    set(&mut d.data_dir, "DELTADOC_DATA_DIR", &var)?;
    set(&mut d.metrics.listen, "DELTADOC_METRICS_LISTEN", &var)?;
    set(&mut d.metrics.enabled, "DELTADOC_METRICS_ENABLED", &var)?;
    set(&mut d.log_format, "DELTADOC_LOG_FORMAT", &var)?;
    set(&mut d.ingest.poll_only, "DELTADOC_POLL_ONLY", &var)?;
    set(&mut d.ingest.rescan_interval, "DELTADOC_RESCAN_INTERVAL", &var)?;
    set(&mut d.ingest.stable_window, "DELTADOC_STABLE_WINDOW", &var)?;
    set(&mut d.limits.document_timeout, "DELTADOC_DOCUMENT_TIMEOUT", &var)?;
    set(&mut d.limits.max_attempts, "DELTADOC_MAX_ATTEMPTS", &var)?;
    set(&mut d.limits.retry_backoff, "DELTADOC_RETRY_BACKOFF", &var)?;
    Ok(())
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
        for (dir, what, span) in [(&p.output, "output", &p.spec.output), (&p.quarantine, "quarantine", &p.spec.output)] {
            for q in &out {
                for inbox in &q.inboxes {
                    if dir.starts_with(inbox) || inbox.starts_with(dir) {
                        bail!(
                            "{}: field `{what}`: {} overlaps inbox {} of pipeline {:?}; results would be taken as new documents",
                            at(&p.file, span),
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

fn at<T>(file: &Path, s: &Spanned<T>) -> String {
    format!("{}:{}:{}", file.display(), s.referenced.line(), s.referenced.column())
}

/// An inline schema, or the JSON/YAML file a string names (relative to the pipeline file).
fn load_schema(pipeline_file: &Path, v: &serde_json::Value) -> Result<serde_json::Value> {
    let serde_json::Value::String(rel) = v else { return Ok(v.clone()) };
    let path = absolute(pipeline_file)?.parent().map(|d| d.join(rel)).unwrap_or_else(|| rel.into());
    let text = std::fs::read_to_string(&path).with_context(|| format!("schema file {}: cannot read", path.display()))?;
    parse_yaml(&text, &path.display().to_string())
}

/// Loads and checks one pipeline file; relative paths are relative to `data_dir`, else to the
/// folder holding the pipelines folder (the repository or install root).
pub fn load_pipeline(file: &Path, data_dir: Option<&Path>) -> Result<Pipeline> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let mut spec: PipelineSpec = parse_yaml(&text, &file.display().to_string())?;
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
    if spec.stages.is_empty() {
        bail!("{}: field `stages`: at least one stage is needed", file.display());
    }
    let mut seen: Vec<&str> = Vec::new();
    for (i, s) in spec.stages.iter().enumerate() {
        let sname = &s.name.value;
        if seen.contains(&sname.as_str()) {
            bail!("{}: field `stages[{i}].name`: stage {sname:?} appears twice", at(file, &s.name));
        }
        if sname.is_empty() || !sname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("{}: field `stages[{i}].name`: {sname:?} must be letters, digits, '-' or '_'", at(file, &s.name));
        }
        seen.push(sname);
        if matches!(s.kind, StageKind::Prompt | StageKind::Extract)
            && s.instruction.as_ref().is_none_or(|t| t.value.trim().is_empty())
        {
            bail!("{}: field `stages[{i}].instruction`: a `{}` stage needs an instruction", at(file, &s.name), s.kind.name());
        }
        match (&s.schema, s.kind) {
            (None, StageKind::Extract) => {
                bail!("{}: field `stages[{i}].schema`: an `extract` stage needs a JSON Schema", at(file, &s.name))
            }
            (Some(sch), k) if k != StageKind::Extract => {
                bail!("{}: field `stages[{i}].schema`: only `extract` stages take a schema", at(file, sch))
            }
            _ => {}
        }
        if s.max_new_tokens == 0 {
            bail!("{}: field `stages[{i}].max_new_tokens`: must be at least 1", at(file, &s.name));
        }
        // 64 tokens is the smallest image the vision tower takes (the preprocessing minimum).
        if s.max_page_tokens < 64 || s.tile_tokens.is_some_and(|t| t == 0) {
            bail!("{}: field `stages[{i}]`: max_page_tokens must be at least 64 and tile_tokens at least 1", at(file, &s.name));
        }
        if !(s.temperature >= 0.0 && s.top_p > 0.0 && s.top_p <= 1.0) {
            bail!("{}: field `stages[{i}]`: temperature must be ≥ 0 and top_p in (0, 1]", at(file, &s.name));
        }
    }
    for (i, s) in spec.stages.iter_mut().enumerate() {
        if let Some(sch) = &s.schema {
            let compiled = load_schema(file, &sch.value)
                .and_then(crate::constrain::Schema::new)
                .map_err(|e| anyhow!("{}: field `stages[{i}].schema`: {e:#}", at(file, sch)))?;
            let context = spec.context.max_tokens;
            if compiled.max_tokens() > context / 2 {
                bail!(
                    "{}: field `stages[{i}].schema`: outputs can take up to {} tokens, more than half the context ({context}); \
                     lower maxLength/maxItems",
                    at(file, sch),
                    compiled.max_tokens()
                );
            }
            s.compiled = Some(compiled);
        }
    }
    if spec.stages.iter().filter(|s| s.kind == StageKind::Ocr).count() > 1 {
        bail!("{}: field `stages`: at most one `ocr` stage", file.display());
    }
    if spec.context.max_tokens < 1024 || spec.context.overlap * 2 >= spec.context.max_tokens {
        bail!("{}: field `context`: max_tokens must be ≥ 1024 and overlap less than half of it", file.display());
    }
    let inboxes: Vec<PathBuf> = spec.inboxes.iter().map(|i| root.join(&i.path.value)).collect();
    let output = root.join(&spec.output.value);
    let quarantine = match &spec.quarantine {
        Some(q) => root.join(&q.value),
        None => output.parent().unwrap_or(&output).join("quarantine").join(name),
    };
    Ok(Pipeline { spec, file: file.to_path_buf(), inboxes, output, quarantine })
}

/// A duration written as `30s`, `5m`, `2h`, `1h 30m`, `500ms` or ISO 8601 (`PT2H`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d: jiff::SignedDuration =
            s.trim().parse().map_err(|e| format!("{s:?} is not a duration like 30s, 5m, 2h or 1h 30m ({e})"))?;
        if d.is_negative() {
            return Err(format!("{s:?}: a duration cannot be negative"));
        }
        Ok(Dur(d.unsigned_abs()))
    }
}

/// A byte count written as a number or with a unit: `512MiB`, `4GiB`, `2GB`, `1000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 512MiB or 4GiB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            // Kubernetes spells the binary units Ki, Mi, Gi, Ti.
            "kib" | "ki" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" | "mi" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" | "gi" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" | "ti" => 1 << 40,
            u => return Err(format!("{s:?}: unknown size unit {u:?} (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")),
        };
        Ok(ByteSize((n * mult as f64) as u64))
    }
}

/// A cron expression (5 fields, or 6 with seconds).
#[derive(Clone, Debug)]
pub struct CronExpr {
    /// As written.
    pub text: String,
    /// Parsed.
    pub cron: croner::Cron,
}

impl FromStr for CronExpr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(s.trim())
            .map_err(|e| format!("{s:?} is not a cron expression like \"0 2 * * *\": {e}"))?;
        Ok(CronExpr { text: s.trim().into(), cron })
    }
}

/// An IANA time zone name (`Europe/Berlin`), resolved against the bundled tz database.
#[derive(Clone, Debug)]
pub struct TimeZoneName {
    /// As written.
    pub name: String,
    /// Resolved.
    pub tz: jiff::tz::TimeZone,
}

impl FromStr for TimeZoneName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let tz = jiff::tz::TimeZone::get(s.trim()).map_err(|e| format!("{s:?} is not a known time zone: {e}"))?;
        Ok(TimeZoneName { name: s.trim().into(), tz })
    }
}

/// A glob over paths relative to an inbox (`**/*.pdf`), matched case-insensitively because
/// scanners and Windows shares write `.PDF` as often as `.pdf`.
#[derive(Clone, Debug)]
pub struct GlobPattern {
    /// As written.
    pub text: String,
    /// Compiled.
    pub glob: globset::Glob,
}

impl FromStr for GlobPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(s)
            .case_insensitive(true)
            .literal_separator(false)
            .build()
            .map_err(|e| format!("{s:?} is not a glob pattern: {e}"))?;
        Ok(GlobPattern { text: s.into(), glob })
    }
}

macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str(stringify!($t))
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$t, E> {
                        s.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, n: u64) -> Result<$t, E> {
                        n.to_string().parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, n: i64) -> Result<$t, E> {
                        n.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    )*};
}
deserialize_from_str!(Dur, ByteSize, CronExpr, TimeZoneName, GlobPattern);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!("30s".parse::<Dur>().unwrap().0, Duration::from_secs(30));
        assert_eq!("1h 30m".parse::<Dur>().unwrap().0, Duration::from_secs(5400));
        assert_eq!("500ms".parse::<Dur>().unwrap().0, Duration::from_millis(500));
        assert!("soon".parse::<Dur>().is_err());
        assert_eq!("4GiB".parse::<ByteSize>().unwrap().0, 4 << 30);
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert!("3 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn embedded_config_parses_and_env_overrides_are_checked() {
        let mut d: DaemonConfig = parse_yaml(EMBEDDED_DAEMON_CONFIG, "embedded").unwrap();
        apply_env_overrides(&mut d, |k| (k == "DELTADOC_THREADS").then(|| "3".into())).unwrap();
        assert_eq!(d.threads, 3);
        let e = apply_env_overrides(&mut d, |k| (k == "DELTADOC_DOCUMENT_TIMEOUT").then(|| "whenever".into())).unwrap_err();
        assert!(format!("{e:#}").contains("DELTADOC_DOCUMENT_TIMEOUT"), "{e:#}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let yaml = "name: x\ninboxes:\n  - path: in\noutput: out\nschedule:\n  cron: \"0 25 * * *\"\n  window: 1h\nstages:\n  - {name: s, kind: summarize}\n";
        let e = parse_yaml::<PipelineSpec>(yaml, "p.yaml").unwrap_err().to_string();
        assert!(e.contains("p.yaml") && e.contains("line 6"), "{e}");
        let e = parse_yaml::<PipelineSpec>(&yaml.replace("0 25", "0 2").replace("summarize", "summarise"), "p.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 9") && e.contains("summarise"), "{e}");
    }
}
