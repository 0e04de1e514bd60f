//! `deltadoc extract`: the text of a file per page, as the pipeline's extract step sees it; with
//! `--json`, the child side of the daemon's isolated extraction.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::Outcome;
use crate::extract::image::DEFAULT_MAX_DECODE_PIXELS;
use crate::extract::{self, ExtractLimits, isolated};

/// What `deltadoc extract` takes.
#[derive(Args)]
pub(super) struct ExtractArgs {
    /// The document to extract.
    file: PathBuf,
    /// Print the JSON the daemon reads instead of the text.
    #[arg(long)]
    json: bool,
    /// A PDF with more pages is refused as too large.
    #[arg(long, default_value_t = 5000)]
    max_pages: u32,
    /// Compose this page's image instead (the daemon's protocol: a JSON line, then RGB pixels).
    #[arg(long, hide = true)]
    page: Option<u32>,
    /// Images declaring more pixels are refused before decoding (with `--page`).
    #[arg(long, hide = true, default_value_t = DEFAULT_MAX_DECODE_PIXELS)]
    max_decode_pixels: u64,
}

/// Prints the pages, or why the file was refused.
pub(super) fn run(a: ExtractArgs) -> Result<Outcome> {
    let limits = ExtractLimits { max_pages: a.max_pages };
    if let Some(page) = a.page {
        isolated::page_child(&a.file, page, a.max_decode_pixels)?;
        return Ok(Outcome::Success);
    }
    if a.json {
        isolated::child(&a.file, limits)?;
        return Ok(Outcome::Success);
    }
    match extract::extract_file(&a.file, limits) {
        Ok(e) => {
            for w in &e.warnings {
                eprintln!("warning: {w}");
            }
            for p in &e.pages {
                let why = p.ocr_reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default();
                println!("--- page {} ({:?}{why}) ---", p.number, p.method);
                println!("{}", p.text);
            }
            Ok(Outcome::Success)
        }
        Err(f) => {
            super::error_line(f.brief());
            Ok(Outcome::DocumentFailed)
        }
    }
}
