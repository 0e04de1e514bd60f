//! `ocr`: pages without a usable text layer (image files, scanned PDF pages) read by the
//! model's vision tower, one page per prompt, before the document is chunked; the text stages
//! then run on the transcription.

use std::sync::Arc;

use serde::Deserialize;

use super::text;
use super::{Body, PageDoc, PageStage, Runner, Stop};
use crate::extract::Method;
use crate::extract::image::DEFAULT_MAX_DECODE_PIXELS;
use crate::failure::{Failure, Reason};
use crate::llm::{ImageOptions, OcrOptions};
use crate::output::StageResult;

/// Built-in instruction of `ocr` stages and of `deltadoc ocr`.
pub const OCR_INSTRUCTION: &str = "Transcribe all text on this page exactly, in reading order.";

/// Image tokens a page may take by default (1,024 pixels each): about 150 dpi on A4.
pub const DEFAULT_PAGE_TOKENS: u64 = 1280;

/// What an `ocr` stage takes in a pipeline file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Image tokens a page may take (1,024 pixels each); bigger scans are downscaled.
    #[serde(default = "default_page_tokens")]
    max_page_tokens: u64,
    /// Cut a page over this many image tokens into bands read as consecutive images.
    #[serde(default)]
    tile_tokens: Option<u64>,
    /// Longest transcription per page, in tokens.
    #[serde(default = "text::default_max_new_tokens")]
    max_new_tokens: usize,
    /// Replaces the built-in instruction (a faithful transcription in reading order).
    #[serde(default)]
    instruction: Option<String>,
}

fn default_page_tokens() -> u64 {
    DEFAULT_PAGE_TOKENS
}

struct Ocr {
    name: String,
    options: OcrOptions,
}

pub(super) fn build(fields: &super::Fields) -> anyhow::Result<Body> {
    let c: Config = fields.parse()?;
    text::check_max_new_tokens(c.max_new_tokens, fields)?;
    // 64 tokens is the smallest image the vision tower takes (the preprocessing minimum).
    if c.max_page_tokens < 64 || c.tile_tokens == Some(0) {
        return Err(fields.error("", "max_page_tokens must be at least 64 and tile_tokens at least 1"));
    }
    let instruction = c.instruction.map(|t| t.trim().to_string()).unwrap_or_else(|| OCR_INSTRUCTION.to_string());
    Ok(Body::Pages(Arc::new(Ocr {
        name: fields.name().to_string(),
        options: OcrOptions {
            image: ImageOptions::default().with_token_budget(c.max_page_tokens),
            tile_tokens: c.tile_tokens,
            max_new_tokens: c.max_new_tokens,
            instruction,
            save_images: None,
        },
    })))
}

impl PageStage for Ocr {
    fn run(&self, runner: &mut Runner, doc: &mut PageDoc) -> Result<StageResult, Stop> {
        runner.step(&self.name);
        let source = doc.source;
        let failed = |n: u32, e: anyhow::Error| {
            Failure::new(Reason::Ocr, self.name.clone(), format!("{}: page {n}: {e:#}", source.display()))
        };
        let mut pages: Vec<_> = doc.pages.iter_mut().filter(|p| p.method == Method::Ocr).collect();
        let mut result = StageResult::default();
        let stem = source.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let mut transcript = Vec::new();
        for page in &mut pages {
            let n = page.number;
            let image = runner
                .in_child(|| doc.extraction.page_image(source, n, DEFAULT_MAX_DECODE_PIXELS))
                .map_err(|f| Failure { stage: self.name.clone(), ..f })?
                .image;
            let read =
                runner.transcribe(&self.name, &image, &format!("{stem}.p{n}"), &self.options)?.map_err(|e| failed(n, e))?;
            result.prompt_tokens += read.prompt_tokens;
            result.generated_tokens += read.generated_tokens;
            result.calls += 1;
            transcript.push(read.text.clone());
            page.text = read.text;
            runner.check(&self.name)?;
        }
        result.output = transcript.join("\n\n").into();
        Ok(result)
    }
}
