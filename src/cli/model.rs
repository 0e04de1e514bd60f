//! `deltadoc model`: import a checkpoint, synthesise random weights of a real shape, show a
//! folder's manifest and memory plan, write parity logits.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};

use super::{ImageArgs, Outcome};
use crate::config::ByteSize;
use crate::extract::isolated::{Extraction, Isolation};
use crate::generate::{DEFAULT_PREFILL_CHUNK, Decoder, Logits};
use crate::model::config::Shape;
use crate::model::graph::{KvCache, LinearAttn};
use crate::model::plan;
use crate::model::quant::{self, Precision};
use crate::model::{self, ExportOptions, ModelDir};
use crate::progress::Progress;
use crate::runtime::SessionOptions;
use crate::vision::encoder::VisionEncoder;
use crate::vision::prompt;

#[derive(Args, Clone)]
pub(super) struct ExportArgs {
    /// Storage precision of the projection weights.
    #[arg(long, value_enum, default_value = "fp32")]
    precision: Precision,
    /// Block length along the input dimension for int8/int4 (16, 32, 64, 128 or 256): longer blocks
    /// store fewer scales and run faster, shorter ones round more finely. Default: 128 for int8,
    /// 32 for int4 (speed and accuracy in benches/RESULTS.md).
    #[arg(long, value_parser = parse_block_size)]
    block_size: Option<usize>,
    /// Which operators run the DeltaNet layers.
    #[arg(long, value_enum, default_value = "deltadoc")]
    linear_attn: LinearAttn,
    /// Element type of the attention KV cache: f16 halves the largest buffer of a long context
    /// (logit error in benches/RESULTS.md); bf16 too, and on CPUs with AVX512_BF16 attention then
    /// computes in bf16, about twice as fast at long contexts; f32 is exact.
    #[arg(long, value_enum, default_value = "f16")]
    kv_cache: KvCache,
}

impl ExportArgs {
    fn options(&self) -> Result<ExportOptions> {
        if self.block_size.is_some() && !self.precision.is_quantised() {
            bail!("--block-size applies to --precision int8 or int4, not {}", self.precision.name());
        }
        Ok(ExportOptions {
            precision: self.precision,
            quant_block: self.block_size,
            linear_attn: self.linear_attn,
            kv_cache: self.kv_cache,
        })
    }
}

fn parse_block_size(s: &str) -> std::result::Result<usize, String> {
    let sizes = quant::BLOCK_SIZES;
    match s.parse::<usize>() {
        Ok(n) if sizes.contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a block length ONNX Runtime's MatMulNBits takes ({sizes:?})")),
    }
}

#[derive(Subcommand)]
pub(super) enum ModelCmd {
    /// Convert a Hugging Face Qwen3.5 checkpoint (config.json + *.safetensors) to a model folder.
    Import {
        /// Folder of the Hugging Face checkpoint (config.json, *.safetensors).
        hf_dir: PathBuf,
        /// Model folder to write (created if missing; files of the same names are replaced).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Write seeded random weights of a real Qwen3.5 shape through the importer.
    Synth {
        /// Which real Qwen3.5 configuration to copy the shapes from.
        #[arg(long, value_enum)]
        shape: Shape,
        /// Model folder to write (created if missing; files of the same names are replaced).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights: the same seed writes the same weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the same text-decoder weights as a Hugging Face checkpoint (f32 safetensors
        /// + config.json; the vision tower is not included).
        #[arg(long)]
        hf_out: Option<PathBuf>,
        /// Leave out the vision tower (no vision.onnx; image pages cannot be read).
        #[arg(long)]
        text_only: bool,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Show a model folder's manifest and state sizes.
    Info {
        /// Model folder (from `model import` or `model synth`).
        #[arg(long)]
        model: PathBuf,
        /// Also re-hash every file against the manifest.
        #[arg(long)]
        verify: bool,
        /// Plan the memory of a context of this many tokens (default: the model's maximum).
        #[arg(long)]
        context: Option<usize>,
        /// Memory budget to check the plan against (e.g. 20GiB).
        #[arg(long, default_value = "20GiB")]
        budget: ByteSize,
        /// Tokens per prefill call in the plan.
        #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
        prefill_chunk: usize,
    },
    /// Write float32 logits of every position of a prompt as .npy [seq, vocab]: an id sequence,
    /// or chat messages with text and images (templated, thinking off).
    Logits {
        /// Model folder (from `model import` or `model synth`).
        #[arg(long)]
        model: PathBuf,
        /// JSON array of token ids.
        #[arg(long, required_unless_present = "messages", conflicts_with = "messages")]
        ids_file: Option<PathBuf>,
        /// JSON chat messages; content items are {"type":"text","text":…} or {"type":"image","path":…}.
        #[arg(long)]
        messages: Option<PathBuf>,
        #[command(flatten)]
        image: ImageArgs,
        /// File to write the logits to (.npy, float32 [seq, vocab]).
        #[arg(long)]
        out: PathBuf,
        /// Prefill chunk length in tokens.
        #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
        prefill_chunk: usize,
        /// Prefill the first K tokens, then feed the rest one at a time through the decode path.
        #[arg(long)]
        decode_from: Option<usize>,
        /// Intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// Runs a `model` command.
pub(super) fn run(cmd: ModelCmd) -> Result<Outcome> {
    match cmd {
        ModelCmd::Import { hf_dir, out, export } => {
            let m = model::import(&hf_dir, &out, export.options()?)?;
            eprintln!("wrote {} ({} layers, {})", out.display(), m.config.num_hidden_layers, m.precision_label());
        }
        ModelCmd::Synth { shape, out, seed, hf_out, text_only, export } => synth(shape, &out, seed, hf_out, text_only, &export)?,
        ModelCmd::Info { model, verify, context, budget, prefill_chunk } => info(&model, verify, context, budget, prefill_chunk)?,
        ModelCmd::Logits { model, ids_file: None, messages: Some(messages), image, out, prefill_chunk, threads, .. } => {
            logits_of_messages(&model, &messages, image, &out, prefill_chunk, threads)?
        }
        ModelCmd::Logits { model, ids_file, out, prefill_chunk, decode_from, threads, .. } => {
            let ids_file = ids_file.context("--ids-file or --messages is required")?;
            logits_of_ids(&model, &ids_file, &out, prefill_chunk, decode_from, threads)?
        }
    }
    Ok(Outcome::Success)
}

fn synth(shape: Shape, out: &Path, seed: u64, hf_out: Option<PathBuf>, text_only: bool, export: &ExportArgs) -> Result<()> {
    let (m, synth) = model::synth::write(shape, seed, text_only, export.options()?, out)?;
    eprintln!("wrote {} ({} layers, {})", out.display(), m.config.num_hidden_layers, m.precision_label());
    if let Some(hf) = hf_out {
        synth.write_hf(&shape.config(), &hf)?;
        eprintln!("wrote Hugging Face checkpoint {}", hf.display());
    }
    Ok(())
}

fn info(model: &Path, verify: bool, context: Option<usize>, budget: ByteSize, prefill_chunk: usize) -> Result<()> {
    let m = ModelDir::open(model)?;
    if verify {
        m.verify()?;
    }
    let c = &m.manifest.config;
    let f = plan::Footprint::of(&m);
    let context = context.unwrap_or(c.max_position_embeddings);
    let p = f.plan(context, prefill_chunk, plan::StateCopy::Kept(context));
    let fit = f.max_context_within(budget.0, c.max_position_embeddings, prefill_chunk, plan::StateCopy::Kept);
    // Calls on contexts of this length decoded together (worker.max_batch): beside the plan,
    // each holds its own cache and state; one alone needs only the plan.
    let sequence = f.sequence_bytes(context);
    let together = match budget.0.checked_sub(p.total_bytes) {
        None => 0,
        Some(room) => (room / sequence.max(1)).max(1),
    };
    let info = serde_json::json!({
        "plan": p,
        "budget_bytes": budget.0,
        "fits_budget": p.total_bytes <= budget.0,
        "max_context_within_budget": fit,
        "batch": {
            "sequence_bytes": sequence,
            "calls_together_within_budget": together,
        },
        "manifest": m.manifest,
        "memory": {
            "weights_file_bytes": f.weights_file,
            "vision_weights_file_bytes": f.vision_file,
            "linear_state_bytes": c.linear_state_bytes(),
            "kv_cache": f.kv_cache,
            "kv_bytes_per_token": f.kv_bytes_per_token(),
            "kv_bytes_at_max_context": f.kv_bytes_per_token() * c.max_position_embeddings as u64,
        }
    });
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}

fn logits_of_messages(model: &Path, messages: &Path, images: ImageArgs, out: &Path, chunk: usize, threads: usize) -> Result<()> {
    let m = ModelDir::open(model)?;
    let opts = SessionOptions::with_threads(threads);
    let mut enc = VisionEncoder::open(&m, &opts)?;
    let msgs = prompt::read_messages(messages)?;
    let extraction = Extraction::Isolated(Isolation::with_defaults()?);
    let load = |p: &Path| {
        let page = extraction.page_image(p, 1, images.max_decode_pixels);
        page.map(|pi| pi.image).map_err(|f| anyhow!(f.brief()))
    };
    let prompt = prompt::build(&m.tokenizer()?, enc.config(), &msgs, false, &images.options(), &load)?;
    let mut dec = Decoder::open(&m, &opts)?;
    let mut rows = Vec::with_capacity(prompt.ids.len());
    let mut progress = Progress::new(prompt.ids.len() as u64, "logits");
    crate::vision::prefill(&mut dec, &mut enc, &prompt, chunk, Logits::All, |l| {
        progress.inc(l.nrows() as u64);
        rows.extend(l.outer_iter().map(|r| r.to_vec()));
        Ok(())
    })?;
    progress.finish();
    write_npy(out, &rows)
}

fn logits_of_ids(
    model: &Path,
    ids_file: &Path,
    out: &Path,
    chunk: usize,
    decode_from: Option<usize>,
    threads: usize,
) -> Result<()> {
    let text = std::fs::read_to_string(ids_file).with_context(|| format!("{}: cannot read", ids_file.display()))?;
    let ids: Vec<u32> =
        serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON array of token ids", ids_file.display()))?;
    if ids.is_empty() {
        bail!("{}: no token ids", ids_file.display());
    }
    let m = ModelDir::open(model)?;
    let vocab = m.manifest.config.vocab_size as u32;
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
        bail!("{}: token id {bad} is outside the vocabulary (0..{vocab})", ids_file.display());
    }
    let mut dec = Decoder::open(&m, &SessionOptions::with_threads(threads))?;
    let split = decode_from.unwrap_or(ids.len()).min(ids.len());
    let mut rows = Vec::with_capacity(ids.len());
    let mut progress = Progress::new(ids.len() as u64, "logits");
    for part in ids[..split].chunks(chunk.max(1)) {
        let l = dec.forward(part, Logits::All)?;
        rows.extend(l.outer_iter().map(|r| r.to_vec()));
        progress.inc(part.len() as u64);
    }
    for &id in &ids[split..] {
        rows.push(dec.forward(&[id], Logits::All)?.row(0).to_vec());
        progress.inc(1);
    }
    progress.finish();
    write_npy(out, &rows)
}

/// Writes rows of equal length as a float32 little-endian `.npy` (format 1.0).
fn write_npy(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let cols = rows.first().map(|r| r.len()).unwrap_or(0);
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {cols}), }}", rows.len());
    // Magic (6) + version (2) + header length (2) + header, padded with spaces to 64 bytes, then '\n'.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for r in rows {
        f.write_all(bytemuck::cast_slice(r))?;
    }
    f.flush()?;
    Ok(())
}
