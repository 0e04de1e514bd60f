//! Image preprocessing exactly as the reference processor (docs/model.md, "Vision tower and
//! image preprocessing"): resize a decoded image (crate::extract::image) to a multiple of 32
//! within the pixel budget (`smart_resize`), normalise with mean = std = 0.5 and cut
//! into 16×16 patches in 2×2-block order, each still image duplicated to the temporal patch of 2.
//!
//! The one deliberate difference is the resampler: the reference uses torchvision's antialiased
//! bicubic on uint8 (intermediate rows rounded to uint8); deltadoc uses the `image` crate's
//! Catmull-Rom (the same a = −0.5 cubic, antialiased when shrinking, one rounding at the end).
//! onnx/README.md gives the measured pixel difference and its effect on the vision features.

use std::borrow::Cow;

use anyhow::{Result, bail};
use image::RgbImage;
use image::imageops::FilterType;
use ndarray::Array2;

pub use crate::llm::ImageOptions;
use crate::model::vision::VisionConfig;

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
        // docs/model.md, "Vision tower and image preprocessing", checked against the reference: 224² → 256² (64 tokens);
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
}
