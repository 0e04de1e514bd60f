//! `deltadoc` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use deltadoc::generate::{self, Decoder, GenerateOptions, Logits, Sampling};
use deltadoc::model::config::Shape;
use deltadoc::model::graph::LinearAttn;
use deltadoc::model::quant::Precision;
use deltadoc::model::{self, ExportOptions, ModelDir};
use deltadoc::progress::Progress;
use deltadoc::runtime::SessionOptions;
use deltadoc::tokenizer::{Message, Role, STOP_TOKENS};

#[derive(Parser)]
#[command(name = "deltadoc", version, about = "Folders of documents to structured JSON with a local Qwen3.5 model")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Model folders: import, synthesise, inspect, parity logits.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Generate a reply to a prompt and stream it to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of a text (or of its chat prompt) as JSON.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        /// Wrap the text in the chat template as one user message.
        #[arg(long)]
        chat: bool,
        /// Thinking mode for --chat.
        #[arg(long)]
        think: bool,
        text: String,
    },
    /// Measure prefill/decode speed, time to first token, peak memory and state size.
    Bench {
        #[arg(long)]
        model: PathBuf,
        /// Prompt length in tokens (random ordinary tokens, seeded).
        #[arg(long)]
        prompt_tokens: usize,
        /// Tokens to generate greedily after the prompt.
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Run this many stages on the prompt through a snapshot (prefix reuse).
        #[arg(long, default_value_t = 1)]
        stages: usize,
        /// Instruction tokens per stage.
        #[arg(long, default_value_t = 32)]
        stage_tokens: usize,
    },
    /// Demo: build the bundled tiny random-weight model if needed and generate from a prompt.
    Demo {
        /// Where the demo model lives.
        #[arg(long, default_value = ".cache/models/tiny")]
        model: PathBuf,
    },
}

#[derive(Args, Clone)]
struct ExportArgs {
    /// Storage precision of the projection weights.
    #[arg(long, value_enum, default_value = "fp32")]
    precision: Precision,
    /// Which operators run the DeltaNet layers.
    #[arg(long, value_enum, default_value = "deltadoc")]
    linear_attn: LinearAttn,
}

impl ExportArgs {
    fn options(&self) -> ExportOptions {
        ExportOptions { precision: self.precision, linear_attn: self.linear_attn }
    }
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Convert a Hugging Face Qwen3.5 checkpoint (config.json + *.safetensors) to a model folder.
    Import {
        hf_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Write seeded random weights of a real Qwen3.5 shape through the importer.
    Synth {
        #[arg(long, value_enum)]
        shape: Shape,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the same weights as a Hugging Face checkpoint (f32 safetensors + config.json).
        #[arg(long)]
        hf_out: Option<PathBuf>,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Show a model folder's manifest and state sizes.
    Info {
        #[arg(long)]
        model: PathBuf,
        /// Also re-hash every file against the manifest.
        #[arg(long)]
        verify: bool,
    },
    /// Write float32 logits of every position of an id sequence as .npy [seq, vocab].
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// JSON array of token ids.
        #[arg(long)]
        ids_file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Prefill chunk length in tokens.
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Prefill the first K tokens, then feed the rest one at a time through the decode path.
        #[arg(long)]
        decode_from: Option<usize>,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Let the model think before answering (off by default).
    #[arg(long)]
    think: bool,
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print timing statistics to stderr at the end.
    #[arg(long)]
    stats: bool,
    /// Make a long prefill resumable: save the state to this file every --checkpoint-every
    /// tokens; rerunning the same command after a crash resumes from it.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 8192)]
    checkpoint_every: usize,
}

fn session_options(threads: usize) -> SessionOptions {
    let mut o = SessionOptions::default();
    if threads > 0 {
        o.threads = threads;
    }
    o
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DELTADOC_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Model(m) => model_cmd(m),
        Cmd::Generate(g) => generate_cmd(g),
        Cmd::Tokenize { model, chat, think, text } => {
            let tok = ModelDir::open(&model)?.tokenizer()?;
            let ids =
                if chat { tok.chat_prompt(&[Message { role: Role::User, content: text }], think)? } else { tok.encode(&text)? };
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Cmd::Bench { model, prompt_tokens, gen_tokens, prefill_chunk, threads, seed, json, stages, stage_tokens } => {
            let m = ModelDir::open(&model)?;
            let opts = deltadoc::bench::BenchOptions { prompt_tokens, gen_tokens, prefill_chunk, seed, stages, stage_tokens };
            let r = deltadoc::bench::run(&m, &session_options(threads), &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("model          {} ({}, {} DeltaNet ops)", m.dir.display(), r.precision, r.linear_attn);
                println!("threads        {}", r.threads);
                println!("load           {:.2} s", r.load_s);
                println!(
                    "prefill        {} tokens, {:.1} tok/s (chunks of {})",
                    r.prompt_tokens, r.prefill_tokens_per_s, r.prefill_chunk
                );
                println!("first token    {:.3} s", r.ttft_s);
                println!("decode         {} tokens, {:.2} tok/s", r.gen_tokens, r.decode_tokens_per_s);
                println!("KV + state     {:.1} MiB", mib(r.kv_state_bytes));
                println!("peak RSS       {:.1} MiB", mib(r.peak_rss_bytes));
                if let Some(ratio) = r.prefix_reuse_ratio {
                    let stages: Vec<String> = r.stage_s.iter().map(|s| format!("{s:.2}")).collect();
                    println!(
                        "stages         {} s each after one shared prefill; total / one stage = {ratio:.2}",
                        stages.join(", ")
                    );
                    println!("snapshot       {:.1} MiB", mib(r.snapshot_bytes as u64));
                }
            }
            Ok(())
        }
        Cmd::Demo { model } => {
            if !model.join("manifest.json").is_file() {
                tracing::info!("building the demo model (tiny shape, random weights) in {}", model.display());
                let mut synth = model::synth::Synth::new(0);
                model::export(
                    &Shape::Tiny.config(),
                    &mut synth,
                    ExportOptions { precision: Precision::Fp32, linear_attn: LinearAttn::Deltadoc },
                    &model,
                    "synth:tiny:seed=0".into(),
                )?;
            }
            generate_cmd(GenerateArgs {
                model,
                prompt: "Summarise this agreement in one sentence: the Supplier delivers 100 units by 1 March 2027.".into(),
                system: None,
                max_new_tokens: 32,
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                seed: 0,
                think: false,
                prefill_chunk: 512,
                threads: 0,
                stats: true,
                checkpoint: None,
                checkpoint_every: 8192,
            })
        }
    }
}

fn model_cmd(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Import { hf_dir, out, export } => {
            let m = model::import(&hf_dir, &out, export.options())?;
            eprintln!("wrote {} ({} layers, {})", out.display(), m.config.num_hidden_layers, m.precision.name());
            Ok(())
        }
        ModelCmd::Synth { shape, out, seed, hf_out, export } => {
            let cfg = shape.config();
            let mut synth = model::synth::Synth::new(seed);
            let m = model::export(&cfg, &mut synth, export.options(), &out, format!("synth:{}:seed={seed}", shape.name()))?;
            eprintln!("wrote {} ({} layers, {})", out.display(), m.config.num_hidden_layers, m.precision.name());
            if let Some(hf) = hf_out {
                synth.write_hf(&cfg, &hf)?;
                eprintln!("wrote Hugging Face checkpoint {}", hf.display());
            }
            Ok(())
        }
        ModelCmd::Info { model, verify } => {
            let m = ModelDir::open(&model)?;
            if verify {
                m.verify()?;
            }
            let c = &m.manifest.config;
            let weights = std::fs::metadata(m.dir.join("model.onnx.data")).map(|x| x.len()).unwrap_or(0);
            let info = serde_json::json!({
                "manifest": m.manifest,
                "memory": {
                    "weights_file_bytes": weights,
                    "linear_state_bytes": c.linear_state_bytes(),
                    "kv_bytes_per_token_f32": c.kv_bytes_per_token(),
                    "kv_bytes_at_max_context_f32": c.kv_bytes_per_token() * c.max_position_embeddings,
                }
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
        ModelCmd::Logits { model, ids_file, out, prefill_chunk, decode_from, threads } => {
            let text = std::fs::read_to_string(&ids_file).with_context(|| format!("{}: cannot read", ids_file.display()))?;
            let ids: Vec<u32> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of token ids", ids_file.display()))?;
            if ids.is_empty() {
                bail!("{}: no token ids", ids_file.display());
            }
            let m = ModelDir::open(&model)?;
            let vocab = m.manifest.config.vocab_size as u32;
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                bail!("{}: token id {bad} is outside the vocabulary (0..{vocab})", ids_file.display());
            }
            let mut dec = Decoder::open(&m, &session_options(threads))?;
            let split = decode_from.unwrap_or(ids.len()).min(ids.len());
            let mut rows = Vec::with_capacity(ids.len());
            let mut progress = Progress::new(ids.len() as u64, "logits");
            for part in ids[..split].chunks(prefill_chunk.max(1)) {
                let l = dec.forward(part, Logits::All)?;
                rows.extend(l.outer_iter().map(|r| r.to_vec()));
                progress.inc(part.len() as u64);
            }
            for &id in &ids[split..] {
                rows.push(dec.forward(&[id], Logits::All)?.row(0).to_vec());
                progress.inc(1);
            }
            progress.finish();
            write_npy(&out, &rows)
        }
    }
}

fn generate_cmd(g: GenerateArgs) -> Result<()> {
    let m = ModelDir::open(&g.model)?;
    let tok = m.tokenizer()?;
    let mut messages = Vec::new();
    if let Some(s) = g.system {
        messages.push(Message { role: Role::System, content: s });
    }
    messages.push(Message { role: Role::User, content: g.prompt });
    let prompt = tok.chat_prompt(&messages, g.think)?;
    let mut dec = Decoder::open(&m, &session_options(g.threads))?;
    let opts = GenerateOptions {
        max_new_tokens: g.max_new_tokens,
        prefill_chunk: g.prefill_chunk,
        sampling: Sampling { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed: g.seed },
        stop_tokens: STOP_TOKENS.to_vec(),
        checkpoint: g.checkpoint.map(|p| (p, g.checkpoint_every)),
    };
    let mut stdout = std::io::stdout().lock();
    let mut pending: Vec<u8> = Vec::new();
    let (_, stats) = generate::generate(&mut dec, &prompt, &opts, |t| {
        pending.extend(tok.token_bytes(t));
        // Print the longest valid UTF-8 prefix; a character split across tokens waits.
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        stdout.write_all(&String::from_utf8_lossy(&pending[..valid]).into_owned().into_bytes())?;
        stdout.flush()?;
        pending.drain(..valid);
        Ok(())
    })?;
    if !pending.is_empty() {
        stdout.write_all(String::from_utf8_lossy(&pending).as_bytes())?;
    }
    writeln!(stdout)?;
    if g.stats {
        let pf = stats.prompt_tokens as f64 / stats.prefill_time.as_secs_f64().max(1e-9);
        let dc = stats.generated_tokens as f64 / stats.decode_time.as_secs_f64().max(1e-9);
        eprintln!(
            "prompt {} tokens ({pf:.1} tok/s), generated {} tokens ({dc:.1} tok/s), stopped by {}; KV + state {:.1} MiB",
            stats.prompt_tokens,
            stats.generated_tokens,
            stats.stopped_by,
            mib(dec.state_bytes() as u64)
        );
    }
    Ok(())
}

/// Bytes as mebibytes, for human-readable output.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
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
