//! The `deltadoc` command line: the commands (one module per group), the logging set-up, and
//! the one place that prints errors and decides exit codes ([`run`]).

mod bench;
mod daemon;
mod extract;
mod generate;
mod model;
mod ocr;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::extract::image::DEFAULT_MAX_DECODE_PIXELS;
use crate::llm::ImageOptions;

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
    Model(model::ModelCmd),
    /// Generate a reply to a prompt and stream it to stdout.
    Generate(generate::GenerateArgs),
    /// Transcribe image files and scanned PDF pages with the vision model, page by page.
    Ocr(ocr::OcrArgs),
    /// Print the token ids of a text (or of its chat prompt) as JSON.
    Tokenize(generate::TokenizeArgs),
    /// Measure prefill/decode speed, time to first token, peak memory and state size.
    Bench(bench::BenchArgs),
    /// Run the daemon: watch the inboxes, process documents, serve metrics (SIGTERM drains).
    Serve(DaemonArgs),
    /// Process what is in the inboxes now (schedules ignored), then exit.
    Run(daemon::RunArgs),
    /// Process one file through a pipeline and print its result JSON (no ledger).
    Process(daemon::ProcessArgs),
    /// Queue and recent jobs from the ledger.
    Status(daemon::StatusArgs),
    /// Queue failed (quarantined or waiting) jobs again.
    Retry(daemon::RetryArgs),
    /// Configuration commands.
    #[command(subcommand)]
    Config(daemon::ConfigCmd),
    /// The job ledger: schema migrations.
    #[command(subcommand)]
    Ledger(daemon::LedgerCmd),
    /// Extract the text of a file per page (what the pipeline's extract step sees).
    Extract(extract::ExtractArgs),
}

/// The daemon configuration a command reads.
#[derive(Args, Clone)]
struct DaemonArgs {
    /// Daemon configuration (default: config/deltadoc.yaml if present, else built-in defaults).
    #[arg(long, env = "DELTADOC_CONFIG")]
    config: Option<PathBuf>,
}

impl DaemonArgs {
    fn load(&self) -> Result<Config> {
        Config::load(self.config.as_deref())
    }
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
    #[arg(long, default_value_t = DEFAULT_MAX_DECODE_PIXELS)]
    max_decode_pixels: u64,
}

impl ImageArgs {
    fn options(self) -> ImageOptions {
        ImageOptions { min_pixels: self.min_pixels, max_pixels: self.max_pixels }
    }
}

/// How a command that ran ended: its exit code.
pub(crate) enum Outcome {
    /// Everything worked: 0.
    Success,
    /// Some files or pages could not be read, the others were (`ocr`): 1.
    PartlyFailed,
    /// The document failed and its reason was printed (`process`, `extract`): 2.
    DocumentFailed,
}

/// Runs the command line and returns the process's exit code: 0, the `Outcome`'s, or 1 after
/// printing an error that stopped the command.
pub fn run() -> i32 {
    let cli = Cli::parse();
    init_logging(&cli.cmd);
    match dispatch(cli.cmd) {
        Ok(Outcome::Success) => 0,
        Ok(Outcome::PartlyFailed) => 1,
        Ok(Outcome::DocumentFailed) => 2,
        Err(e) => {
            error_line(format_args!("{e:#}"));
            1
        }
    }
}

/// The one form of an error on stderr: the error that stops a command, and a failure that does
/// not (one file of several, one page, a document whose reason the command reports).
fn error_line(msg: impl std::fmt::Display) {
    eprintln!("error: {msg}");
}

/// Logs go to stderr; daemon commands log in the configured format (a broken configuration is
/// reported when the command loads it).
fn init_logging(cmd: &Cmd) {
    let json = match cmd {
        Cmd::Serve(d) | Cmd::Run(daemon::RunArgs { daemon: d, .. }) => {
            d.load().map(|c| c.daemon.log_format == LogFormat::Json).unwrap_or(false)
        }
        _ => false,
    };
    // The object store client says every retry of a request at info; deltadoc's own lines say
    // what matters (a store unreachable, back again, a write held).
    let filter = tracing_subscriber::EnvFilter::try_from_env("DELTADOC_LOG").unwrap_or_else(|_| "info,object_store=warn".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
}

fn dispatch(cmd: Cmd) -> Result<Outcome> {
    match cmd {
        Cmd::Model(m) => model::run(m),
        Cmd::Generate(g) => generate::generate(g),
        Cmd::Tokenize(t) => generate::tokenize(t),
        Cmd::Ocr(o) => ocr::run(o),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Serve(d) => daemon::serve(d),
        Cmd::Run(r) => daemon::run_once(r),
        Cmd::Process(p) => daemon::process(p),
        Cmd::Status(s) => daemon::status(s),
        Cmd::Retry(r) => daemon::retry(r),
        Cmd::Config(c) => daemon::config(c),
        Cmd::Ledger(l) => daemon::ledger(l),
        Cmd::Extract(e) => extract::run(e),
    }
}

/// Bytes as mebibytes, for reports.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
