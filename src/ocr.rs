//! The OCR job: page images (image files, and PDF pages without a usable text layer) read by the
//! Qwen3.5 vision tower and transcribed by the decoder, one page per prompt.
//!
//! A page costs up to `max_pixels / 1024` prompt tokens; larger scans are downscaled under that
//! budget (the reference's `smart_resize`), so a 300-dpi A4 page never becomes a 16K-token prompt.
//! With a tile budget, a page over it is cut into bands along its long side, at the whitest
//! line near each cut (between text lines), and the bands go into the prompt as consecutive
//! images: the vision tower's attention is quadratic in an image's patches, so bands bound its
//! time and memory at the same page resolution.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::RgbImage;

use crate::extract::{self, ExtractLimits, Method, page_image};
use crate::generate::{self, Decoder, GenerateOptions, Logits, Sampling};
use crate::model::ModelDir;
use crate::model::vision::VisionConfig;
use crate::runtime::SessionOptions;
use crate::tokenizer::{STOP_TOKENS, Tokenizer};
use crate::vision::encoder::VisionEncoder;
use crate::vision::preprocess::{self, ImageOptions, Preprocessed};
use crate::vision::prompt::{self, ChatMessage, Part};

/// Image tokens a page may take by default (1,024 pixels each): about 150 dpi on A4.
pub const DEFAULT_PAGE_TOKENS: u64 = 1280;

/// What the job asks of each page.
#[derive(Clone, Debug)]
pub struct OcrOptions {
    /// Pixel budgets of a page image (its `max_pixels` is the page's token budget × 1,024).
    pub image: ImageOptions,
    /// Most image tokens of one band; a page over it is cut into bands. `None`: one image.
    pub tile_tokens: Option<u64>,
    /// Longest transcription per page, in tokens.
    pub max_new_tokens: usize,
    /// Prompt tokens per prefill call.
    pub prefill_chunk: usize,
    /// The instruction after the page image.
    pub instruction: String,
    /// Where to write the images the model reads (PNG per page or band), for inspection.
    pub save_images: Option<PathBuf>,
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

    /// Transcribes one page image (greedy, thinking off); `label` names saved images.
    pub fn read(&mut self, img: &RgbImage, label: &str) -> Result<String> {
        Ok(transcribe(&mut self.dec, &mut self.enc, &self.tok, img, &self.opts, label, &|| Ok(()))?.text)
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
                    let label = format!("{}.p{}", stem(path), page.number);
                    let read = page_image::page_image(&doc, page.number, &self.opts.image)
                        .and_then(|pi| Ok((self.read(&pi.image, &label)?, pi.note)));
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
            let text = preprocess::load_bytes(&bytes, &self.opts.image).and_then(|img| self.read(&img, &stem(path)));
            let t = PageText { page: 1, method: "ocr", text: text.map_err(|e| format!("{e:#}")), note: None };
            on_page(&t);
            out.push(t);
        } else {
            bail!("{}: not an image or a PDF", path.display());
        }
        Ok(out)
    }
}

/// One page's transcription and what it cost.
#[derive(Clone, Debug)]
pub struct Transcription {
    /// The text.
    pub text: String,
    /// Prompt tokens (image tokens included).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
}

/// Transcribes one page image with `dec` and `enc` (greedy, thinking off); `label` names saved
/// images. The decoder is reset first; `check` is polled between prefill chunks and tokens.
pub fn transcribe(
    dec: &mut Decoder,
    enc: &mut VisionEncoder,
    tok: &Tokenizer,
    img: &RgbImage,
    opts: &OcrOptions,
    label: &str,
    check: &dyn Fn() -> Result<()>,
) -> Result<Transcription> {
    let images = tiles(img, enc.config(), &opts.image, opts.tile_tokens)?;
    if let Some(dir) = &opts.save_images {
        save(dir, label, &images, enc.config())?;
    }
    let mut content: Vec<Part> = images.iter().map(|_| Part::Image { path: label.into() }).collect();
    content.push(Part::Text { text: opts.instruction.clone() });
    let messages = [ChatMessage { role: "user".into(), content }];
    let p = prompt::render(tok, enc.config(), &messages, false, images)?;
    dec.reset()?;
    let mut last = Vec::new();
    crate::vision::prefill(dec, enc, &p, opts.prefill_chunk, Logits::Last, |l| {
        last = l.row(0).to_vec();
        check()
    })?;
    let generation = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        prefill_chunk: opts.prefill_chunk,
        sampling: Sampling::default(),
        stop_tokens: STOP_TOKENS.to_vec(),
        checkpoint: None,
    };
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
