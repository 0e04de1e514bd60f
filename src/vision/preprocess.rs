//! Image preprocessing exactly as the reference processor (specs/qwen35.md §5, "Image
//! preprocessing"): decode under a pixel cap, apply EXIF orientation, flatten to RGB, resize to a
//! multiple of 32 within the pixel budget (`smart_resize`), normalise with mean = std = 0.5 and cut
//! into 16×16 patches in 2×2-block order, each still image duplicated to the temporal patch of 2.
//!
//! The one deliberate difference is the resampler: the reference uses torchvision's antialiased
//! bicubic on uint8 (intermediate rows rounded to uint8); deltadoc uses the `image` crate's
//! Catmull-Rom (the same a = −0.5 cubic, antialiased when shrinking, one rounding at the end).
//! onnx/README.md gives the measured pixel difference and its effect on the vision features.

use std::borrow::Cow;
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use ndarray::Array2;

use crate::model::vision::VisionConfig;

/// Pixel budgets of the preprocessing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// Images with fewer pixels are enlarged to at least this many (reference: 256²).
    pub min_pixels: u64,
    /// Images with more pixels are shrunk to at most this many; a page costs max_pixels / 1024
    /// prompt tokens at most (reference: 4096², far beyond what a CPU reads in reasonable time).
    pub max_pixels: u64,
    /// Images whose header declares more pixels are refused before decoding (decompression bombs).
    pub max_decode_pixels: u64,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self { min_pixels: 65_536, max_pixels: 16_777_216, max_decode_pixels: 200_000_000 }
    }
}

impl ImageOptions {
    /// Options whose largest image costs at most `tokens` merged tokens (32×32 pixels each).
    pub fn with_token_budget(self, tokens: u64) -> Self {
        Self { max_pixels: (tokens * 1024).max(self.min_pixels), ..self }
    }

    /// Refuses an image of `w`×`h` pixels over the decode cap, before it is decoded.
    pub fn check_decode_size(&self, w: u64, h: u64) -> Result<()> {
        if w.saturating_mul(h) > self.max_decode_pixels {
            bail!(
                "image of {w}×{h} pixels exceeds the decode cap of {} pixels (a decompression bomb or an absurd scan); \
                 raise max_decode_pixels to read it",
                self.max_decode_pixels
            );
        }
        Ok(())
    }
}

/// One image ready for the vision graph.
#[derive(Clone, Debug)]
pub struct Preprocessed {
    /// `[t·gh·gw, C·Tp·P·P]` rows in 2×2-block order, values `(u8 − 127.5) / 127.5`.
    pub pixel_values: Array2<f32>,
    /// Grid in patches: (t, gh, gw).
    pub grid: [usize; 3],
    /// Size of the decoded image (width, height), after EXIF orientation.
    pub original: (u32, u32),
}

impl Preprocessed {
    /// `<|image_pad|>` tokens this image takes in the prompt.
    pub fn tokens(&self, merge: usize) -> usize {
        self.grid[0] * self.grid[1] * self.grid[2] / (merge * merge)
    }
}

/// Reads an image file: the format is sniffed from its bytes; EXIF orientation is applied; 16-bit,
/// grayscale, palette, CMYK and alpha images become 8-bit RGB (alpha composited over white, as
/// the reference's `convert_rgb`).
pub fn load(path: &Path, opts: &ImageOptions) -> Result<RgbImage> {
    let reader = ImageReader::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    decode(reader.with_guessed_format().with_context(|| format!("{}: cannot read", path.display()))?, opts)
        .with_context(|| format!("{}: not a readable image", path.display()))
}

/// [`load`] for an image held in memory (a page image taken out of a PDF).
pub fn load_bytes(bytes: &[u8], opts: &ImageOptions) -> Result<RgbImage> {
    decode(ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?, opts)
}

fn decode<R: BufRead + std::io::Seek>(mut reader: ImageReader<R>, opts: &ImageOptions) -> Result<RgbImage> {
    let mut limits = Limits::default();
    // Room for the largest allowed image at 16 bits per RGBA channel, plus the decoder's own needs.
    limits.max_alloc = Some(opts.max_decode_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let format = reader.format().context("unknown image format")?;
    let mut decoder = reader.into_decoder().with_context(|| format!("cannot decode {format:?}"))?;
    let (w, h) = decoder.dimensions();
    opts.check_decode_size(w as u64, h as u64)?;
    if w == 0 || h == 0 {
        bail!("image has no pixels ({w}×{h})");
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).with_context(|| format!("cannot decode {format:?}"))?;
    img.apply_orientation(orientation);
    Ok(to_rgb(img))
}

fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        // Over white, rounded: the reference composites onto an opaque white background.
        for c in 0..3 {
            o[c] = ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

/// The reference's `smart_resize`: the size (height, width) nearest to the image's that is a
/// multiple of `factor` and holds between `min_pixels` and `max_pixels`, keeping the aspect ratio.
/// Rounding is Python's (half to even).
pub fn smart_resize(height: u32, width: u32, factor: u32, min_pixels: u64, max_pixels: u64) -> Result<(u32, u32)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w).max(1.0) > 200.0 {
        bail!("aspect ratio {width}×{height} is over 200:1; the model reads no such strip");
    }
    let mut hb = ((h / f).round_ties_even() * f).max(f);
    let mut wb = ((w / f).round_ties_even() * f).max(f);
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as u32, wb as u32))
}

/// Resizes, normalises and patchifies one RGB image for the vision tower.
pub fn preprocess(img: &RgbImage, cfg: &VisionConfig, opts: &ImageOptions) -> Result<Preprocessed> {
    Ok(patches(&*resize(img, cfg, opts)?, img.dimensions(), cfg))
}

/// An image already at a size of multiples of patch × merge, patchified; `original` is the size
/// it was resized from.
pub fn patches(img: &RgbImage, original: (u32, u32), cfg: &VisionConfig) -> Preprocessed {
    let (w, h) = img.dimensions();
    Preprocessed {
        pixel_values: patchify(img, cfg),
        grid: [1, h as usize / cfg.patch_size, w as usize / cfg.patch_size],
        original,
    }
}

/// The image at its `smart_resize` size (borrowed when it already has it).
pub fn resize<'a>(img: &'a RgbImage, cfg: &VisionConfig, opts: &ImageOptions) -> Result<Cow<'a, RgbImage>> {
    let (w, h) = img.dimensions();
    let (th, tw) = smart_resize(h, w, cfg.factor() as u32, opts.min_pixels, opts.max_pixels)?;
    Ok(if (tw, th) == (w, h) {
        Cow::Borrowed(img)
    } else {
        Cow::Owned(image::imageops::resize(img, tw, th, FilterType::CatmullRom))
    })
}

/// Top-left pixel of every patch of a `gh`×`gw` grid, in 2×2-block order (block row, block
/// column, row in block, column in block): the row order of `pixel_values`.
fn patch_origins(gh: usize, gw: usize, cfg: &VisionConfig) -> impl Iterator<Item = (usize, usize)> {
    let (p, m) = (cfg.patch_size, cfg.spatial_merge_size);
    (0..gh / m).flat_map(move |br| {
        (0..gw / m).flat_map(move |bc| (0..m).flat_map(move |ir| (0..m).map(move |ic| ((br * m + ir) * p, (bc * m + ic) * p))))
    })
}

/// `pixel_values` of an image whose sides are multiples of patch × merge: rows in block order
/// (block row, block column, row in block, column in block), each row (channel, frame, y, x).
pub fn patchify(img: &RgbImage, cfg: &VisionConfig) -> Array2<f32> {
    let (p, tp) = (cfg.patch_size, cfg.temporal_patch_size);
    let (gh, gw) = (img.height() as usize / p, img.width() as usize / p);
    let per = cfg.patch_values();
    let mut out = Array2::<f32>::zeros((gh * gw, per));
    let raw = img.as_raw();
    let width = img.width() as usize;
    for (row, (y0, x0)) in patch_origins(gh, gw, cfg).enumerate() {
        let mut dst = out.row_mut(row);
        let dst = dst.as_slice_mut().expect("rows of a fresh array are contiguous");
        let mut k = 0;
        for c in 0..3 {
            for _ in 0..tp {
                for y in 0..p {
                    for x in 0..p {
                        let v = raw[((y0 + y) * width + x0 + x) * 3 + c] as f32;
                        // (x − 0.5·255) / (0.5·255) in f32: the reference's fused rescale + normalise.
                        dst[k] = (v - 127.5) / 127.5;
                        k += 1;
                    }
                }
            }
        }
    }
    out
}

/// The image `pixel_values` were made from (first frame), for looking at what the model reads.
pub fn unpatchify(pre: &Preprocessed, cfg: &VisionConfig) -> RgbImage {
    let (p, tp) = (cfg.patch_size, cfg.temporal_patch_size);
    let [_, gh, gw] = pre.grid;
    let mut img = RgbImage::new((gw * p) as u32, (gh * p) as u32);
    for (src, (y0, x0)) in pre.pixel_values.rows().into_iter().zip(patch_origins(gh, gw, cfg)) {
        for c in 0..3 {
            for y in 0..p {
                for x in 0..p {
                    let v = src[c * tp * p * p + y * p + x] * 127.5 + 127.5;
                    img.get_pixel_mut((x0 + x) as u32, (y0 + y) as u32).0[c] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpatchify_inverts_patchify() {
        let cfg = VisionConfig::of_shape(crate::model::config::Shape::Tiny, 64);
        let img = RgbImage::from_fn(64, 96, |x, y| image::Rgb([(x * 3) as u8, (y * 2) as u8, ((x + y) % 256) as u8]));
        let pre = patches(&img, (64, 96), &cfg);
        assert_eq!(pre.grid, [1, 6, 4]);
        assert_eq!(unpatchify(&pre, &cfg), img);
    }

    #[test]
    fn smart_resize_matches_the_reference_examples() {
        // specs/qwen35.md §5, checked against the reference: 224² → 256² (64 tokens);
        // 640×480 → 300 tokens; 1920×1080 → 1920×1088; 4000×6000 → 3328×4992.
        let r = |w, h| smart_resize(h, w, 32, 65_536, 16_777_216).unwrap();
        assert_eq!(r(224, 224), (256, 256));
        let (h, w) = r(640, 480);
        assert_eq!((h / 32) * (w / 32), 300);
        assert_eq!(r(1920, 1080), (1088, 1920));
        assert_eq!(r(4000, 6000), (4992, 3328));
        // Half to even: 48 / 32 = 1.5 → 2, 80 / 32 = 2.5 → 2 (not 3), before the minimum applies.
        assert_eq!(smart_resize(80, 48, 32, 0, u64::MAX).unwrap(), (64, 64));
        assert!(smart_resize(10, 4000, 32, 65_536, 16_777_216).is_err());
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let mut img = image::RgbaImage::new(1, 2);
        img.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(0, 1, image::Rgba([0, 100, 200, 255]));
        let rgb = to_rgb(DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(0, 1).0, [0, 100, 200]);
    }
}
