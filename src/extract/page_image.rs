//! The image of a scanned PDF page, rebuilt from the image XObjects its content draws.
//!
//! Codecs: JPEG (DCTDecode), Flate/LZW with or without PNG/TIFF predictors, uncompressed samples,
//! CCITT G3/G4 (the `fax` crate), JBIG2 with its global segments (`hayro-jbig2`) and JPEG 2000
//! (`hayro-jpeg2000`), each also behind leading Flate/LZW/ASCII85 filters.
//!
//! Placement: the page content is walked (`q`/`Q`/`cm`, fill colours, `Do`, form XObjects) to
//! find where each image lands. A page that is one upright image is that image, pixel for pixel;
//! anything else (tiles, strips, a rotated scan, a JBIG2 text mask over a JPEG background, soft
//! masks) is composed onto a white canvas at the resolution of its sharpest image, then turned
//! by the page's `/Rotate`.

use anyhow::{Context, Result, anyhow, bail};
use image::{GrayImage, RgbImage};
use pdf_extract::content::Content;
use pdf_extract::{Dictionary, Document, Object, ObjectId, Stream};

use crate::vision::preprocess::{self, ImageOptions};

/// The page's image and a note when it took more than reading one image.
pub struct PageImage {
    /// The page as an RGB image.
    pub image: RgbImage,
    /// How the page was built when it was not a single image, or which images failed.
    pub note: Option<String>,
}

/// Form XObjects nest; a cycle or absurd depth in a damaged file stops here.
const MAX_FORM_DEPTH: usize = 8;

/// Reads page `page` (1-based) of `doc` as an image.
pub fn page_image(doc: &Document, page: u32, opts: &ImageOptions) -> Result<PageImage> {
    let pages = doc.get_pages();
    let id = *pages.get(&page).with_context(|| format!("page {page} does not exist"))?;
    let mut placed = placements(doc, id);
    if placed.is_empty() {
        // The content could not be parsed or draws no image: fall back to the largest image the
        // page's resources hold, upright.
        let largest = image_xobjects(doc, id).into_iter().max_by_key(|s| dim(&s.dict, b"Width") * dim(&s.dict, b"Height"));
        let Some(s) = largest else { bail!("page {page} has no image to read") };
        let (w, h) = (dim(&s.dict, b"Width") as f64, dim(&s.dict, b"Height") as f64);
        placed.push(Placed { stream: s, ctm: [w, 0.0, 0.0, h, 0.0, 0.0], fill: [0; 3] });
    }
    let mut layers = Vec::new();
    let mut failed = Vec::new();
    for p in &placed {
        match Layer::decode(doc, p, opts) {
            Ok(l) => layers.push(l),
            Err(e) => failed.push(e),
        }
    }
    if layers.is_empty() {
        return Err(failed.remove(0)).with_context(|| format!("page {page}"));
    }
    let mut notes = Vec::new();
    if !failed.is_empty() {
        notes.push(format!("{} of {} images on the page could not be read ({:#})", failed.len(), placed.len(), failed[0]));
    }
    let mut image = match layers.as_slice() {
        [one] if one.is_upright_opaque() => one.pixels.clone(),
        _ => {
            let canvas = compose(&layers, media_box(doc, id), opts)?;
            if layers.len() > 1 {
                notes.push(format!("page composed of {} images", layers.len()));
            }
            canvas
        }
    };
    match rotation(doc, id) {
        90 => image = image::imageops::rotate90(&image),
        180 => image::imageops::rotate180_in_place(&mut image),
        270 => image = image::imageops::rotate270(&image),
        _ => {}
    }
    Ok(PageImage { image, note: (!notes.is_empty()).then(|| format!("page {page}: {}", notes.join("; "))) })
}

/// Image XObjects in the page's resources (own and inherited).
pub fn image_xobjects(doc: &Document, page: ObjectId) -> Vec<&Stream> {
    page_resources(doc, page).into_iter().flat_map(|res| xobjects(doc, res)).filter(|s| is_subtype(s, b"Image")).collect()
}

fn page_resources(doc: &Document, page: ObjectId) -> Vec<&Dictionary> {
    let Ok((own, inherited)) = doc.get_page_resources(page) else { return Vec::new() };
    let mut dicts: Vec<&Dictionary> = own.into_iter().collect();
    dicts.extend(inherited.iter().filter_map(|id| doc.get_dictionary(*id).ok()));
    dicts
}

/// The `/XObject` table of a resource dictionary.
fn xobject_table<'a>(doc: &'a Document, res: &'a Dictionary) -> Option<&'a Dictionary> {
    res.get(b"XObject").map(|o| resolve(doc, o)).and_then(Object::as_dict).ok()
}

/// The XObject streams of one resource dictionary.
fn xobjects<'a>(doc: &'a Document, res: &'a Dictionary) -> impl Iterator<Item = &'a Stream> {
    xobject_table(doc, res).into_iter().flat_map(|t| t.iter()).filter_map(|(_, v)| resolve(doc, v).as_stream().ok())
}

/// The XObject `name` refers to, from the innermost resources that define it.
fn find_xobject<'a>(doc: &'a Document, res: &[&'a Dictionary], name: &[u8]) -> Option<&'a Stream> {
    res.iter().find_map(|r| resolve(doc, xobject_table(doc, r)?.get(name).ok()?).as_stream().ok())
}

fn is_subtype(s: &Stream, kind: &[u8]) -> bool {
    s.dict.get(b"Subtype").and_then(Object::as_name).is_ok_and(|n| n == kind)
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

fn number(o: &Object) -> Option<f64> {
    o.as_float().map(f64::from).ok().or_else(|| o.as_i64().ok().map(|v| v as f64))
}

/// An affine map `[a b c d e f]`: (x, y) ↦ (a·x + c·y + e, b·x + d·y + f), as PDF writes it.
type Matrix = [f64; 6];

/// `m` applied first, then `n`.
fn then(m: &Matrix, n: &Matrix) -> Matrix {
    [
        m[0] * n[0] + m[1] * n[2],
        m[0] * n[1] + m[1] * n[3],
        m[2] * n[0] + m[3] * n[2],
        m[2] * n[1] + m[3] * n[3],
        m[4] * n[0] + m[5] * n[2] + n[4],
        m[4] * n[1] + m[5] * n[3] + n[5],
    ]
}

fn apply(m: &Matrix, x: f64, y: f64) -> (f64, f64) {
    (m[0] * x + m[2] * y + m[4], m[1] * x + m[3] * y + m[5])
}

fn matrix(ops: &[Object]) -> Option<Matrix> {
    let v: Vec<f64> = ops.iter().filter_map(number).collect();
    (v.len() == 6).then(|| [v[0], v[1], v[2], v[3], v[4], v[5]])
}

/// One image drawn by the page: its stream, the map from the unit square to page space and the
/// fill colour a stencil mask paints with.
struct Placed<'a> {
    stream: &'a Stream,
    ctm: Matrix,
    fill: [u8; 3],
}

/// Every image the page's content draws, in painting order.
fn placements(doc: &Document, page: ObjectId) -> Vec<Placed<'_>> {
    let Ok(content) = doc.get_page_content(page) else { return Vec::new() };
    let mut out = Vec::new();
    walk(doc, &content, &page_resources(doc, page), [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], 0, &mut out);
    out
}

fn walk<'a>(doc: &'a Document, content: &[u8], res: &[&'a Dictionary], start: Matrix, depth: usize, out: &mut Vec<Placed<'a>>) {
    let Ok(ops) = Content::decode(content) else { return };
    let mut stack = Vec::new();
    let (mut ctm, mut fill) = (start, [0u8; 3]);
    let unit = |o: &Object| (number(o).unwrap_or(0.0).clamp(0.0, 1.0) * 255.0).round() as u8;
    for op in &ops.operations {
        let args = &op.operands;
        match op.operator.as_str() {
            "q" => stack.push((ctm, fill)),
            "Q" => (ctm, fill) = stack.pop().unwrap_or((ctm, fill)),
            "cm" => {
                if let Some(m) = matrix(args) {
                    ctm = then(&m, &ctm);
                }
            }
            "g" if args.len() == 1 => fill = [unit(&args[0]); 3],
            "rg" if args.len() == 3 => fill = [unit(&args[0]), unit(&args[1]), unit(&args[2])],
            "k" if args.len() == 4 => fill = Space::Cmyk.rgb(&[unit(&args[0]), unit(&args[1]), unit(&args[2]), unit(&args[3])]),
            "Do" => {
                let Some(name) = args.first().and_then(|o| o.as_name().ok()) else { continue };
                let Some(s) = find_xobject(doc, res, name) else { continue };
                if is_subtype(s, b"Image") {
                    out.push(Placed { stream: s, ctm, fill });
                } else if is_subtype(s, b"Form") && depth < MAX_FORM_DEPTH {
                    let form_matrix = s.dict.get(b"Matrix").ok().and_then(|m| m.as_array().ok()).and_then(|a| matrix(a));
                    let m = then(&form_matrix.unwrap_or([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]), &ctm);
                    let own = s.dict.get(b"Resources").ok().and_then(|r| resolve(doc, r).as_dict().ok());
                    let res: Vec<&Dictionary> = own.into_iter().chain(res.iter().copied()).collect();
                    if let Ok(body) = s.decompressed_content() {
                        walk(doc, &body, &res, m, depth + 1, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The page's `/Rotate` (inherited through the page tree), as 0, 90, 180 or 270.
fn rotation(doc: &Document, page: ObjectId) -> i64 {
    inherited(doc, page, b"Rotate").and_then(|o| o.as_i64().ok()).unwrap_or(0).rem_euclid(360)
}

/// The visible area in page space: `/CropBox`, else `/MediaBox` (both inheritable).
fn media_box(doc: &Document, page: ObjectId) -> Option<[f64; 4]> {
    let b = inherited(doc, page, b"CropBox").or_else(|| inherited(doc, page, b"MediaBox"))?;
    let v: Vec<f64> = resolve(doc, b).as_array().ok()?.iter().filter_map(|o| number(resolve(doc, o))).collect();
    (v.len() == 4).then(|| [v[0].min(v[2]), v[1].min(v[3]), v[0].max(v[2]), v[1].max(v[3])])
}

fn inherited<'a>(doc: &'a Document, page: ObjectId, key: &[u8]) -> Option<&'a Object> {
    let mut node = doc.get_dictionary(page).ok()?;
    for _ in 0..32 {
        if let Ok(v) = node.get(key) {
            return Some(resolve(doc, v));
        }
        node = doc.get_dictionary(node.get(b"Parent").ok()?.as_reference().ok()?).ok()?;
    }
    None
}

/// A decoded image with what compositing needs.
struct Layer {
    pixels: RgbImage,
    ctm: Matrix,
    /// Stencil mask: its black samples paint `fill`, the rest leaves the canvas as it is.
    stencil: Option<[u8; 3]>,
    /// Soft mask (`/SMask`), 255 = opaque.
    alpha: Option<GrayImage>,
}

impl Layer {
    fn decode(doc: &Document, p: &Placed, opts: &ImageOptions) -> Result<Self> {
        let pixels = decode(doc, p.stream, opts)?;
        let stencil = p.stream.dict.get(b"ImageMask").and_then(Object::as_bool).unwrap_or(false).then_some(p.fill);
        let alpha = match p.stream.dict.get(b"SMask").map(|o| resolve(doc, o)) {
            Ok(Object::Stream(s)) => Some(image::DynamicImage::ImageRgb8(decode(doc, s, opts).context("soft mask")?).to_luma8()),
            _ => None,
        };
        Ok(Self { pixels, ctm: p.ctm, stencil, alpha })
    }

    /// Drawn upright and unmirrored, fully opaque: the page is exactly this image.
    fn is_upright_opaque(&self) -> bool {
        let m = &self.ctm;
        m[1] == 0.0 && m[2] == 0.0 && m[0] > 0.0 && m[3] > 0.0 && self.stencil.is_none() && self.alpha.is_none()
    }

    /// Page-space bounding box of the drawn unit square.
    fn bounds(&self) -> [f64; 4] {
        let corners = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)].map(|(u, v)| apply(&self.ctm, u, v));
        let xs = corners.map(|c| c.0);
        let ys = corners.map(|c| c.1);
        let (min, max) =
            (|a: [f64; 4]| a.iter().copied().fold(f64::MAX, f64::min), |a: [f64; 4]| a.iter().copied().fold(f64::MIN, f64::max));
        [min(xs), min(ys), max(xs), max(ys)]
    }

    /// Pixels per page unit (geometric mean over both axes).
    fn resolution(&self) -> f64 {
        let det = (self.ctm[0] * self.ctm[3] - self.ctm[1] * self.ctm[2]).abs();
        if det == 0.0 { 0.0 } else { (self.pixels.width() as f64 * self.pixels.height() as f64 / det).sqrt() }
    }
}

/// Paints the layers in order onto white, over the union of their bounds (clipped to the page),
/// at the sharpest layer's resolution under the decode cap. Sampling is nearest-neighbour: the
/// canvas is at least as fine as every layer but the sharpest, which it matches.
fn compose(layers: &[Layer], page: Option<[f64; 4]>, opts: &ImageOptions) -> Result<RgbImage> {
    let mut area =
        layers.iter().map(Layer::bounds).reduce(|a, b| [a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]).unwrap();
    if let Some(p) = page {
        area = [area[0].max(p[0]), area[1].max(p[1]), area[2].min(p[2]), area[3].min(p[3])];
    }
    let (bw, bh) = (area[2] - area[0], area[3] - area[1]);
    let mut scale = layers.iter().map(Layer::resolution).fold(0.0, f64::max);
    if !(bw > 0.0 && bh > 0.0 && scale > 0.0) {
        bail!("the page's images are drawn outside the page or with no area");
    }
    let cap = opts.max_decode_pixels as f64;
    if bw * bh * scale * scale > cap {
        scale = (cap / (bw * bh)).sqrt();
    }
    let (cw, ch) = (((bw * scale).round() as u32).max(1), ((bh * scale).round() as u32).max(1));
    let mut canvas = RgbImage::from_pixel(cw, ch, image::Rgb([255; 3]));
    for l in layers {
        let m = &l.ctm;
        let det = m[0] * m[3] - m[1] * m[2];
        if det == 0.0 {
            continue;
        }
        // Page → unit square: the inverse of the layer's matrix.
        let inv = [
            m[3] / det,
            -m[1] / det,
            -m[2] / det,
            m[0] / det,
            (m[2] * m[5] - m[3] * m[4]) / det,
            (m[1] * m[4] - m[0] * m[5]) / det,
        ];
        let b = l.bounds();
        let x0 = (((b[0] - area[0]) * scale).floor().max(0.0) as u32).min(cw);
        let x1 = (((b[2] - area[0]) * scale).ceil().max(0.0) as u32).min(cw);
        let y0 = (((area[3] - b[3]) * scale).floor().max(0.0) as u32).min(ch);
        let y1 = (((area[3] - b[1]) * scale).ceil().max(0.0) as u32).min(ch);
        let (w, h) = (l.pixels.width() as f64, l.pixels.height() as f64);
        for cy in y0..y1 {
            let y = area[3] - (cy as f64 + 0.5) / scale;
            for cx in x0..x1 {
                let x = area[0] + (cx as f64 + 0.5) / scale;
                let (u, v) = apply(&inv, x, y);
                if !(0.0..1.0).contains(&u) || !(0.0..1.0).contains(&v) {
                    continue;
                }
                // Image row 0 is the top of the unit square (v = 1).
                let (px, py) = ((u * w) as u32, ((1.0 - v) * h) as u32);
                let src = l.pixels.get_pixel(px.min(w as u32 - 1), py.min(h as u32 - 1)).0;
                let dst = canvas.get_pixel_mut(cx, cy);
                match (l.stencil, &l.alpha) {
                    (Some(fill), _) => {
                        if src[0] < 128 {
                            dst.0 = fill;
                        }
                    }
                    (None, Some(alpha)) => {
                        let (aw, ah) = alpha.dimensions();
                        let a = alpha
                            .get_pixel(((u * aw as f64) as u32).min(aw - 1), (((1.0 - v) * ah as f64) as u32).min(ah - 1))
                            .0[0] as u32;
                        for (d, &s) in dst.0.iter_mut().zip(&src) {
                            *d = ((s as u32 * a + *d as u32 * (255 - a) + 127) / 255) as u8;
                        }
                    }
                    (None, None) => dst.0 = src,
                }
            }
        }
    }
    Ok(canvas)
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

fn decode(doc: &Document, s: &Stream, opts: &ImageOptions) -> Result<RgbImage> {
    let (w, h) = (dim(&s.dict, b"Width"), dim(&s.dict, b"Height"));
    if w == 0 || h == 0 {
        bail!("image without a size");
    }
    opts.check_decode_size(w, h)?;
    // /Decode [1 0] (first pair descending) inverts the samples' meaning, for stencil masks too.
    let invert = s
        .dict
        .get(b"Decode")
        .and_then(Object::as_array)
        .is_ok_and(|a| a.first().and_then(|x| x.as_float().ok()).is_some_and(|v| v > 0.5));
    let (filter, data, params) = split_filters(s)?;
    let mut img = match filter.as_slice() {
        b"DCTDecode" | b"DCT" => preprocess::load_bytes(&data, opts).context("embedded JPEG")?,
        b"CCITTFaxDecode" | b"CCF" => gray(ccitt(&data, params, w, h)?),
        b"JBIG2Decode" => gray(jbig2(doc, &data, params).context("JBIG2 image")?),
        b"JPXDecode" => jpx(&data, opts).context("JPEG 2000 image")?,
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
fn jbig2(doc: &Document, data: &[u8], params: Option<&Dictionary>) -> Result<GrayImage> {
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
    let page = hayro_jbig2::Page::new_embedded(data, globals.as_ref(), &settings).map_err(|e| anyhow!("{e}"))?;
    let mut out = Bilevel { img: GrayImage::new(page.width(), page.height()), x: 0, y: 0 };
    page.decode(&mut out).map_err(|e| anyhow!("{e}"))?;
    Ok(out.img)
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
fn jpx(data: &[u8], opts: &ImageOptions) -> Result<RgbImage> {
    let img = hayro_jpeg2000::Image::new(data, &hayro_jpeg2000::DecodeSettings::default()).map_err(|e| anyhow!("{e}"))?;
    let (w, h) = (img.width(), img.height());
    // The codestream's own size, which the stream dictionary need not match.
    opts.check_decode_size(w as u64, h as u64)?;
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
    use pdf_extract::{Stream, dictionary};

    use super::*;

    fn gray_image(w: i64, h: i64, data: Vec<u8>) -> Stream {
        let d = dictionary! { "Type" => "XObject", "Subtype" => "Image", "Width" => w, "Height" => h,
        "ColorSpace" => "DeviceGray", "BitsPerComponent" => 8 };
        Stream::new(d, data)
    }

    /// A one-page document of `size` drawing `content` with the XObjects `images` (named Im0…).
    fn page(size: (i64, i64), content: &str, images: Vec<Stream>, extra: Dictionary) -> Document {
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let mut xobjects = Dictionary::new();
        for (i, s) in images.into_iter().enumerate() {
            xobjects.set(format!("Im{i}"), doc.add_object(s));
        }
        let contents = doc.add_object(Stream::new(Dictionary::new(), content.as_bytes().to_vec()));
        let mut p = dictionary! { "Type" => "Page", "Parent" => pages_id, "Contents" => contents,
        "MediaBox" => vec![0.into(), 0.into(), size.0.into(), size.1.into()],
        "Resources" => dictionary! { "XObject" => xobjects } };
        for (k, v) in extra.into_iter() {
            p.set(k, v);
        }
        let page_id = doc.add_object(p);
        doc.objects.insert(
            pages_id,
            Object::Dictionary(dictionary! { "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1 }),
        );
        let catalog = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
        doc.trailer.set("Root", catalog);
        doc
    }

    fn read(doc: &Document) -> PageImage {
        page_image(doc, 1, &ImageOptions::default()).unwrap()
    }

    fn column(img: &RgbImage) -> Vec<u8> {
        (0..img.height()).map(|y| img.get_pixel(0, y).0[0]).collect()
    }

    #[test]
    fn one_upright_image_is_the_page_pixel_for_pixel() {
        let data: Vec<u8> = (0..12).map(|v| v * 20).collect();
        let doc = page((300, 400), "q 300 0 0 400 0 0 cm /Im0 Do Q", vec![gray_image(3, 4, data.clone())], Dictionary::new());
        let p = read(&doc);
        assert_eq!(p.image.dimensions(), (3, 4));
        assert_eq!(p.image.pixels().map(|px| px.0[0]).collect::<Vec<_>>(), data);
        assert!(p.note.is_none());
    }

    #[test]
    fn tiles_are_composed_where_the_content_draws_them() {
        // Two 10×10 strips of a 100×200 page, the first drawn on top, inside a form XObject.
        let top = gray_image(10, 10, vec![50; 100]);
        let bottom = gray_image(10, 10, vec![200; 100]);
        let doc = page(
            (100, 200),
            "q 100 0 0 100 0 100 cm /Im0 Do Q q 1 0 0 1 0 0 cm 100 0 0 100 0 0 cm /Im1 Do Q",
            vec![top, bottom],
            Dictionary::new(),
        );
        let p = read(&doc);
        assert_eq!(p.image.dimensions(), (10, 20));
        assert_eq!(column(&p.image), [vec![50; 10], vec![200; 10]].concat());
        assert!(p.note.unwrap().contains("composed of 2 images"));
    }

    #[test]
    fn a_rotated_placement_and_the_page_rotation_are_applied() {
        // Left pixel black, right white; drawn turned a quarter counter-clockwise, so the left
        // pixel lands at the bottom.
        let img = || gray_image(2, 1, vec![0, 255]);
        let doc = page((10, 20), "0 20 -10 0 10 0 cm /Im0 Do", vec![img()], Dictionary::new());
        let p = read(&doc);
        assert_eq!(p.image.dimensions(), (1, 2));
        assert_eq!(column(&p.image), [255, 0]);
        // Upright, but the page is shown turned a quarter clockwise: left pixel on top.
        let doc = page((20, 10), "20 0 0 10 0 0 cm /Im0 Do", vec![img()], dictionary! { "Rotate" => 90 });
        assert_eq!(column(&read(&doc).image), [0, 255]);
    }

    #[test]
    fn stencil_masks_paint_the_fill_colour_and_decode_arrays_invert() {
        let background = gray_image(4, 4, vec![200; 16]);
        // 1-bit rows: the first all 0 (painted), the others 1 (left alone).
        let d = dictionary! { "Type" => "XObject", "Subtype" => "Image", "Width" => 4, "Height" => 4, "ImageMask" => true };
        let mask = Stream::new(d, vec![0x00, 0xF0, 0xF0, 0xF0]);
        let doc = page((40, 40), "40 0 0 40 0 0 cm /Im0 Do 0 0 1 rg /Im1 Do", vec![background, mask], Dictionary::new());
        let p = read(&doc);
        assert_eq!(p.image.get_pixel(2, 0).0, [0, 0, 255]);
        assert_eq!(p.image.get_pixel(2, 1).0, [200; 3]);

        let mut inverted = gray_image(2, 1, vec![0, 255]);
        inverted.dict.set("Decode", vec![1.into(), 0.into()]);
        let doc = page((20, 10), "20 0 0 10 0 0 cm /Im0 Do", vec![inverted], Dictionary::new());
        assert_eq!(read(&doc).image.pixels().map(|px| px.0[0]).collect::<Vec<_>>(), [255, 0]);
    }

    /// Lossless JPEG 2000 files made with Pillow (OpenJPEG) from patterns recomputed here.
    #[test]
    fn jpeg2000_images_decode_exactly() {
        let jpx = |bytes: &[u8], space: &str| {
            let d = dictionary! { "Type" => "XObject", "Subtype" => "Image", "Width" => 48, "Height" => 40,
            "ColorSpace" => space, "BitsPerComponent" => 8, "Filter" => "JPXDecode" };
            Stream::new(d, bytes.to_vec())
        };
        let rgb = jpx(include_bytes!("../../tests/data/jpeg2000/pattern.jp2"), "DeviceRGB");
        let doc = page((48, 40), "48 0 0 40 0 0 cm /Im0 Do", vec![rgb], Dictionary::new());
        let img = read(&doc).image;
        for (x, y, px) in img.enumerate_pixels() {
            assert_eq!(px.0, [(4 * x % 256) as u8, (5 * y % 256) as u8, (x ^ y) as u8], "({x}, {y})");
        }
        let gray = jpx(include_bytes!("../../tests/data/jpeg2000/pattern_gray.j2k"), "DeviceGray");
        let doc = page((48, 40), "48 0 0 40 0 0 cm /Im0 Do", vec![gray], Dictionary::new());
        for (x, y, px) in read(&doc).image.enumerate_pixels() {
            assert_eq!(px.0, [((3 * x + 7 * y) % 256) as u8; 3], "({x}, {y})");
        }
    }

    #[test]
    fn an_image_behind_flate_is_decoded() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(include_bytes!("../../tests/data/jpeg2000/pattern_gray.j2k")).unwrap();
        let d = dictionary! { "Type" => "XObject", "Subtype" => "Image", "Width" => 48, "Height" => 40,
        "ColorSpace" => "DeviceGray", "BitsPerComponent" => 8,
        "Filter" => vec![Object::Name(b"FlateDecode".to_vec()), Object::Name(b"JPXDecode".to_vec())] };
        let doc = page((48, 40), "48 0 0 40 0 0 cm /Im0 Do", vec![Stream::new(d, z.finish().unwrap())], Dictionary::new());
        assert_eq!(read(&doc).image.get_pixel(5, 3).0, [36; 3]);
    }
}
