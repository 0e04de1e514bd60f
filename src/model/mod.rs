//! Qwen3.5 models: configuration, checkpoint import, random-weight synthesis, and the model folder
//! that the runtime opens.
//!
//! A model folder holds `model.onnx` (+ `model.onnx.data`), `vision.onnx` (+ data) when the
//! checkpoint has the vision tower, `tokenizer.json` and `manifest.json` ([`Manifest`]:
//! configuration, precision, op sets and file hashes).

pub mod checkpoint;
pub mod config;
pub mod graph;
pub mod plan;
pub mod quant;
pub mod state;
pub mod synth;
pub mod vision;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use self::config::TextConfig;
use self::graph::{GraphOptions, KvCache, LinearAttn, WeightSource};
use self::quant::Precision;
use self::vision::VisionConfig;
use crate::onnx::GraphBuilder;
use crate::progress::Progress;

/// Version of the model-folder layout; bumped when a runtime could misread an older folder.
/// 2: the decoder graph takes `image_embeds`; `vision.onnx` when the checkpoint has the tower.
/// 3: KV caches are position-major and the attention layers return only a call's new rows.
/// 4: the int8/int4 head is `ai.deltadoc::QuantMatMul` and the graph takes `head_rows`.
/// 5: the int8/int4 layers' projections are `QuantMatMul` too (no `MatMulNBits`).
/// 6: `QuantMatMul` takes its weights packed in panels of 16 rows (one initialiser, no scales).
/// 7: `GatedDeltaRule` computes the DeltaNet's gates from `a` and `b` and applies the gated
///    RMSNorm to its output (inputs `neg_exp_a`, `dt_bias`, `z`, `norm_weight`).
/// 8: int8/int4 `QuantMatMul` nodes take the RMSNorm before them (`norm`), SwiGLU and the
///    residual add after them (`activation`, `residual`).
/// 9: the decoder graph takes `past_lengths`, each batch row's cache length.
pub const FORMAT_VERSION: u32 = 9;
/// Default ONNX opset of exported graphs (RMSNormalization needs 23).
pub const ONNX_OPSET: i64 = 23;

/// `manifest.json` of a model folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Model-folder layout version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Model family (`qwen3_5`).
    pub architecture: String,
    /// deltadoc version that wrote the folder.
    pub deltadoc_version: String,
    /// Where the weights came from: `import:<dir>` or `synth:<shape>:seed=<n>`.
    pub source: String,
    /// Text decoder configuration.
    pub config: TextConfig,
    /// Storage precision of the weights.
    pub precision: Precision,
    /// Block length along K of int8/int4 weights (absent for float precisions and in folders
    /// written before the choice, which used 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant_block: Option<usize>,
    /// Which operators run the DeltaNet layers.
    pub linear_attn: LinearAttn,
    /// Element type of the attention layers' KV cache (f32 in folders written before the choice).
    #[serde(default)]
    pub kv_cache: KvCache,
    /// Operator sets the graph imports, e.g. `{"": 23, "ai.deltadoc": 1}`.
    pub opsets: std::collections::BTreeMap<String, i64>,
    /// The vision tower's configuration; present exactly when the folder has `vision.onnx`.
    #[serde(default)]
    pub vision_config: Option<VisionConfig>,
    /// SHA-256 of every file of the folder that the runtime reads.
    pub files: std::collections::BTreeMap<String, String>,
}

impl Manifest {
    /// Reads `dir/manifest.json` without judging its format version.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: not a deltadoc model folder (no manifest.json); create one with `deltadoc model import` or `deltadoc model synth`", dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid manifest", path.display()))
    }

    /// Block length of int8/int4 weights (32 for folders written before the choice); `None` for
    /// float precisions.
    pub fn quant_block(&self) -> Option<usize> {
        self.precision.is_quantised().then(|| self.quant_block.unwrap_or(quant::LEGACY_BLOCK))
    }

    /// The precision as people read it: `int4 (blocks of 32)`, `fp32`.
    pub fn precision_label(&self) -> String {
        match self.quant_block() {
            Some(b) => format!("{} (blocks of {b})", self.precision.name()),
            None => self.precision.name().into(),
        }
    }

    /// Identity of the graph and weights (from their hashes): a saved decoder state only fits
    /// the model it came from.
    pub fn identity(&self) -> String {
        let h = |f: &str| self.files.get(f).map(|s| s[..16.min(s.len())].to_string()).unwrap_or_default();
        format!("{}:{}", h("model.onnx"), h("model.onnx.data"))
    }

    /// Whether the weights are random, written by `model synth` (a demo model).
    pub fn is_synthetic(&self) -> bool {
        self.source.starts_with(synth::SOURCE_PREFIX)
    }
}

/// Options of `model import` / `model synth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExportOptions {
    /// Storage precision of the projection weights.
    pub precision: Precision,
    /// Block length along K for int8/int4 (one of [`quant::BLOCK_SIZES`]); `None` takes
    /// [`quant::default_block`].
    pub quant_block: Option<usize>,
    /// Which operators run the DeltaNet layers.
    pub linear_attn: LinearAttn,
    /// Element type of the KV cache.
    pub kv_cache: KvCache,
}

impl Default for ExportOptions {
    /// What `model import` and `model synth` write without options: fp32 weights, deltadoc's
    /// DeltaNet operators, an f16 KV cache.
    fn default() -> Self {
        Self { precision: Precision::Fp32, quant_block: None, linear_attn: LinearAttn::Deltadoc, kv_cache: KvCache::F16 }
    }
}

impl ExportOptions {
    /// The block length int8/int4 weights get; `None` for float precisions.
    pub fn block(&self) -> Option<usize> {
        self.precision.is_quantised().then(|| self.quant_block.unwrap_or_else(|| quant::default_block(self.precision)))
    }
}

/// Writes a model folder from any weight source; `vision` adds the vision graph from the same
/// source (`visual.*` tensors).
pub fn export(
    cfg: &TextConfig,
    vision: Option<&VisionConfig>,
    weights: &mut dyn WeightSource,
    opts: ExportOptions,
    out: &Path,
    source: String,
) -> Result<Manifest> {
    if let Some(v) = vision {
        v.validate(cfg.hidden_size)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the model folder", out.display()))?;
    let model_path = out.join("model.onnx");
    let builder = GraphBuilder::new("qwen3_5_text", &model_path)?;
    let mut progress = Progress::new(cfg.num_hidden_layers as u64, "export layers");
    let b = graph::build(
        builder,
        cfg,
        weights,
        GraphOptions {
            precision: opts.precision,
            quant_block: opts.block(),
            linear_attn: opts.linear_attn,
            kv_cache: opts.kv_cache,
            image_token_id: vision.map_or(vision::IMAGE_PAD, |v| v.image_token_id),
        },
        &mut |_| progress.inc(1),
    )?;
    progress.finish();
    let mut opsets = std::collections::BTreeMap::new();
    opsets.insert(String::new(), ONNX_OPSET);
    opsets.insert(crate::ops::DOMAIN.to_string(), crate::ops::DOMAIN_VERSION);
    opsets.insert("com.microsoft".to_string(), 1);
    let opset_list: Vec<(&str, i64)> = opsets.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    b.finish(
        &model_path,
        &opset_list,
        &[("deltadoc.source", source.clone()), ("deltadoc.precision", opts.precision.name().into())],
    )?;
    let mut names = vec!["model.onnx", "model.onnx.data", "tokenizer.json"];
    if let Some(v) = vision {
        export_vision(v, weights, opts.precision, out, &source)?;
        names.extend(["vision.onnx", "vision.onnx.data"]);
    }
    tracing::info!("writing tokenizer.json");
    crate::tokenizer::write_qwen35_tokenizer(out)?;
    let mut files = std::collections::BTreeMap::new();
    for f in names {
        files.insert(f.to_string(), crate::fetch::sha256_file(&out.join(f))?);
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        architecture: "qwen3_5".into(),
        deltadoc_version: env!("CARGO_PKG_VERSION").into(),
        source,
        config: cfg.clone(),
        precision: opts.precision,
        quant_block: opts.block(),
        linear_attn: opts.linear_attn,
        kv_cache: opts.kv_cache,
        opsets,
        vision_config: vision.cloned(),
        files,
    };
    let path = out.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(manifest)
}

/// Writes `vision.onnx` into `out`: float32 weights for fp32 models, float16 storage otherwise
/// (the tower is a small share of the weights and OCR quality depends on it, so it is never
/// block-quantised). [`export`] calls it; on its own it serves parity checks of the tower alone.
pub fn export_vision(
    cfg: &VisionConfig,
    weights: &mut dyn WeightSource,
    precision: Precision,
    out: &Path,
    source: &str,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the model folder", out.display()))?;
    let path = out.join("vision.onnx");
    let storage = if precision == Precision::Fp32 { Precision::Fp32 } else { Precision::Fp16 };
    let mut progress = Progress::new(cfg.depth as u64, "export vision blocks");
    let b = vision::build(GraphBuilder::new("qwen3_5_vision", &path)?, cfg, weights, storage, &mut |_| progress.inc(1))?;
    progress.finish();
    let opsets = [("", ONNX_OPSET), ("com.microsoft", 1)];
    b.finish(&path, &opsets, &[("deltadoc.source", source.to_string()), ("deltadoc.precision", storage.name().into())])
}

/// Imports a Hugging Face checkpoint folder.
pub fn import(hf_dir: &Path, out: &Path, opts: ExportOptions) -> Result<Manifest> {
    let (cfg, model_type) = TextConfig::from_hf_json(&hf_dir.join("config.json"))?;
    let mut ckpt = checkpoint::Checkpoint::open(hf_dir)?;
    let vision = match (ckpt.has_vision(), VisionConfig::from_hf_json(&hf_dir.join("config.json"))?) {
        (true, Some(v)) => Some(v),
        (true, None) => bail!("{}: checkpoint has model.visual.* tensors but config.json has no vision_config", hf_dir.display()),
        (false, _) => None,
    };
    tracing::info!(
        "importing {} ({model_type}, {} layers, hidden {}, {}{}{})",
        hf_dir.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        opts.precision.name(),
        opts.block().map(|b| format!(" in blocks of {b}")).unwrap_or_default(),
        match &vision {
            Some(v) => format!(", vision tower of {} blocks", v.depth),
            None => ", text only: the checkpoint has no vision weights, so image pages cannot be read".into(),
        }
    );
    let manifest = export(&cfg, vision.as_ref(), &mut ckpt, opts, out, format!("import:{}", hf_dir.display()))
        .with_context(|| format!("{}: import failed", hf_dir.display()))?;
    let mtp = ckpt.mtp_tensors();
    if mtp > 0 {
        // The head only drafts tokens for speculative decoding; the model's own outputs do not
        // depend on it (transformers skips it too).
        tracing::warn!("{}: the multi-token-prediction head ({mtp} mtp.* tensors) is not imported", hf_dir.display());
    }
    let unused = ckpt.unused_tensors();
    if !unused.is_empty() {
        bail!(
            "{}: checkpoint has {} tensor(s) this Qwen3.5 config does not use, e.g. {}; it is not a Qwen3.5 checkpoint of this config",
            hf_dir.display(),
            unused.len(),
            unused.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(manifest)
}

/// An opened model folder (manifest checked).
pub struct ModelDir {
    /// The folder.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl ModelDir {
    /// Opens a folder written by `model import`/`model synth`, checking the format version and that every listed file exists.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        if manifest.format != FORMAT_VERSION {
            bail!(
                "{}: model folder format {} is not supported by this deltadoc (expects {FORMAT_VERSION}); re-import the model",
                dir.display(),
                manifest.format
            );
        }
        for f in manifest.files.keys() {
            if !dir.join(f).is_file() {
                bail!("{}: file {f} listed in manifest.json is missing", dir.display());
            }
        }
        Ok(Self { dir: dir.to_path_buf(), manifest })
    }

    /// Checks every file against the manifest's SHA-256 (slow for large models: hashes all weights).
    pub fn verify(&self) -> Result<()> {
        for (f, want) in &self.manifest.files {
            let got = crate::fetch::sha256_file(&self.dir.join(f))?;
            if &got != want {
                bail!(
                    "{}: {f} has sha256 {got}, manifest says {want}: the folder is corrupt or was modified",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Bytes of the weights file (external data), 0 when absent.
    pub fn weights_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join("model.onnx.data")).map(|m| m.len()).unwrap_or(0)
    }

    /// Bytes of the vision tower's weights file, 0 when the folder has no vision graph.
    pub fn vision_weights_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join("vision.onnx.data")).map(|m| m.len()).unwrap_or(0)
    }

    /// Path of the decoder graph.
    pub fn graph_path(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }

    /// The vision tower's configuration and graph, or an error saying the folder has none.
    pub fn vision(&self) -> Result<(&VisionConfig, PathBuf)> {
        match &self.manifest.vision_config {
            Some(v) => Ok((v, self.dir.join("vision.onnx"))),
            None => bail!(
                "{}: this model folder has no vision graph (the checkpoint it came from had no vision weights); import a \
                 Qwen3.5 checkpoint with its vision tower to read images",
                self.dir.display()
            ),
        }
    }

    /// Loads the folder's tokenizer.
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        crate::tokenizer::Tokenizer::from_file(&self.dir.join("tokenizer.json"))
    }
}
