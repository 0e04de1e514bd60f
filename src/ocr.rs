//! The OCR job: page images (image files, and PDF pages without a usable text layer) read by the
//! Qwen3.5 vision tower and transcribed by the decoder, one page per prompt.
//!
//! A page costs up to `max_pixels / 1024` prompt tokens; larger scans are downscaled under that
//! budget (the reference's `smart_resize`), so a 300-dpi A4 page never becomes a 16K-token prompt.
//! With a tile budget, a page over it is cut into bands along its long side, at the whitest
//! line near each cut (between text lines), and the bands go into the prompt as consecutive
//! images: the vision tower's attention is quadratic in an image's patches, so bands bound its
//! time and memory at the same page resolution.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use image::RgbImage;

use crate::chat::Role;
use crate::extract::Method;
use crate::extract::isolated::{Extraction, Isolation};
use crate::generate::{self, Decoder, Logits};
use crate::llm::{DecodeOptions, Sampling, TextModel};
pub use crate::llm::{OcrOptions, Transcription};
use crate::model::vision::VisionConfig;
use crate::tokenizer::{STOP_TOKENS, Tokenizer};
use crate::vision::encoder::VisionEncoder;
use crate::vision::preprocess::{self, ImageOptions, Preprocessed};
use crate::vision::prompt::{self, ChatMessage, Part};

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

/// Every page of image files and PDFs, read with a model of its own (`deltadoc ocr`). The files
/// are decoded in isolated children, as the daemon decodes them.
pub struct Reader<M> {
    model: M,
    opts: OcrOptions,
    extraction: Extraction,
    /// Images declaring more pixels are refused before decoding.
    max_decode_pixels: u64,
}

impl<M: TextModel> Reader<M> {
    /// Reads pages with `model`, decoding files in children under `isolation`.
    pub fn new(model: M, opts: OcrOptions, isolation: Isolation, max_decode_pixels: u64) -> Self {
        Self { model, opts, extraction: Extraction::Isolated(isolation), max_decode_pixels }
    }

    /// Every page of an image file or PDF: image pages transcribed, PDF pages with a usable text
    /// layer given as is. A page that cannot be read gets its reason; the file only fails as a
    /// whole when it cannot be opened at all.
    pub fn read_file(&mut self, path: &Path, mut on_page: impl FnMut(&PageText)) -> Result<Vec<PageText>> {
        let ex = self.extraction.text(path).map_err(|f| anyhow!(f.brief()))?;
        if ex.mime != "application/pdf" && !ex.mime.starts_with("image/") {
            bail!("{}: not an image or a PDF ({})", path.display(), ex.mime);
        }
        let label = |n: u32| if ex.mime == "application/pdf" { format!("{}.p{n}", stem(path)) } else { stem(path) };
        let mut out = Vec::new();
        for page in ex.pages {
            let n = page.number;
            let t = match page.method {
                Method::Ocr => self.read_page(path, n, &label(n), page.ocr_reason),
                _ => PageText { page: n, method: "text_layer", text: Ok(page.text), note: None },
            };
            on_page(&t);
            out.push(t);
        }
        Ok(out)
    }

    fn read_page(&mut self, path: &Path, n: u32, label: &str, why: Option<String>) -> PageText {
        let read = match self.extraction.page_image(path, n, self.max_decode_pixels) {
            Ok(pi) => self.model.transcribe(&pi.image, label, &self.opts, &|| Ok(())).map(|t| (t.text, pi.note)),
            Err(f) => Err(anyhow!(f.brief())),
        };
        match read {
            Ok((text, note)) => PageText { page: n, method: "ocr", text: Ok(text), note: note.or(why) },
            Err(e) => PageText { page: n, method: "ocr", text: Err(format!("{e:#}")), note: why },
        }
    }
}

/// Transcribes one page image with `dec` and `enc` (greedy, thinking off); `label` names saved
/// images. The decoder is reset first; `check` is polled between prefill chunks and tokens.
#[allow(clippy::too_many_arguments)] // the model's parts, the page, and the call's settings
pub fn transcribe(
    dec: &mut Decoder,
    enc: &mut VisionEncoder,
    tok: &Tokenizer,
    img: &RgbImage,
    opts: &OcrOptions,
    prefill_chunk: usize,
    label: &str,
    check: &dyn Fn() -> Result<()>,
) -> Result<Transcription> {
    let images = tiles(img, enc.config(), &opts.image, opts.tile_tokens)?;
    if let Some(dir) = &opts.save_images {
        save(dir, label, &images, enc.config())?;
    }
    let mut content: Vec<Part> = images.iter().map(|_| Part::Image { path: label.into() }).collect();
    content.push(Part::Text { text: opts.instruction.clone() });
    let messages = [ChatMessage { role: Role::User, content }];
    let p = prompt::render(tok, enc.config(), &messages, false, images)?;
    dec.reset()?;
    let mut last = Vec::new();
    crate::vision::prefill(dec, enc, &p, prefill_chunk, Logits::Last, |l| {
        last = l.row(0).to_vec();
        check()
    })?;
    let generation =
        DecodeOptions { max_new_tokens: opts.max_new_tokens, sampling: Sampling::default(), stop_tokens: STOP_TOKENS.to_vec() };
    let (tokens, _) = generate::decode(dec, last, &generation, None, |_| check())?;
    Ok(Transcription {
        text: tok.decode(&tokens)?.trim().to_string(),
        prompt_tokens: p.ids.len(),
        generated_tokens: tokens.len(),
    })
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "page".into())
}

/// The page as the vision tower's input: one image, or bands of at most `tile_tokens` tokens
/// each, all at the scale `smart_resize` gives the whole page under `opts.max_pixels`.
pub fn tiles(img: &RgbImage, cfg: &VisionConfig, opts: &ImageOptions, tile_tokens: Option<u64>) -> Result<Vec<Preprocessed>> {
    let f = cfg.factor() as u32;
    let page = preprocess::resize(img, cfg, opts)?;
    let (tw, th) = page.dimensions();
    let tall = th >= tw;
    // Tokens along the long side, and in one line across it.
    let (long, across) = if tall { (th / f, tw / f) } else { (tw / f, th / f) };
    let Some(budget) = tile_tokens.filter(|&t| (long * across) as u64 > t) else {
        return Ok(vec![preprocess::patches(&page, img.dimensions(), cfg)]);
    };
    let per_band = (budget / across as u64) as u32;
    if per_band == 0 {
        bail!("a tile budget of {budget} tokens is less than one line of the page ({across} tokens); raise it");
    }
    // Ink along each line across the long side, so cuts fall between text lines.
    let ink: Vec<u64> = (0..long * f)
        .map(|i| {
            (0..across * f)
                .map(|j| {
                    let (x, y) = if tall { (j, i) } else { (i, j) };
                    let p = page.get_pixel(x, y).0;
                    765 - (p[0] as u64 + p[1] as u64 + p[2] as u64)
                })
                .sum()
        })
        .collect();
    let mut out = Vec::new();
    let mut start = 0;
    while start < long {
        let mut end = (start + per_band).min(long);
        if end < long {
            // The whitest token boundary in the last quarter of the band (never past the budget).
            let lo = (start + per_band - per_band / 4).max(start + 1);
            end = (lo..=end).min_by_key(|&e| (ink[(e * f) as usize - 1] + ink[(e * f) as usize], std::cmp::Reverse(e))).unwrap();
        }
        let (x, y, bw, bh) = if tall { (0, start * f, tw, (end - start) * f) } else { (start * f, 0, (end - start) * f, th) };
        let band = image::imageops::crop_imm(&*page, x, y, bw, bh).to_image();
        out.push(preprocess::patches(&band, (bw, bh), cfg));
        start = end;
    }
    Ok(out)
}

/// Writes the images as the model reads them (after resizing), `LABEL.png` or `LABEL.tK.png`.
fn save(dir: &Path, label: &str, images: &[Preprocessed], cfg: &VisionConfig) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (k, img) in images.iter().enumerate() {
        let name = if images.len() == 1 { format!("{label}.png") } else { format!("{label}.t{}.png", k + 1) };
        let path = dir.join(name);
        preprocess::unpatchify(img, cfg).save(&path).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Shape;

    #[test]
    fn long_pages_are_cut_between_lines_under_the_tile_budget() {
        let cfg = VisionConfig::of_shape(Shape::Tiny, 64);
        // A 256×1024 page (8 × 32 tokens) with 20-pixel text lines every 40 pixels.
        let ink = |y: u32| y % 40 < 20;
        let page = RgbImage::from_fn(256, 1024, |_, y| image::Rgb([if ink(y) { 0 } else { 255 }; 3]));
        let opts = ImageOptions::default();
        assert_eq!(tiles(&page, &cfg, &opts, None).unwrap().len(), 1);
        assert_eq!(tiles(&page, &cfg, &opts, Some(256)).unwrap().len(), 1, "fits the budget");
        let bands = tiles(&page, &cfg, &opts, Some(64)).unwrap();
        assert!(bands.len() >= 4, "{} bands", bands.len());
        let mut y = 0;
        let mut rows = Vec::new();
        for b in &bands {
            assert!(b.tokens(cfg.spatial_merge_size) <= 64, "{:?}", b.grid);
            assert_eq!(b.grid[2] * cfg.patch_size, 256);
            if y > 0 {
                // Every cut but the budget-forced ones lands in the white between two lines.
                assert!(!ink(y - 1) || !ink(y), "cut at {y} splits a line");
            }
            let img = preprocess::unpatchify(b, &cfg);
            rows.extend((0..img.height()).map(|r| img.get_pixel(0, r).0[0]));
            y += img.height();
        }
        assert_eq!(rows, (0..1024).map(|y| if ink(y) { 0 } else { 255 }).collect::<Vec<_>>(), "bands rebuild the page");
        assert!(tiles(&page, &cfg, &opts, Some(4)).unwrap_err().to_string().contains("less than one line"));
    }
}
