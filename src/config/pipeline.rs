//! Pipeline definitions (`pipelines/*.yaml`): where documents come from, which stages run on
//! them, where results and failures go. Errors name the file, line and field.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::values::{CronExpr, Dur, GlobPattern, TimeZoneName, at, parse_yaml};
use crate::bucket::BucketUrl;
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
    /// Watched folders and bucket prefixes.
    pub inboxes: Vec<InboxSpec>,
    /// Result folder, or `s3://bucket/prefix/` (mirrors the inbox layout).
    pub output: Spanned<PathBuf>,
    /// Failed documents and their error JSON, a folder or a bucket prefix (default:
    /// `<output>/../quarantine/<name>`).
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

/// One inbox: a folder (`path`) or a bucket prefix (`url`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxSpec {
    /// The folder.
    #[serde(default)]
    pub path: Option<Spanned<PathBuf>>,
    /// `s3://bucket/prefix/` (`docs/buckets.md`).
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// Only paths (relative to the folder or prefix) matching one of these are taken; empty = all.
    #[serde(default)]
    pub include: Vec<GlobPattern>,
    /// Paths matching any of these are never taken.
    #[serde(default)]
    pub exclude: Vec<GlobPattern>,
    /// Descend into sub-folders (keys with more `/`-separated parts under the prefix).
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

/// Where documents come from or results go: a folder (absolute) or a bucket prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// A folder.
    Folder(PathBuf),
    /// `s3://bucket/prefix/`.
    Bucket(BucketUrl),
}

impl Location {
    /// A folder (relative to `root`) or an `s3://` URL.
    fn resolve(root: &Path, written: &Path) -> Result<Self> {
        match written.to_str().filter(|s| BucketUrl::is_url(s)) {
            Some(url) => Ok(Location::Bucket(BucketUrl::parse(url)?)),
            None => Ok(Location::Folder(root.join(written))),
        }
    }

    /// Whether one holds the other: results written there would be taken as documents.
    fn overlaps(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Folder(a), Location::Folder(b)) => a.starts_with(b) || b.starts_with(a),
            (Location::Bucket(a), Location::Bucket(b)) => a.overlaps(b),
            _ => false,
        }
    }

    /// Where a document's result or copy goes: `<self>/<rel>` with `suffix` appended, as a path
    /// (bucket places as `s3://bucket/key`, which is also how they show).
    pub fn join(&self, rel: &Path, suffix: &str) -> PathBuf {
        let mut name = match self {
            Location::Folder(f) => f.join(rel).into_os_string(),
            Location::Bucket(b) => b.object(&b.key(rel)).into(),
        };
        name.push(suffix);
        PathBuf::from(name)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Folder(p) => write!(f, "{}", p.display()),
            Location::Bucket(b) => write!(f, "{b}"),
        }
    }
}

/// A pipeline with its source file and resolved paths.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// As written.
    pub spec: PipelineSpec,
    /// The YAML file it came from.
    pub file: PathBuf,
    /// Inboxes: folders (absolute) and bucket prefixes.
    pub inboxes: Vec<Location>,
    /// Where results go.
    pub output: Location,
    /// Where failed documents go.
    pub quarantine: Location,
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
                    if dir.overlaps(inbox) {
                        bail!(
                            "{}: field `{what}`: {dir} overlaps inbox {inbox} of pipeline {:?}; results would be taken as new \
                             documents",
                            place,
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
    let mut inboxes = Vec::new();
    for (n, i) in spec.inboxes.iter().enumerate() {
        inboxes.push(match (&i.path, &i.url) {
            (Some(p), None) if p.value.to_str().is_some_and(BucketUrl::is_url) => {
                bail!("{}: field `inboxes[{n}].path`: a bucket inbox is written `url: {}`", at(file, p), p.value.display())
            }
            (Some(p), None) => Location::Folder(root.join(&p.value)),
            (None, Some(u)) => Location::Bucket(
                BucketUrl::parse(&u.value).with_context(|| format!("{}: field `inboxes[{n}].url`", at(file, u)))?,
            ),
            _ => bail!("{}: field `inboxes[{n}]`: give a folder `path` or a bucket `url`, one of the two", file.display()),
        });
    }
    let output =
        Location::resolve(&root, &spec.output.value).with_context(|| format!("{}: field `output`", at(file, &spec.output)))?;
    let quarantine = match (&spec.quarantine, &output) {
        (Some(q), _) => Location::resolve(&root, &q.value).with_context(|| format!("{}: field `quarantine`", at(file, q)))?,
        (None, Location::Folder(out)) => Location::Folder(out.parent().unwrap_or(out).join("quarantine").join(name)),
        (None, Location::Bucket(out)) => {
            let parent = out.prefix.trim_end_matches('/').rsplit_once('/').map_or("", |(p, _)| p);
            let prefix = if parent.is_empty() { format!("quarantine/{name}/") } else { format!("{parent}/quarantine/{name}/") };
            Location::Bucket(BucketUrl { bucket: out.bucket.clone(), prefix })
        }
    };
    Ok(Pipeline { spec, file: file.to_path_buf(), inboxes, output, quarantine, stages })
}
