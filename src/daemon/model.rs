//! The daemon's model: the configured folder opened with the configured runtime settings, the
//! demo model synthesised there first when the configuration asks for it.

use anyhow::{Context, Result, anyhow, bail};

use crate::config::DaemonConfig;
use crate::llm::ort::{OrtModel, RuntimeSettings};
use crate::model::config::Shape;
use crate::model::{ExportOptions, FORMAT_VERSION, Manifest, ModelDir, synth};
use crate::runtime::SessionOptions;

/// A synthesised (random-weight) model folder written in an older layout: safe to rebuild, unlike
/// imported weights, which are never touched.
fn stale_demo_model(path: &std::path::Path) -> bool {
    Manifest::read(path).is_ok_and(|m| m.is_synthetic() && m.format != FORMAT_VERSION)
}

/// Loads the configured model, synthesising the demo model first when configured to.
pub(crate) fn load(d: &DaemonConfig) -> Result<OrtModel> {
    let path = &d.model.path;
    if d.model.synth_if_missing.is_some() && stale_demo_model(path) {
        tracing::info!("{}: demo model from an older deltadoc; building it again", path.display());
        std::fs::remove_dir_all(path).with_context(|| format!("{}: cannot remove the old demo model", path.display()))?;
    }
    if !path.join("manifest.json").is_file() {
        let Some(shape) = &d.model.synth_if_missing else {
            bail!(
                "model.path {}: no model folder there (import real weights with `deltadoc model import`, see README)",
                path.display()
            )
        };
        let shape: Shape =
            clap::ValueEnum::from_str(shape, true).map_err(|_| anyhow!("model.synth_if_missing: unknown shape {shape:?}"))?;
        tracing::info!(
            "model folder {} is missing: building random weights of the {} shape there (demo model; results say so)",
            path.display(),
            shape.name()
        );
        synth::write(shape, 0, false, ExportOptions::default(), path)?;
    }
    let dir = ModelDir::open(path)?;
    let settings = RuntimeSettings::new(d.model.prefill_chunk).with_checkpoints(d.resume_dir().join("checkpoints"));
    OrtModel::open(&dir, &SessionOptions::with_threads(d.threads), settings)
}
