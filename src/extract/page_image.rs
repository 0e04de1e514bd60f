//! The image of a scanned PDF page, taken from the page's image XObjects with lopdf: JPEG
//! (DCTDecode), Flate/LZW with or without PNG/TIFF predictors, uncompressed, and CCITT G3/G4
//! (the `fax` crate). JPEG 2000 and JBIG2 have no maintained pure-Rust decoder here and give an
//! "unsupported image codec" error naming the filter.
//!
//! A scan page usually holds one image covering it; with several, the largest is read (tiled
//! scans are reported in the result's note).

use anyhow::{Context, Result, bail};
use image::{GrayImage, RgbImage};
use pdf_extract::{Dictionary, Document, Object, ObjectId, Stream};

use crate::vision::preprocess::{self, ImageOptions};

/// The page's image and a note when the choice was not obvious.
pub struct PageImage {
    /// The decoded image, RGB.
    pub image: RgbImage,
    /// Set when the page had several images and only the largest was read.
    pub note: Option<String>,
}

/// Reads the largest image drawn on page `page` (1-based) of `doc`.
pub fn page_image(doc: &Document, page: u32, opts: &ImageOptions) -> Result<PageImage> {
    let pages = doc.get_pages();
    let id = *pages.get(&page).with_context(|| format!("page {page} does not exist"))?;
    let mut images = image_xobjects(doc, id);
    if images.is_empty() {
        bail!("page {page} has no image to read");
    }
    images.sort_by_key(|s| std::cmp::Reverse(dim(&s.dict, b"Width") * dim(&s.dict, b"Height")));
    let note = (images.len() > 1).then(|| format!("page {page} has {} images; the largest was read", images.len()));
    let image = decode(doc, images[0], opts).with_context(|| format!("page {page}"))?;
    Ok(PageImage { image, note })
}

/// Image XObjects in the page's resources (own and inherited).
pub fn image_xobjects(doc: &Document, page: ObjectId) -> Vec<&Stream> {
    let Ok((own, inherited)) = doc.get_page_resources(page) else { return Vec::new() };
    let mut dicts: Vec<&Dictionary> = own.into_iter().collect();
    dicts.extend(inherited.iter().filter_map(|id| doc.get_dictionary(*id).ok()));
    let mut out = Vec::new();
    for res in dicts {
        let xobjects = match res.get(b"XObject") {
            Ok(Object::Reference(id)) => doc.get_dictionary(*id).ok(),
            Ok(Object::Dictionary(d)) => Some(d),
            _ => None,
        };
        for (_, v) in xobjects.into_iter().flat_map(|x| x.iter()) {
            let obj = match v {
                Object::Reference(id) => doc.get_object(*id).ok(),
                o => Some(o),
            };
            if let Some(Object::Stream(s)) = obj
                && s.dict.get(b"Subtype").and_then(Object::as_name).is_ok_and(|n| n == b"Image")
            {
                out.push(s);
            }
        }
    }
    out
}

fn dim(d: &Dictionary, key: &[u8]) -> u64 {
    d.get(key).and_then(Object::as_i64).map(|v| v.max(0) as u64).unwrap_or(0)
}

fn resolve<'a>(doc: &'a Document, o: &'a Object) -> &'a Object {
    match o {
        Object::Reference(id) => doc.get_object(*id).unwrap_or(o),
        o => o,
    }
}

/// Colour model of the samples.
enum Space {
    Gray,
    Rgb,
    Cmyk,
    /// Palette of `n`-component base colours.
    Indexed(Box<Space>, Vec<u8>),
}

impl Space {
    fn components(&self) -> usize {
        match self {
            Space::Gray | Space::Indexed(..) => 1,
            Space::Rgb => 3,
            Space::Cmyk => 4,
        }
    }

    fn parse(doc: &Document, o: &Object) -> Result<Self> {
        match resolve(doc, o) {
            Object::Name(n) => match n.as_slice() {
                b"DeviceGray" | b"CalGray" | b"G" => Ok(Space::Gray),
                b"DeviceRGB" | b"CalRGB" | b"RGB" => Ok(Space::Rgb),
                b"DeviceCMYK" | b"CMYK" => Ok(Space::Cmyk),
                other => bail!("unsupported colour space {}", String::from_utf8_lossy(other)),
            },
            Object::Array(a) => {
                let kind = a.first().and_then(|x| x.as_name().ok()).unwrap_or(b"");
                match kind {
                    b"ICCBased" => {
                        let n = a
                            .get(1)
                            .map(|x| resolve(doc, x))
                            .and_then(|s| s.as_stream().ok())
                            .and_then(|s| s.dict.get(b"N").and_then(Object::as_i64).ok())
                            .unwrap_or(3);
                        Ok(match n {
                            1 => Space::Gray,
                            4 => Space::Cmyk,
                            _ => Space::Rgb,
                        })
                    }
                    b"Indexed" | b"I" => {
                        let base = Space::parse(doc, a.get(1).context("Indexed colour space without a base")?)?;
                        let lookup = match a.get(3).map(|x| resolve(doc, x)) {
                            Some(Object::String(s, _)) => s.clone(),
                            Some(Object::Stream(s)) => s.get_plain_content()?,
                            _ => bail!("Indexed colour space without a lookup table"),
                        };
                        Ok(Space::Indexed(Box::new(base), lookup))
                    }
                    b"CalRGB" => Ok(Space::Rgb),
                    b"CalGray" => Ok(Space::Gray),
                    other => bail!("unsupported colour space {}", String::from_utf8_lossy(other)),
                }
            }
            _ => bail!("missing or malformed colour space"),
        }
    }

    /// RGB of one pixel's components (8-bit each).
    fn rgb(&self, c: &[u8]) -> [u8; 3] {
        match self {
            Space::Gray => [c[0]; 3],
            Space::Rgb => [c[0], c[1], c[2]],
            Space::Cmyk => {
                let k = 255 - c[3] as u32;
                let ch = |x: u8| ((255 - x as u32) * k / 255) as u8;
                [ch(c[0]), ch(c[1]), ch(c[2])]
            }
            Space::Indexed(base, table) => {
                let n = base.components();
                let at = c[0] as usize * n;
                match table.get(at..at + n) {
                    Some(entry) => base.rgb(entry),
                    None => [0; 3],
                }
            }
        }
    }
}

fn decode(doc: &Document, s: &Stream, opts: &ImageOptions) -> Result<RgbImage> {
    let (w, h) = (dim(&s.dict, b"Width"), dim(&s.dict, b"Height"));
    if w == 0 || h == 0 {
        bail!("image without a size");
    }
    if w * h > opts.max_decode_pixels {
        bail!("image of {w}×{h} pixels exceeds the decode cap of {} pixels", opts.max_decode_pixels);
    }
    let filters: Vec<Vec<u8>> = s.filters().map(|f| f.into_iter().map(<[u8]>::to_vec).collect()).unwrap_or_default();
    let last = filters.last().map(Vec::as_slice).unwrap_or(b"");
    let invert = s
        .dict
        .get(b"Decode")
        .and_then(Object::as_array)
        .is_ok_and(|a| a.first().and_then(|x| x.as_float().ok()).is_some_and(|v| v > 0.5));
    match last {
        b"DCTDecode" | b"DCT" => {
            if filters.len() > 1 {
                bail!("JPEG behind other filters is not supported");
            }
            preprocess::load_bytes(&s.content, opts).context("embedded JPEG")
        }
        b"CCITTFaxDecode" | b"CCF" => {
            let gray = ccitt(s, w, h)?;
            let mut img = image::DynamicImage::ImageLuma8(gray).to_rgb8();
            if invert {
                image::imageops::invert(&mut img);
            }
            Ok(img)
        }
        b"JPXDecode" => bail!("unsupported image codec: JPEG 2000 (JPXDecode)"),
        b"JBIG2Decode" => bail!("unsupported image codec: JBIG2 (JBIG2Decode)"),
        _ => {
            let raw = s.decompressed_content().map_err(|e| anyhow::anyhow!("image stream: {e}"))?;
            let mask = s.dict.get(b"ImageMask").and_then(Object::as_bool).unwrap_or(false);
            let space = if mask { Space::Gray } else { Space::parse(doc, s.dict.get(b"ColorSpace").unwrap_or(&Object::Null))? };
            let bpc = if mask { 1 } else { dim(&s.dict, b"BitsPerComponent").max(1) as usize };
            let mut img = samples(&raw, w as usize, h as usize, bpc, &space)?;
            // A stencil mask paints its 0 samples; /Decode [1 0] swaps that, like the gray ramp.
            if invert != mask {
                image::imageops::invert(&mut img);
            }
            Ok(img)
        }
    }
}

/// Unpacks rows of `bpc`-bit samples (each row padded to a byte) into RGB.
fn samples(raw: &[u8], w: usize, h: usize, bpc: usize, space: &Space) -> Result<RgbImage> {
    let n = space.components();
    if ![1, 2, 4, 8, 16].contains(&bpc) {
        bail!("unsupported {bpc} bits per component");
    }
    let row_bytes = (w * n * bpc).div_ceil(8);
    if raw.len() < row_bytes * h {
        bail!("image data is truncated ({} bytes for {w}×{h} at {bpc} bits × {n})", raw.len());
    }
    let indexed = matches!(space, Space::Indexed(..));
    let mut img = RgbImage::new(w as u32, h as u32);
    let mut px = vec![0u8; n];
    for y in 0..h {
        let row = &raw[y * row_bytes..(y + 1) * row_bytes];
        for x in 0..w {
            for (c, v) in px.iter_mut().enumerate() {
                let i = x * n + c;
                *v = match bpc {
                    8 => row[i],
                    16 => row[2 * i],
                    _ => {
                        let bit = i * bpc;
                        let s = (row[bit / 8] >> (8 - bpc - bit % 8)) & ((1u8 << bpc) - 1);
                        // Palette indices stay indices; gray levels scale to 0..255.
                        if indexed { s } else { (s as u32 * 255 / ((1u32 << bpc) - 1)) as u8 }
                    }
                };
            }
            img.put_pixel(x as u32, y as u32, image::Rgb(space.rgb(&px)));
        }
    }
    Ok(img)
}

/// CCITT Group 4 (K < 0) or Group 3 one-dimensional (K = 0) data as 8-bit gray.
fn ccitt(s: &Stream, w: u64, h: u64) -> Result<GrayImage> {
    let params = s.dict.get(b"DecodeParms").and_then(Object::as_dict).ok();
    let get = |k: &[u8]| params.and_then(|p| p.get(k).ok());
    let k = get(b"K").and_then(|x| x.as_i64().ok()).unwrap_or(0);
    let columns = get(b"Columns").and_then(|x| x.as_i64().ok()).unwrap_or(w as i64) as u64;
    let black_is_1 = get(b"BlackIs1").and_then(|x| x.as_bool().ok()).unwrap_or(false);
    if columns > u16::MAX as u64 || h > u16::MAX as u64 {
        bail!("CCITT image of {columns}×{h} is too large for the decoder");
    }
    let mut img = GrayImage::new(columns as u32, h as u32);
    let mut y = 0u32;
    let mut line = |transitions: &[u16]| {
        if y < h as u32 {
            for (x, c) in fax::decoder::pels(transitions, columns as u16).enumerate() {
                // The samples are 0 for black unless BlackIs1; the gray ramp (and /Decode) then
                // maps samples to ink, as a PDF viewer does.
                let sample_is_1 = (c == fax::Color::Black) == black_is_1;
                img.put_pixel(x as u32, y, image::Luma([if sample_is_1 { 255 } else { 0 }]));
            }
        }
        y += 1;
    };
    let ok = if k < 0 {
        fax::decoder::decode_g4(s.content.iter().copied(), columns as u16, Some(h as u16), &mut line)
    } else if k == 0 {
        fax::decoder::decode_g3(s.content.iter().copied(), &mut line)
    } else {
        bail!("unsupported image codec: CCITT Group 3 two-dimensional (K = {k})");
    };
    if ok.is_none() && y == 0 {
        bail!("CCITT data could not be decoded");
    }
    Ok(img)
}
