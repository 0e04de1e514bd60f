//! Configuration: the daemon's settings (`config/deltadoc.yaml`, [`DaemonConfig`]) and the
//! pipeline definitions (`pipelines/*.yaml`, [`Pipeline`]), loaded and checked together.
//!
//! Every error names the file, the line and the field: values with their own syntax (durations,
//! sizes, cron expressions, time zones, globs) are checked while deserialising, so the YAML
//! reader attaches the location; checks across fields use the values' recorded locations.

mod daemon;
mod pipeline;
mod values;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

pub use daemon::{
    Addressing, DaemonConfig, IngestConfig, Limits, LogFormat, MetricsConfig, ModelConfig, ObjectStoreConfig, WorkerConfig,
    apply_env_overrides,
};
pub use pipeline::{
    ContextSpec, DuplicatePolicy, InboxSpec, Location, Pipeline, PipelineSpec, QuarantineMode, ScheduleSpec, load_pipeline,
    load_pipelines,
};
pub use values::{ByteSize, CronExpr, Dur, GlobPattern, TimeZoneName, parse_yaml};

use crate::util::absolute;

/// The shipped `config/deltadoc.yaml`, used when no configuration file is given or found, so a
/// fresh checkout runs with the same defaults that the file documents.
pub const EMBEDDED_DAEMON_CONFIG: &str = include_str!("../../config/deltadoc.yaml");

/// Where `deltadoc` looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/deltadoc.yaml";

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
        if daemon.model.prefill_chunk == 0 {
            bail!("{shown}: field `model.prefill_chunk`: must be at least 1");
        }
        if daemon.worker.max_batch == 0 {
            bail!("{shown}: field `worker.max_batch`: must be at least 1 (1: every model call decodes alone)");
        }
        if daemon.worker.max_docs == 0 {
            bail!("{shown}: field `worker.max_docs`: must be at least 1 (1: one document at a time)");
        }
        if daemon.metrics.stall_after.0 <= daemon.limits.extract_timeout.0 {
            bail!(
                "{shown}: field `metrics.stall_after` ({:?}) must be longer than `limits.extract_timeout` ({:?}): \
                 an extraction shows no progress until it ends, so /readyz would call it stalled",
                daemon.metrics.stall_after.0,
                daemon.limits.extract_timeout.0
            );
        }
        if daemon.worker.lease.0 < std::time::Duration::from_secs(3) {
            bail!(
                "{shown}: field `worker.lease` ({:?}) must be at least 3s: heartbeats go every third of it, and a \
                 busy machine or database must not cost a worker its job",
                daemon.worker.lease.0
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
        for d in [&mut daemon.data_dir, &mut daemon.resume_dir, &mut daemon.object_store.ca_file].into_iter().flatten() {
            *d = base.join(&*d);
        }
        if let Some(f) = &mut daemon.ledger_password_file {
            *f = base.join(&*f);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    /// The shipped file writes out every default (it documents them), except where the demo
    /// differs: its model, state folder and data folder.
    #[test]
    fn the_shipped_file_states_the_defaults() {
        let shipped: DaemonConfig = parse_yaml(EMBEDDED_DAEMON_CONFIG, "embedded").unwrap();
        let defaults = DaemonConfig::default();
        let show = |d: &DaemonConfig| {
            let mut d = d.clone();
            (d.model.path, d.model.synth_if_missing, d.state_dir, d.data_dir) = Default::default();
            format!("{d:?}")
        };
        assert_eq!(show(&shipped), show(&defaults));
    }

    #[test]
    fn a_short_file_and_a_partial_block_take_the_defaults_for_the_rest() {
        let d: DaemonConfig =
            parse_yaml("model: {path: /m}\nstate_dir: /s\ndata_dir: /d\nmetrics: {enabled: false}\n", "short.yaml").unwrap();
        assert_eq!((d.model.path.to_str(), d.state_dir.to_str()), (Some("/m"), Some("/s")));
        assert!(!d.metrics.enabled);
        assert_eq!(d.metrics.listen, MetricsConfig::default().listen);
        assert_eq!(d.limits.max_attempts, 3);
        // A misspelt field is still an error naming it.
        let e = parse_yaml::<DaemonConfig>("metrics: {enabeld: false}\n", "short.yaml").unwrap_err().to_string();
        assert!(e.contains("short.yaml") && e.contains("enabeld"), "{e}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        let yaml = "name: x\ninboxes:\n  - path: in\noutput: out\nschedule:\n  cron: \"0 25 * * *\"\n  window: 1h\nstages:\n  - {name: s, kind: summarize}\n";
        std::fs::write(&file, yaml).unwrap();
        let e = format!("{:#}", load_pipeline(&file, Some(dir.path())).unwrap_err());
        assert!(e.contains("p.yaml") && e.contains("line 6"), "{e}");
        std::fs::write(&file, yaml.replace("0 25", "0 2").replace("summarize", "summarise")).unwrap();
        let e = format!("{:#}", load_pipeline(&file, Some(dir.path())).unwrap_err());
        assert!(e.contains("p.yaml:9:") && e.contains("stages[0].kind") && e.contains("summarise"), "{e}");
        // A field the kind does not take is named at its place.
        std::fs::write(&file, yaml.replace("0 25", "0 2").replace("kind: summarize}", "kind: summarize, tile_tokens: 9}"))
            .unwrap();
        let e = format!("{:#}", load_pipeline(&file, Some(dir.path())).unwrap_err());
        assert!(e.contains("p.yaml:9:") && e.contains("stages[0].tile_tokens"), "{e}");
        std::fs::write(&file, yaml.replace("0 25", "0 2").replace("kind: summarize}", "kind: summarize, top_p: 2}")).unwrap();
        let e = format!("{:#}", load_pipeline(&file, Some(dir.path())).unwrap_err());
        assert!(e.contains("p.yaml:9:") && e.contains("top_p in (0, 1]"), "{e}");
        std::fs::write(&file, yaml.replace("0 25", "0 2").replace("kind: summarize}", "kind: summarize, seed: x}")).unwrap();
        let e = format!("{:#}", load_pipeline(&file, Some(dir.path())).unwrap_err());
        assert!(e.contains("stages[0].seed") && e.contains("invalid type"), "{e}");
    }

    #[test]
    fn a_quarantine_inside_an_inbox_is_reported_at_its_own_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pipelines")).unwrap();
        let yaml = "name: x\ninboxes: [{path: in}]\noutput: out\nquarantine: in/bad\nstages: [{name: s, kind: summarize}]\n";
        std::fs::write(dir.path().join("pipelines/p.yaml"), yaml).unwrap();
        let e = format!("{:#}", load_pipelines(&dir.path().join("pipelines"), Some(dir.path())).unwrap_err());
        assert!(e.contains("p.yaml:4:") && e.contains("field `quarantine`"), "{e}");
    }

    #[test]
    fn bucket_inboxes_and_outputs_resolve_and_are_checked_like_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pipelines")).unwrap();
        let write = |yaml: &str| std::fs::write(dir.path().join("pipelines/p.yaml"), yaml).unwrap();
        let load = || load_pipelines(&dir.path().join("pipelines"), Some(dir.path()));
        let stages = "stages: [{name: s, kind: summarize}]\n";
        write(&format!("name: x\ninboxes: [{{url: \"s3://docs/in\"}}, {{path: in}}]\noutput: s3://docs/results/2026/\n{stages}"));
        let p = load().unwrap().remove(0);
        assert_eq!(p.inboxes[0].to_string(), "s3://docs/in/");
        assert_eq!(p.inboxes[1], Location::Folder(dir.path().join("in")));
        assert_eq!(p.quarantine.to_string(), "s3://docs/results/quarantine/x/", "beside the output, as for folders");
        assert_eq!(p.output.join(Path::new("a/b.pdf"), ".json"), Path::new("s3://docs/results/2026/a/b.pdf.json"));
        for (yaml, says) in [
            ("name: x\ninboxes: [{url: \"s3://docs/\"}]\noutput: s3://docs/out/\n", "overlaps inbox s3://docs/"),
            ("name: x\ninboxes: [{path: in, url: \"s3://docs/\"}]\noutput: out\n", "one of the two"),
            ("name: x\ninboxes: [{path: \"s3://docs/\"}]\noutput: out\n", "written `url: s3://docs/`"),
            ("name: x\ninboxes: [{url: \"s3://AK:SECRET@docs/\"}]\noutput: out\n", "credentials"),
            ("name: x\ninboxes: [{url: \"gs://docs/\"}]\noutput: out\n", "only s3://"),
        ] {
            write(&format!("{yaml}{stages}"));
            let e = format!("{:#}", load().unwrap_err());
            assert!(e.contains("p.yaml") && e.contains(says), "{yaml}: {e}");
            assert!(!e.contains("SECRET"), "a secret in an error: {e}");
        }
    }
}
