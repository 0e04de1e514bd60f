//! The OCR job: page images (image files, and PDF pages without a usable text layer) read by the
//! Qwen3.5 vision tower and transcribed by the decoder, one page per prompt.
//!
//! A page costs up to `max_pixels / 1024` prompt tokens; larger scans are downscaled under that
//! budget (the reference's `smart_resize`), so a 300-dpi A4 page never becomes a 16K-token prompt.

use std::path::Path;

use anyhow::{Context, Result, bail};
use image::RgbImage;

use crate::extract::{self, ExtractLimits, Method, page_image};
use crate::generate::{self, Decoder, GenerateOptions, Logits, Sampling};
use crate::model::ModelDir;
use crate::runtime::SessionOptions;
use crate::tokenizer::{STOP_TOKENS, Tokenizer};
use crate::vision::encoder::VisionEncoder;
use crate::vision::preprocess::{self, ImageOptions};
use crate::vision::prompt::{self, ChatMessage, Part};

/// What the job asks of each page.
#[derive(Clone, Debug)]
pub struct OcrOptions {
    /// Pixel budgets of a page image.
    pub image: ImageOptions,
    /// Longest transcription per page, in tokens.
    pub max_new_tokens: usize,
    /// Prompt tokens per prefill call.
    pub prefill_chunk: usize,
    /// The instruction after the page image.
    pub instruction: String,
}

/// Text of one page.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PageText {
    /// 1-based page number.
    pub page: u32,
    /// `ocr` (read from the image) or `text_layer` (the PDF's own text was usable).
    pub method: &'static str,
    /// The text, or why the page could not be read.
    pub text: Result<String, String>,
    /// Anything notable (several images on the page, why OCR was needed).
    pub note: Option<String>,
}

/// An open vision + decoder pair.
pub struct Reader {
    dec: Decoder,
    enc: VisionEncoder,
    tok: Tokenizer,
    opts: OcrOptions,
}

impl Reader {
    /// Opens the model folder's graphs; fails when it has no vision graph.
    pub fn open(model: &ModelDir, session: &SessionOptions, opts: OcrOptions) -> Result<Self> {
        let enc = VisionEncoder::open(model, session)?;
        Ok(Self { dec: Decoder::open(model, session)?, enc, tok: model.tokenizer()?, opts })
    }

    /// Transcribes one page image (greedy, thinking off).
    pub fn read(&mut self, img: &RgbImage) -> Result<String> {
        let pre = preprocess::preprocess(img, self.enc.config(), &self.opts.image)?;
        let messages = [ChatMessage {
            role: "user".into(),
            content: vec![Part::Image { path: "page".into() }, Part::Text { text: self.opts.instruction.clone() }],
        }];
        let p = prompt::render(&self.tok, self.enc.config(), &messages, false, vec![pre])?;
        self.dec.reset()?;
        let mut last = Vec::new();
        crate::vision::prefill(&mut self.dec, &mut self.enc, &p, self.opts.prefill_chunk, Logits::Last, |l| {
            last = l.row(0).to_vec();
            Ok(())
        })?;
        let opts = GenerateOptions {
            max_new_tokens: self.opts.max_new_tokens,
            prefill_chunk: self.opts.prefill_chunk,
            sampling: Sampling::default(),
            stop_tokens: STOP_TOKENS.to_vec(),
            checkpoint: None,
        };
        let (tokens, _) = generate::decode(&mut self.dec, last, &opts, None, |_| Ok(()))?;
        Ok(self.tok.decode(&tokens)?.trim().to_string())
    }

    /// Every page of an image file or PDF: image pages transcribed, PDF pages with a usable text
    /// layer given as is. A page that cannot be read gets its reason; the file only fails as a
    /// whole when it cannot be opened at all.
    pub fn read_file(&mut self, path: &Path, mut on_page: impl FnMut(&PageText)) -> Result<Vec<PageText>> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let mime = extract::detect_mime(path, &bytes);
        let mut out = Vec::new();
        if mime == Some("application/pdf") {
            let (doc, ex) = extract::pdf::extract_document(&bytes, ExtractLimits { max_pages: u32::MAX })
                .map_err(|(_, e)| anyhow::anyhow!("{}: {e}", path.display()))?;
            for page in ex.pages {
                let t = if page.method == Method::Ocr {
                    let read = page_image::page_image(&doc, page.number, &self.opts.image)
                        .and_then(|pi| Ok((self.read(&pi.image)?, pi.note)));
                    match read {
                        Ok((text, note)) => {
                            PageText { page: page.number, method: "ocr", text: Ok(text), note: note.or(page.ocr_reason) }
                        }
                        Err(e) => {
                            PageText { page: page.number, method: "ocr", text: Err(format!("{e:#}")), note: page.ocr_reason }
                        }
                    }
                } else {
                    PageText { page: page.number, method: "text_layer", text: Ok(page.text), note: None }
                };
                on_page(&t);
                out.push(t);
            }
        } else if mime.is_some_and(|m| m.starts_with("image/")) || image::guess_format(&bytes).is_ok() {
            let text = preprocess::load_bytes(&bytes, &self.opts.image).and_then(|img| self.read(&img));
            let t = PageText { page: 1, method: "ocr", text: text.map_err(|e| format!("{e:#}")), note: None };
            on_page(&t);
            out.push(t);
        } else {
            bail!("{}: not an image or a PDF", path.display());
        }
        Ok(out)
    }
}
