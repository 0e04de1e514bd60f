//! Seeded random weights of the real shapes (`model synth`), drawn tensor by tensor so the same
//! (seed, name) always gives the same values whatever order the graph asks in.
//!
//! Values are rounded to bf16-representable floats, so the f32 graph, a bf16 copy for llama.cpp
//! and an f32 Hugging Face checkpoint all hold identical weights.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};

use super::checkpoint::write_shard;
use super::config::{Shape, TextConfig};
use super::graph::WeightSource;
use super::vision::VisionConfig;
use super::{ExportOptions, Manifest};

/// How a manifest's `source` starts when `model synth` wrote the weights.
pub const SOURCE_PREFIX: &str = "synth:";

/// Writes seeded random weights of `shape` through the importer into `out`, with a vision
/// tower of the shape's size unless `text_only`; the weight source comes back so the same
/// weights can also be written as a Hugging Face checkpoint.
pub fn write(shape: Shape, seed: u64, text_only: bool, opts: ExportOptions, out: &Path) -> Result<(Manifest, Synth)> {
    let cfg = shape.config();
    let mut synth = Synth::new(seed);
    let vision = (!text_only).then(|| VisionConfig::of_shape(shape, cfg.hidden_size));
    let source = format!("{SOURCE_PREFIX}{}:seed={seed}", shape.name());
    let m = super::export(&cfg, vision.as_ref(), &mut synth, opts, out, source)?;
    Ok((m, synth))
}

/// Random weight source; remembers what was asked for so it can write the same tensors as a
/// Hugging Face checkpoint.
pub struct Synth {
    seed: u64,
    requested: Vec<(String, Vec<usize>)>,
}

impl Synth {
    /// Random weights drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, requested: Vec::new() }
    }

    fn draw(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        // FNV-1a of the name, mixed with the seed: independent streams per tensor.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = StdRng::seed_from_u64(h ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let normal = |rng: &mut StdRng, std: f32| -> Vec<f32> {
            let d = Normal::new(0.0f32, std).unwrap();
            (0..n).map(|_| d.sample(rng)).collect()
        };
        let v = if name.starts_with("visual.") {
            if name.contains("norm") && name.ends_with(".weight") {
                // LayerNorm gains (plain weight, ones in the reference).
                normal(&mut rng, 0.1).into_iter().map(|x| 1.0 + x).collect()
            } else if name.ends_with(".bias") {
                normal(&mut rng, 0.02)
            } else if name == "visual.pos_embed.weight" {
                normal(&mut rng, 0.5)
            } else {
                // Linear maps, the patch Conv3d included: fan-in is everything but the output axis.
                normal(&mut rng, 1.0 / ((n / shape[0].max(1)) as f32).sqrt())
            }
        } else if name.ends_with("A_log") {
            (0..n).map(|_| rng.random_range(1.0f32..16.0).ln()).collect()
        } else if name.ends_with("dt_bias") {
            (0..n).map(|_| rng.random_range(0.5f32..1.5)).collect()
        } else if name.ends_with("linear_attn.norm.weight") {
            // Plain-weight norm (initialised to ones in the reference).
            normal(&mut rng, 0.1).into_iter().map(|x| 1.0 + x).collect()
        } else if name.ends_with("norm.weight") {
            // Zero-centred (1 + w) norms: small offsets around 0.
            normal(&mut rng, 0.1)
        } else if name.ends_with("conv1d.weight") {
            (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect()
        } else if name == "embed_tokens.weight" || name == "lm_head.weight" {
            normal(&mut rng, 1.0 / fan_in.sqrt())
        } else {
            // Projections: unit-variance outputs for unit-variance inputs.
            normal(&mut rng, 1.0 / fan_in.sqrt())
        };
        v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
    }

    /// Writes the text-decoder tensors handed out so far as a Hugging Face `qwen3_5_text` checkpoint: one
    /// safetensors shard per decoder layer plus the index, and `config.json`.
    pub fn write_hf(&self, cfg: &TextConfig, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut groups: BTreeMap<String, Vec<&(String, Vec<usize>)>> = BTreeMap::new();
        // The text decoder only: a `qwen3_5_text` checkpoint has no place for the vision tower.
        for r in self.requested.iter().filter(|r| !r.0.starts_with("visual.")) {
            let group = match r.0.strip_prefix("layers.") {
                Some(rest) => format!("layer{:04}", rest.split('.').next().unwrap_or("0").parse::<usize>().unwrap_or(0)),
                None => "other".into(),
            };
            groups.entry(group).or_default().push(r);
        }
        let total = groups.len();
        let mut weight_map = serde_json::Map::new();
        for (i, (_, items)) in groups.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, total);
            let mut tensors = BTreeMap::new();
            for (name, shape) in items {
                let full = if name == "lm_head.weight" { name.clone() } else { format!("model.{name}") };
                weight_map.insert(full.clone(), serde_json::Value::String(file.clone()));
                tensors.insert(full, (shape.clone(), self.draw(name, shape)));
            }
            write_shard(&dir.join(&file), &tensors)?;
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
        let mut config = cfg.to_hf_text_json();
        config["architectures"] = serde_json::json!(["Qwen3_5ForCausalLM"]);
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
        Ok(())
    }
}

impl WeightSource for Synth {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if !self.requested.iter().any(|(n, _)| n == name) {
            self.requested.push((name.to_string(), shape.to_vec()));
        }
        Ok(self.draw(name, shape))
    }
}
