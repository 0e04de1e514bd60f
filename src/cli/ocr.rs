//! `deltadoc ocr`: every page of image files and PDFs, image pages read by the vision tower.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{ImageArgs, Outcome};
use crate::extract::isolated::Isolation;
use crate::generate::DEFAULT_PREFILL_CHUNK;
use crate::llm::ort::{OrtModel, RuntimeSettings};
use crate::model::ModelDir;
use crate::ocr::{OcrOptions, PageText, Reader};
use crate::progress::Progress;
use crate::runtime::SessionOptions;
use crate::stage::{DEFAULT_PAGE_TOKENS, OCR_INSTRUCTION};

/// What `deltadoc ocr` takes.
#[derive(Args)]
pub(super) struct OcrArgs {
    /// Model folder (from `model import` or `model synth`).
    #[arg(long)]
    model: PathBuf,
    /// Image files (PNG, JPEG, TIFF, GIF, WebP, BMP) or PDFs.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Prompt tokens a page image may take (1,024 pixels each); larger pages are downscaled.
    #[arg(long, default_value_t = DEFAULT_PAGE_TOKENS)]
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
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// One JSON object per page (file, page, method, text or error) instead of text.
    #[arg(long)]
    json: bool,
}

/// Reads every file; the outcome says whether every page could be read.
pub(super) fn run(a: OcrArgs) -> Result<Outcome> {
    let m = ModelDir::open(&a.model)?;
    // Fail before the first page rather than on every page.
    m.vision()?;
    let opts = OcrOptions {
        image: a.image.options().with_token_budget(a.max_page_tokens),
        tile_tokens: a.tile_tokens,
        save_images: a.save_images,
        max_new_tokens: a.max_new_tokens,
        instruction: OCR_INSTRUCTION.into(),
    };
    let settings = RuntimeSettings::new(a.prefill_chunk);
    let model = OrtModel::open(&m, &SessionOptions::with_threads(a.threads), settings)?;
    let mut reader = Reader::new(model, opts, Isolation::with_defaults()?, a.image.max_decode_pixels);
    let mut failed = 0;
    let mut progress = Progress::new(a.files.len() as u64, "ocr files");
    for f in &a.files {
        let shown = f.display().to_string();
        let res = reader.read_file(f, |p| {
            failed += usize::from(p.text.is_err());
            print_page(&shown, p, a.json);
        });
        if let Err(e) = res {
            failed += 1;
            super::error_line(format_args!("{e:#}"));
        }
        progress.inc(1);
    }
    progress.finish();
    if failed > 0 {
        eprintln!("{failed} page(s) or file(s) could not be read");
        return Ok(Outcome::PartlyFailed);
    }
    Ok(Outcome::Success)
}

fn print_page(file: &str, p: &PageText, json: bool) {
    if json {
        let (text, error) = match &p.text {
            Ok(t) => (Some(t.as_str()), None),
            Err(e) => (None, Some(e.as_str())),
        };
        let line = serde_json::json!({"file": file, "page": p.page, "method": p.method, "text": text,
            "error": error, "note": p.note});
        println!("{line}");
    } else {
        println!("==> {file} page {} ({}) <==", p.page, p.method);
        match &p.text {
            Ok(t) => println!("{t}\n"),
            Err(e) => println!("error: {e}\n"),
        }
    }
}
