//! Image files and embedded page images decoded to 8-bit RGB under a pixel cap: the format is
//! sniffed from the bytes, EXIF orientation applied, 16-bit, grayscale, palette, CMYK and alpha
//! images flattened (alpha composited over white, as the reference processor's `convert_rgb`).
//! The cap refuses a decompression bomb from its header, before any pixel is decoded.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

/// Images whose header declares more pixels than this are refused unless the caller allows more.
pub const DEFAULT_MAX_DECODE_PIXELS: u64 = 200_000_000;

/// An image whose declared size is over the decode cap: the document is too large to read, not
/// damaged (the failure is `too_large`).
#[derive(Debug, thiserror::Error)]
#[error(
    "image of {width}×{height} pixels exceeds the decode cap of {cap} pixels (a decompression bomb or an absurd scan); \
     raise max_decode_pixels to read it"
)]
pub struct OverDecodeCap {
    width: u64,
    height: u64,
    cap: u64,
}

/// Refuses an image of `w`×`h` pixels over `cap`, before it is decoded.
pub fn check_decode_size(w: u64, h: u64, cap: u64) -> Result<()> {
    if w.saturating_mul(h) > cap {
        return Err(OverDecodeCap { width: w, height: h, cap }.into());
    }
    Ok(())
}

/// Reads an image file, refusing one of more than `cap` pixels.
pub fn load(path: &Path, cap: u64) -> Result<RgbImage> {
    let reader = ImageReader::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    decode(reader.with_guessed_format().with_context(|| format!("{}: cannot read", path.display()))?, cap)
        .with_context(|| format!("{}: not a readable image", path.display()))
}

/// [`load`] for an image held in memory (a page image taken out of a PDF).
pub fn load_bytes(bytes: &[u8], cap: u64) -> Result<RgbImage> {
    decode(ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?, cap)
}

fn decode<R: BufRead + std::io::Seek>(mut reader: ImageReader<R>, cap: u64) -> Result<RgbImage> {
    let mut limits = Limits::default();
    // Room for the largest allowed image at 16 bits per RGBA channel, plus the decoder's own needs.
    limits.max_alloc = Some(cap.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let format = reader.format().context("unknown image format")?;
    let mut decoder = reader.into_decoder().with_context(|| format!("cannot decode {format:?}"))?;
    let (w, h) = decoder.dimensions();
    check_decode_size(w as u64, h as u64, cap)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
