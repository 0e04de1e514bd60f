//! Decoding one image XObject's samples: colour spaces, the filter chain and the codecs
//! (JPEG, Flate/LZW with predictors, raw samples, CCITT, JBIG2, JPEG 2000).

use anyhow::{Context, Result, anyhow, bail};
use image::{GrayImage, RgbImage};
use pdf_extract::{Dictionary, Document, Object, Stream};

use super::{dim, resolve};
use crate::extract::image::{check_decode_size, load_bytes};

/// Colour model of the samples.
pub(super) enum Space {
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

    fn with_components(n: usize) -> Self {
        match n {
            1 => Space::Gray,
            4 => Space::Cmyk,
            _ => Space::Rgb,
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
                        Ok(Space::with_components(n as usize))
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
    pub(super) fn rgb(&self, c: &[u8]) -> [u8; 3] {
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

/// The stream's data with every filter but the last undone, and the last filter's name and
/// parameters (image codecs come last in a filter chain).
fn split_filters(s: &Stream) -> Result<(Vec<u8>, Vec<u8>, Option<&Dictionary>)> {
    let filters: Vec<Vec<u8>> = s.filters().map(|f| f.into_iter().map(<[u8]>::to_vec).collect()).unwrap_or_default();
    let params: Vec<Option<&Dictionary>> = match s.dict.get(b"DecodeParms") {
        Ok(Object::Array(a)) => a.iter().map(|p| p.as_dict().ok()).collect(),
        Ok(Object::Dictionary(d)) => vec![Some(d)],
        _ => Vec::new(),
    };
    let Some((last, leading)) = filters.split_last() else { return Ok((Vec::new(), s.content.clone(), None)) };
    let last_params = params.get(filters.len() - 1).copied().flatten();
    if leading.is_empty() {
        return Ok((last.clone(), s.content.clone(), last_params));
    }
    let mut dict = Dictionary::new();
    dict.set("Filter", Object::Array(leading.iter().map(|f| Object::Name(f.clone())).collect()));
    if let Some(Some(p)) = params.first().filter(|_| leading.len() == 1) {
        dict.set("DecodeParms", Object::Dictionary((*p).clone()));
    }
    let data = Stream::new(dict, s.content.clone()).decompressed_content().map_err(|e| anyhow!("image stream: {e}"))?;
    Ok((last.clone(), data, last_params))
}

pub(super) fn decode(doc: &Document, s: &Stream, cap: u64) -> Result<RgbImage> {
    let (w, h) = (dim(&s.dict, b"Width"), dim(&s.dict, b"Height"));
    if w == 0 || h == 0 {
        bail!("image without a size");
    }
    check_decode_size(w, h, cap)?;
    // /Decode [1 0] (first pair descending) inverts the samples' meaning, for stencil masks too.
    let invert = s
        .dict
        .get(b"Decode")
        .and_then(Object::as_array)
        .is_ok_and(|a| a.first().and_then(|x| x.as_float().ok()).is_some_and(|v| v > 0.5));
    let (filter, data, params) = split_filters(s)?;
    let mut img = match filter.as_slice() {
        b"DCTDecode" | b"DCT" => load_bytes(&data, cap).context("embedded JPEG")?,
        b"CCITTFaxDecode" | b"CCF" => gray(ccitt(&data, params, w, h)?),
        b"JBIG2Decode" => gray(jbig2(doc, &data, params, cap).context("JBIG2 image")?),
        b"JPXDecode" => jpx(&data, cap).context("JPEG 2000 image")?,
        b"" | b"FlateDecode" | b"Fl" | b"LZWDecode" | b"LZW" | b"ASCII85Decode" | b"A85" => {
            let raw = s.decompressed_content().map_err(|e| anyhow!("image stream: {e}"))?;
            let mask = s.dict.get(b"ImageMask").and_then(Object::as_bool).unwrap_or(false);
            let space = if mask { Space::Gray } else { Space::parse(doc, s.dict.get(b"ColorSpace").unwrap_or(&Object::Null))? };
            let bpc = if mask { 1 } else { dim(&s.dict, b"BitsPerComponent").max(1) as usize };
            samples(&raw, w as usize, h as usize, bpc, &space)?
        }
        other => bail!("unsupported image codec: {}", String::from_utf8_lossy(other)),
    };
    if invert {
        image::imageops::invert(&mut img);
    }
    Ok(img)
}

fn gray(g: GrayImage) -> RgbImage {
    image::DynamicImage::ImageLuma8(g).to_rgb8()
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
fn ccitt(data: &[u8], params: Option<&Dictionary>, w: u64, h: u64) -> Result<GrayImage> {
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
        fax::decoder::decode_g4(data.iter().copied(), columns as u16, Some(h as u16), &mut line)
    } else if k == 0 {
        fax::decoder::decode_g3(data.iter().copied(), &mut line)
    } else {
        bail!("unsupported image codec: CCITT Group 3 two-dimensional (K = {k})");
    };
    if ok.is_none() && y == 0 {
        bail!("CCITT data could not be decoded");
    }
    Ok(img)
}

/// An embedded JBIG2 page (with the `/JBIG2Globals` segments it refers to) as 8-bit gray.
/// JBIG2's 1 is black, which PDF's samples write as 0.
fn jbig2(doc: &Document, data: &[u8], params: Option<&Dictionary>, cap: u64) -> Result<GrayImage> {
    let settings = hayro_jbig2::DecodeSettings::default();
    let globals_data = match params.and_then(|p| p.get(b"JBIG2Globals").ok()).map(|o| resolve(doc, o)) {
        Some(Object::Stream(g)) => Some(g.get_plain_content().map_err(|e| anyhow!("JBIG2 globals: {e}"))?),
        _ => None,
    };
    let globals = globals_data
        .as_deref()
        .map(|g| hayro_jbig2::Globals::new(g, &settings))
        .transpose()
        .map_err(|e| anyhow!("JBIG2 globals: {e}"))?;
    // The page's own size, which the stream dictionary need not match, before the decoder
    // plans a bitmap of it.
    if let Some((w, h)) = jbig2_page_size(data) {
        check_decode_size(w, h, cap)?;
    }
    let page = hayro_jbig2::Page::new_embedded(data, globals.as_ref(), &settings).map_err(|e| anyhow!("{e}"))?;
    check_decode_size(page.width() as u64, page.height() as u64, cap)?;
    let mut out = Bilevel { img: GrayImage::new(page.width(), page.height()), x: 0, y: 0 };
    page.decode(&mut out).map_err(|e| anyhow!("{e}"))?;
    Ok(out.img)
}

/// Width and height from the first page information segment (type 48) of an embedded JBIG2
/// stream (ITU-T T.88 7.2: segment headers in sequence, each followed by its data); `None` when
/// the stream does not start that way or the height is left open (striped pages).
fn jbig2_page_size(data: &[u8]) -> Option<(u64, u64)> {
    let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut at = 0;
    // A handful of segments (symbol dictionaries, end of stripe) may come first.
    for _ in 0..64 {
        let number = u32_at(at)?;
        let flags = *data.get(at + 4)?;
        let refs = *data.get(at + 5)?;
        let mut next = at + 6;
        let count = if refs >> 5 == 7 {
            let n = u32_at(at + 5)? & 0x1fff_ffff;
            next = at + 9 + (n as usize + 8) / 8;
            n as usize
        } else {
            (refs >> 5) as usize
        };
        next += count
            * if number <= 256 {
                1
            } else if number <= 65536 {
                2
            } else {
                4
            };
        next += if flags & 0x40 != 0 { 4 } else { 1 };
        let length = u32_at(next)? as usize;
        let body = next + 4;
        if flags & 0x3f == 48 {
            let (w, h) = (u32_at(body)?, u32_at(body + 4)?);
            return (h != u32::MAX).then_some((w as u64, h as u64));
        }
        at = body.checked_add(length)?;
    }
    None
}

/// Receives JBIG2 pixels row by row.
struct Bilevel {
    img: GrayImage,
    x: u32,
    y: u32,
}

impl hayro_jbig2::Decoder for Bilevel {
    fn push_pixel(&mut self, black: bool) {
        if self.x < self.img.width() && self.y < self.img.height() {
            self.img.put_pixel(self.x, self.y, image::Luma([if black { 0 } else { 255 }]));
        }
        self.x += 1;
    }

    fn push_pixel_chunk(&mut self, black: bool, chunk_count: u32) {
        for _ in 0..chunk_count * 8 {
            self.push_pixel(black);
        }
    }

    fn next_line(&mut self) {
        self.x = 0;
        self.y += 1;
    }
}

/// A JPEG 2000 codestream or JP2 file as RGB (palettes resolved, 8 bits per sample).
fn jpx(data: &[u8], cap: u64) -> Result<RgbImage> {
    let img = hayro_jpeg2000::Image::new(data, &hayro_jpeg2000::DecodeSettings::default()).map_err(|e| anyhow!("{e}"))?;
    let (w, h) = (img.width(), img.height());
    // The codestream's own size, which the stream dictionary need not match.
    check_decode_size(w as u64, h as u64, cap)?;
    let colours = img.color_space().num_channels() as usize;
    if ![1, 3, 4].contains(&colours) {
        bail!("unsupported JPEG 2000 colour space with {colours} channels");
    }
    let stride = colours + usize::from(img.has_alpha());
    let mut ctx = hayro_jpeg2000::DecoderContext::default();
    let samples = img.decode(&mut ctx).map_err(|e| anyhow!("{e}"))?.data_u8();
    if samples.len() < w as usize * h as usize * stride {
        bail!("decoded data is shorter than {w}×{h}×{stride}");
    }
    let space = Space::with_components(colours);
    let mut out = RgbImage::new(w, h);
    for (px, s) in out.pixels_mut().zip(samples.chunks_exact(stride)) {
        px.0 = space.rgb(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::jbig2_page_size;

    /// A segment header (number, flags, no referred-to segments, page 1) and its data.
    fn segment(number: u32, kind: u8, data: &[u8]) -> Vec<u8> {
        let mut s = number.to_be_bytes().to_vec();
        s.extend([kind, 0, 1]);
        s.extend((data.len() as u32).to_be_bytes());
        s.extend(data);
        s
    }

    #[test]
    fn the_jbig2_page_size_is_read_before_decoding() {
        let page_info = |w: u32, h: u32| [w.to_be_bytes(), h.to_be_bytes(), [0; 4], [0; 4]].concat();
        let mut stream = segment(0, 0, &[0; 7]);
        stream.extend(segment(1, 48, &page_info(100_000, 100_000)));
        assert_eq!(jbig2_page_size(&stream), Some((100_000, 100_000)));
        assert_eq!(jbig2_page_size(&segment(0, 48, &page_info(10, u32::MAX))), None, "striped: height open");
        assert_eq!(jbig2_page_size(&stream[..12]), None, "cut short");
    }
}
