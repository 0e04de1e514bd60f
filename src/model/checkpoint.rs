//! Reading Hugging Face Qwen3.5 checkpoints (`*.safetensors`, sharded or not) and writing them
//! (`model synth --hf-out`), so peers can run on exactly our weights.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::graph::WeightSource;

/// Memory-mapped safetensors files of one checkpoint, indexed by tensor name.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// name → (file index, dtype, shape, byte range in the file)
    index: HashMap<String, (usize, Dtype, Vec<usize>, std::ops::Range<usize>)>,
    /// Prefix of the text decoder's tensors: `model.language_model.` or `model.`.
    prefix: String,
    used: BTreeSet<String>,
}

impl Checkpoint {
    /// Opens every `*.safetensors` file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list the checkpoint folder", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            bail!("{}: no *.safetensors files", dir.display());
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (fi, p) in paths.into_iter().enumerate() {
            let f = File::open(&p).with_context(|| format!("{}: cannot open", p.display()))?;
            // SAFETY: the checkpoint is opened read-only; deltadoc never writes to it while mapped.
            let map = unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", p.display()))?;
            let (header, meta) =
                SafeTensors::read_metadata(&map).with_context(|| format!("{}: not a safetensors file", p.display()))?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if let Some((other, ..)) = index.insert(name.clone(), (fi, info.dtype, info.shape.clone(), base + s..base + e)) {
                    bail!("{}: tensor {name} also appears in shard {other}", p.display());
                }
            }
            files.push((p, map));
        }
        let prefix =
            if index.keys().any(|k| k.starts_with("model.language_model.")) { "model.language_model." } else { "model." };
        Ok(Self { files, index, prefix: prefix.into(), used: BTreeSet::new() })
    }

    /// Whether the checkpoint carries the vision tower (`model.visual.*`).
    pub fn has_vision(&self) -> bool {
        self.index.keys().any(|k| k.starts_with("model.visual."))
    }

    /// Tensors the graphs did not consume: a sign of a checkpoint of another layout.
    /// Multi-token-prediction (`mtp.`) tensors are expected and skipped.
    pub fn unused_tensors(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.index.keys().filter(|k| !k.starts_with("mtp.") && !self.used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// How many multi-token-prediction (`mtp.`) tensors the checkpoint holds.
    pub fn mtp_tensors(&self) -> usize {
        self.index.keys().filter(|k| k.starts_with("mtp.")).count()
    }

    fn full_name(&self, name: &str) -> String {
        if name == "lm_head.weight" {
            name.to_string()
        } else if name.starts_with("visual.") {
            format!("model.{name}")
        } else {
            format!("{}{name}", self.prefix)
        }
    }
}

impl WeightSource for Checkpoint {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = self.full_name(name);
        let Some((fi, dtype, got, range)) = self.index.get(&full) else {
            bail!("checkpoint has no tensor {full} (expected shape {shape:?})");
        };
        if got.as_slice() != shape {
            bail!("tensor {full} has shape {got:?}, expected {shape:?} for this config");
        }
        let bytes = &self.files[*fi].1[range.clone()];
        let n: usize = shape.iter().product();
        let out = match dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => bail!("tensor {full} has dtype {other:?}; only F32, BF16 and F16 are supported"),
        };
        if out.len() != n {
            bail!("{}: tensor {full} holds {} values, expected {n}", self.files[*fi].0.display(), out.len());
        }
        self.used.insert(full);
        Ok(out)
    }
}

/// Writes named f32 tensors as one safetensors shard.
pub fn write_shard(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (shape, data))| {
            let v = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .with_context(|| format!("tensor {n}"))?;
            Ok((n.clone(), v))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, path).with_context(|| format!("{}: cannot write", path.display()))
}
