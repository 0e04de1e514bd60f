//! `deltadoc` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use deltadoc::daemon;
use deltadoc::generate::{self, Decoder, GenerateOptions, Logits, Sampling};
use deltadoc::model::config::Shape;
use deltadoc::model::graph::{KvCache, LinearAttn};
use deltadoc::model::plan;
use deltadoc::model::quant::Precision;
use deltadoc::model::{self, ExportOptions, ModelDir};
use deltadoc::progress::Progress;
use deltadoc::runtime::SessionOptions;
use deltadoc::store::{Ledger, SqliteLedger};
use deltadoc::tokenizer::{Message, Role, STOP_TOKENS};
use deltadoc::vision::preprocess::ImageOptions;

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
    /// Transcribe image files and scanned PDF pages with the vision model, page by page.
    Ocr {
        /// Model folder (from `model import` or `model synth`).
        #[arg(long)]
        model: PathBuf,
        /// Image files (PNG, JPEG, TIFF, GIF, WebP, BMP) or PDFs.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Prompt tokens a page image may take (1,024 pixels each); larger pages are downscaled.
        #[arg(long, default_value_t = deltadoc::ocr::DEFAULT_PAGE_TOKENS)]
        max_page_tokens: u64,
        /// Cut a page over this many image tokens into bands (between text lines) read as
        /// consecutive images of one prompt: bounds the vision tower's quadratic attention.
        #[arg(long)]
        tile_tokens: Option<u64>,
        /// Write the images the model reads (PNG per page, or per band) into this folder.
        #[arg(long)]
        save_images: Option<PathBuf>,
        #[command(flatten)]
        image: ImageArgs,
        /// Longest transcription per page, in tokens.
        #[arg(long, default_value_t = 1024)]
        max_new_tokens: usize,
        /// Tokens per prefill call: longer calls run faster and hold larger activations.
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// One JSON object per page (file, page, method, text or error) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of a text (or of its chat prompt) as JSON.
    Tokenize {
        /// Model folder (from `model import` or `model synth`).
        #[arg(long)]
        model: PathBuf,
        /// Wrap the text in the chat template as one user message.
        #[arg(long)]
        chat: bool,
        /// Thinking mode for --chat.
        #[arg(long)]
        think: bool,
        /// The text to tokenize.
        text: String,
    },
    /// Measure prefill/decode speed, time to first token, peak memory and state size.
    Bench {
        /// Model folder (from `model import` or `model synth`).
        #[arg(long)]
        model: PathBuf,
        /// Prompt length in tokens (random ordinary tokens, seeded).
        #[arg(long)]
        prompt_tokens: usize,
        /// Tokens to generate greedily after the prompt.
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        /// Tokens per prefill call: longer calls run faster and hold larger activations.
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Seed of the random prompt.
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
        /// Make the prefill resumable (a 262K prompt is hours): save the state to this file every
        /// --checkpoint-every tokens; rerunning the same command resumes, and the report counts
        /// the time of the earlier runs (FILE.timing.jsonl keeps it, and the rate at every depth).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Tokens between checkpoints; 0 saves none and only writes the timing log.
        #[arg(long, default_value_t = 8192)]
        checkpoint_every: usize,
    },
    /// Run the daemon: watch the inboxes, process documents, serve metrics (SIGTERM drains).
    Serve(DaemonArgs),
    /// Process what is in the inboxes now (schedules ignored), then exit.
    Run {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Required: one pass (continuous running is `serve`).
        #[arg(long)]
        once: bool,
    },
    /// Process one file through a pipeline and print its result JSON (no ledger).
    Process {
        /// The document to process.
        file: PathBuf,
        /// Pipeline name from the configuration (see `config check`).
        #[arg(long)]
        pipeline: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Queue and recent jobs from the ledger.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Recent jobs to list.
        #[arg(long, default_value_t = 20)]
        recent: usize,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Queue failed (quarantined or waiting) jobs again.
    Retry {
        /// Job id (see `status`).
        job: Option<i64>,
        /// Every failed job.
        #[arg(long, conflicts_with = "job")]
        failed: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Extract the text of a file per page (what the pipeline's extract step sees).
    Extract {
        /// The document to extract.
        file: PathBuf,
        /// Print the JSON the daemon reads instead of the text.
        #[arg(long)]
        json: bool,
        /// A PDF with more pages is refused as too large.
        #[arg(long, default_value_t = 5000)]
        max_pages: u32,
    },
}

#[derive(Args, Clone)]
struct DaemonArgs {
    /// Daemon configuration (default: config/deltadoc.yaml if present, else built-in defaults).
    #[arg(long, env = "DELTADOC_CONFIG")]
    config: Option<PathBuf>,
}

impl DaemonArgs {
    fn load(&self) -> Result<deltadoc::config::Config> {
        deltadoc::config::Config::load(self.config.as_deref())
    }
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the daemon configuration and every pipeline; print a summary.
    Check(DaemonArgs),
}

#[derive(Args, Clone)]
struct ExportArgs {
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
    let sizes = model::quant::BLOCK_SIZES;
    match s.parse::<usize>() {
        Ok(n) if sizes.contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a block length ONNX Runtime's MatMulNBits takes ({sizes:?})")),
    }
}

#[derive(Subcommand)]
enum ModelCmd {
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
        budget: deltadoc::config::ByteSize,
        /// Tokens per prefill call in the plan.
        #[arg(long, default_value_t = 512)]
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
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Prefill the first K tokens, then feed the rest one at a time through the decode path.
        #[arg(long)]
        decode_from: Option<usize>,
        /// Intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// Pixel budgets of image preprocessing.
#[derive(Args, Clone, Copy)]
struct ImageArgs {
    /// Smaller images are enlarged to at least this many pixels.
    #[arg(long, default_value_t = ImageOptions::default().min_pixels)]
    min_pixels: u64,
    /// Larger images are shrunk to at most this many pixels (1,024 pixels per prompt token).
    #[arg(long, default_value_t = ImageOptions::default().max_pixels)]
    max_pixels: u64,
    /// Images declaring more pixels are refused before decoding.
    #[arg(long, default_value_t = ImageOptions::default().max_decode_pixels)]
    max_decode_pixels: u64,
}

impl ImageArgs {
    fn options(self) -> ImageOptions {
        ImageOptions { min_pixels: self.min_pixels, max_pixels: self.max_pixels, max_decode_pixels: self.max_decode_pixels }
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// Model folder (from `model import` or `model synth`).
    #[arg(long)]
    model: PathBuf,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    /// Longest reply in tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the k likeliest tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the likeliest tokens whose probabilities add up to p (1 = no limit).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Let the model think before answering (off by default).
    #[arg(long)]
    think: bool,
    /// Tokens per prefill call: longer calls run faster and hold larger activations.
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
    /// Tokens between checkpoints.
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
    let cli = Cli::parse();
    // Daemon commands log in the configured format; a broken configuration is reported below.
    let json = match &cli.cmd {
        Cmd::Serve(d) | Cmd::Run { daemon: d, .. } => {
            d.load().map(|c| c.daemon.log_format == deltadoc::config::LogFormat::Json).unwrap_or(false)
        }
        _ => false,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DELTADOC_LOG").unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs a command; the exit code is 0 unless the command reports a per-file failure.
fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Serve(d) => daemon::run(d.load()?, daemon::Mode::Serve).map(|_| 0),
        Cmd::Run { daemon: d, once } => {
            if !once {
                bail!("`run` needs --once (use `serve` to keep running)");
            }
            let cfg = d.load()?;
            let outputs: Vec<String> = cfg
                .pipelines
                .iter()
                .map(|p| format!("{}: {} (failed documents: {})", p.name(), p.output.display(), p.quarantine.display()))
                .collect();
            daemon::run(cfg, daemon::Mode::Once)?;
            eprintln!("results (one JSON per document):\n  {}", outputs.join("\n  "));
            Ok(0)
        }
        Cmd::Process { file, pipeline, daemon: d } => {
            let cfg = d.load()?;
            match daemon::process_one(&cfg, &pipeline, &file)? {
                Ok(r) => {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                    Ok(0)
                }
                Err(f) => {
                    println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "error": f }))?);
                    eprintln!("error: {} ({}, stage {})", f.message, f.reason.name(), f.stage);
                    Ok(2)
                }
            }
        }
        Cmd::Status { daemon: d, recent, json } => status_cmd(&d.load()?, recent, json).map(|_| 0),
        Cmd::Retry { job, failed, daemon: d } => {
            if job.is_none() && !failed {
                bail!("name a job id or give --failed");
            }
            let cfg = d.load()?;
            let mut l = SqliteLedger::open(&cfg.daemon.state_dir)?;
            let n = l.retry(job)?;
            if let Some(id) = job
                && n == 0
            {
                bail!("job {id} is not failed, quarantined or done (see `deltadoc status`)");
            }
            eprintln!("{n} job(s) queued again; a running daemon picks them up (or run `deltadoc run --once`)");
            Ok(0)
        }
        Cmd::Config(ConfigCmd::Check(d)) => {
            let cfg = d.load()?;
            let src = cfg.file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "built-in defaults".into());
            println!("config {src}: ok (model {}, state {})", cfg.daemon.model.path.display(), cfg.daemon.state_dir.display());
            for p in &cfg.pipelines {
                let when = match &p.spec.schedule {
                    Some(s) => format!("cron {:?} {} window {:?}", s.cron.text, s.timezone.name, s.window.0),
                    None => "continuous".into(),
                };
                let stages: Vec<String> = p
                    .spec
                    .stages
                    .iter()
                    .map(|s| match &s.compiled {
                        Some(_) => format!("{} ({}, output ≤ {} tokens)", s.name.value, s.kind.name(), s.output_tokens()),
                        None => format!("{} ({})", s.name.value, s.kind.name()),
                    })
                    .collect();
                println!(
                    "pipeline {} v{} ({}): {} inbox(es) -> {}; {when}; stages: {}",
                    p.name(),
                    p.spec.version,
                    p.file.display(),
                    p.inboxes.len(),
                    p.output.display(),
                    stages.join(", ")
                );
            }
            Ok(0)
        }
        Cmd::Extract { file, json, max_pages } => {
            let r = deltadoc::extract::extract_file(&file, deltadoc::extract::ExtractLimits { max_pages });
            if json {
                let o = match r {
                    Ok(e) => deltadoc::extract::isolated::Outcome::Ok(e),
                    Err(f) => deltadoc::extract::isolated::Outcome::Error(f),
                };
                println!("{}", serde_json::to_string(&o)?);
                return Ok(0);
            }
            match r {
                Ok(e) => {
                    for w in &e.warnings {
                        eprintln!("warning: {w}");
                    }
                    for p in &e.pages {
                        println!(
                            "--- page {} ({:?}{}) ---",
                            p.number,
                            p.method,
                            p.ocr_reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                        );
                        println!("{}", p.text);
                    }
                    Ok(0)
                }
                Err(f) => {
                    eprintln!("error: {} ({})", f.message, f.reason.name());
                    Ok(2)
                }
            }
        }
        Cmd::Model(m) => model_cmd(m).map(|_| 0),
        Cmd::Generate(g) => generate_cmd(g).map(|_| 0),
        Cmd::Ocr {
            model,
            files,
            max_page_tokens,
            tile_tokens,
            save_images,
            image,
            max_new_tokens,
            prefill_chunk,
            threads,
            json,
        } => {
            let m = ModelDir::open(&model)?;
            let opts = deltadoc::ocr::OcrOptions {
                image: image.options().with_token_budget(max_page_tokens),
                tile_tokens,
                save_images,
                max_new_tokens,
                prefill_chunk,
                instruction: deltadoc::pipeline::OCR_INSTRUCTION.into(),
            };
            let mut reader = deltadoc::ocr::Reader::open(&m, &session_options(threads), opts)?;
            let mut failed = 0;
            let mut progress = Progress::new(files.len() as u64, "ocr files");
            for f in &files {
                let shown = f.display().to_string();
                let res = reader.read_file(f, |p| {
                    if p.text.is_err() {
                        failed += 1;
                    }
                    if json {
                        let (text, error) = match &p.text {
                            Ok(t) => (Some(t.as_str()), None),
                            Err(e) => (None, Some(e.as_str())),
                        };
                        let line = serde_json::json!({"file": shown, "page": p.page, "method": p.method, "text": text,
                            "error": error, "note": p.note});
                        println!("{line}");
                    } else {
                        println!("==> {shown} page {} ({}) <==", p.page, p.method);
                        match &p.text {
                            Ok(t) => println!("{t}\n"),
                            Err(e) => println!("error: {e}\n"),
                        }
                    }
                });
                if let Err(e) = res {
                    failed += 1;
                    eprintln!("error: {e:#}");
                }
                progress.inc(1);
            }
            progress.finish();
            if failed > 0 {
                eprintln!("{failed} page(s) or file(s) could not be read");
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Cmd::Tokenize { model, chat, think, text } => {
            let tok = ModelDir::open(&model)?.tokenizer()?;
            let ids =
                if chat { tok.chat_prompt(&[Message { role: Role::User, content: text }], think)? } else { tok.encode(&text)? };
            println!("{}", serde_json::to_string(&ids)?);
            Ok(0)
        }
        Cmd::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            prefill_chunk,
            threads,
            seed,
            json,
            stages,
            stage_tokens,
            checkpoint,
            checkpoint_every,
        } => {
            let m = ModelDir::open(&model)?;
            let checkpoint = checkpoint.map(|p| (p, checkpoint_every));
            let opts = deltadoc::bench::BenchOptions {
                prompt_tokens,
                gen_tokens,
                prefill_chunk,
                seed,
                stages,
                stage_tokens,
                checkpoint,
            };
            let r = deltadoc::bench::run(&m, &session_options(threads), &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("model          {} ({}, {} DeltaNet ops)", m.dir.display(), m.manifest.precision_label(), r.linear_attn);
                let arithmetic = if r.bf16_attention { "bf16 arithmetic" } else { "f32 arithmetic" };
                println!("KV cache       {} ({arithmetic})", r.kv_cache);
                println!("threads        {}", r.threads);
                println!("load           {:.2} s", r.load_s);
                println!("warm-up call   {:.2} s", r.warmup_s);
                println!(
                    "prefill        {} tokens, {:.1} tok/s (chunks of {})",
                    r.prompt_tokens, r.prefill_tokens_per_s, r.prefill_chunk
                );
                if r.resumed_from_token > 0 {
                    println!(
                        "resumed        at token {}; rate over tokens {}.. with the earlier runs' time",
                        r.resumed_from_token, r.timed_from_token
                    );
                }
                if r.checkpoint_bytes > 0 {
                    println!("checkpoint     {:.1} MiB on disk", mib(r.checkpoint_bytes as u64));
                }
                println!("first token    {:.3} s", r.ttft_s);
                println!("decode         {} tokens, {:.2} tok/s", r.gen_tokens, r.decode_tokens_per_s);
                println!("KV + state     {:.1} MiB", mib(r.kv_state_bytes));
                println!("peak RSS       {:.1} MiB (plan {:.1} MiB)", mib(r.peak_rss_bytes), mib(r.planned_bytes));
                if let Some(ratio) = r.prefix_reuse_ratio {
                    let stages: Vec<String> = r.stage_s.iter().map(|s| format!("{s:.2}")).collect();
                    println!(
                        "stages         {} s each after one shared prefill; total / one stage = {ratio:.2}",
                        stages.join(", ")
                    );
                    println!("snapshot       {:.1} MiB", mib(r.snapshot_bytes as u64));
                }
            }
            Ok(0)
        }
    }
}

fn model_cmd(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Import { hf_dir, out, export } => {
            let m = model::import(&hf_dir, &out, export.options()?)?;
            eprintln!("wrote {} ({} layers, {})", out.display(), m.config.num_hidden_layers, m.precision_label());
            Ok(())
        }
        ModelCmd::Synth { shape, out, seed, hf_out, text_only, export } => {
            let cfg = shape.config();
            let mut synth = model::synth::Synth::new(seed);
            let vision = (!text_only).then(|| model::vision::VisionConfig::of_shape(shape, cfg.hidden_size));
            let m = model::export(
                &cfg,
                vision.as_ref(),
                &mut synth,
                export.options()?,
                &out,
                format!("synth:{}:seed={seed}", shape.name()),
            )?;
            eprintln!("wrote {} ({} layers, {})", out.display(), m.config.num_hidden_layers, m.precision_label());
            if let Some(hf) = hf_out {
                synth.write_hf(&cfg, &hf)?;
                eprintln!("wrote Hugging Face checkpoint {}", hf.display());
            }
            Ok(())
        }
        ModelCmd::Info { model, verify, context, budget, prefill_chunk } => {
            let m = ModelDir::open(&model)?;
            if verify {
                m.verify()?;
            }
            let c = &m.manifest.config;
            let f = plan::Footprint::of(&m);
            let context = context.unwrap_or(c.max_position_embeddings);
            let p = f.plan(context, prefill_chunk, plan::StateCopy::Kept(context));
            let fit = f.max_context_within(budget.0, c.max_position_embeddings, prefill_chunk, plan::StateCopy::Kept);
            let info = serde_json::json!({
                "plan": p,
                "budget_bytes": budget.0,
                "fits_budget": p.total_bytes <= budget.0,
                "max_context_within_budget": fit,
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
        ModelCmd::Logits { model, ids_file: None, messages: Some(messages), image, out, prefill_chunk, threads, .. } => {
            let m = ModelDir::open(&model)?;
            let opts = session_options(threads);
            let mut enc = deltadoc::vision::encoder::VisionEncoder::open(&m, &opts)?;
            let msgs = deltadoc::vision::prompt::read_messages(&messages)?;
            let prompt = deltadoc::vision::prompt::build(&m.tokenizer()?, enc.config(), &msgs, false, &image.options())?;
            let mut dec = Decoder::open(&m, &opts)?;
            let mut rows = Vec::with_capacity(prompt.ids.len());
            let mut progress = Progress::new(prompt.ids.len() as u64, "logits");
            deltadoc::vision::prefill(&mut dec, &mut enc, &prompt, prefill_chunk, Logits::All, |l| {
                progress.inc(l.nrows() as u64);
                rows.extend(l.outer_iter().map(|r| r.to_vec()));
                Ok(())
            })?;
            progress.finish();
            write_npy(&out, &rows)
        }
        ModelCmd::Logits { model, ids_file, out, prefill_chunk, decode_from, threads, .. } => {
            let ids_file = ids_file.context("--ids-file or --messages is required")?;
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

/// `deltadoc status`: queue per pipeline and state, schedules, recent jobs.
fn status_cmd(cfg: &deltadoc::config::Config, recent: usize, json: bool) -> Result<()> {
    let mut l = SqliteLedger::open(&cfg.daemon.state_dir)?;
    let counts = l.counts()?;
    let jobs = l.recent(recent)?;
    let now = jiff::Timestamp::now();
    let mut schedules = Vec::new();
    for p in &cfg.pipelines {
        if let Some(s) = &p.spec.schedule {
            let last = l.last_run(p.name())?;
            let next = deltadoc::schedule::next_fire(s, now).map(|t| t.to_string());
            schedules.push(serde_json::json!({ "pipeline": p.name(), "cron": s.cron.text, "timezone": s.timezone.name,
                "next": next, "last_run": last }));
        }
    }
    if json {
        let c: Vec<_> = counts.iter().map(|(p, s, n)| serde_json::json!({"pipeline": p, "state": s, "jobs": n})).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "counts": c, "schedules": schedules, "recent": jobs }))?
        );
        return Ok(());
    }
    println!("ledger {}", l.path().display());
    if counts.is_empty() {
        println!("no jobs yet");
    }
    for p in &cfg.pipelines {
        let line: Vec<String> = counts.iter().filter(|(q, _, _)| q == p.name()).map(|(_, s, n)| format!("{s} {n}")).collect();
        if !line.is_empty() {
            println!("{:<16} {}", p.name(), line.join(", "));
        }
    }
    for s in &schedules {
        println!("schedule {}", s);
    }
    if !jobs.is_empty() {
        println!("\n{:>6}  {:<12} {:<12} {:>3}  document", "job", "pipeline", "state", "try");
    }
    for j in jobs {
        let detail = match (&j.error, &j.stage) {
            (Some(e), _) if j.state != "done" => format!("  [{}: {}]", e.reason.name(), e.message),
            (_, Some(st)) if j.state == "running" => format!("  [{st}]"),
            _ => j.duplicate_of.map(|d| format!("  [duplicate of job {d}]")).unwrap_or_default(),
        };
        println!("{:>6}  {:<12} {:<12} {:>3}  {}{detail}", j.id, j.pipeline, j.state, j.attempts, j.rel_path.display());
    }
    Ok(())
}
