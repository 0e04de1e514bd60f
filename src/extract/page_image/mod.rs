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

use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use image::{GrayImage, RgbImage};
use pdf_extract::content::{Content, Operation};
use pdf_extract::{Dictionary, Document, Object, ObjectId, Stream};

use super::image::load_bytes;
use super::nesting::{FormBudget, ancestors, resolve};
use crate::failure::Reason;
use codec::{Space, decode};

mod codec;

/// The page's image and a note when it took more than reading one image.
pub struct PageImage {
    /// The page as an RGB image.
    pub image: RgbImage,
    /// How the page was built when it was not a single image, or which images failed.
    pub note: Option<String>,
}

/// The page images of one document, parsed once for all of its pages: a PDF's pages, or an
/// image file as its only page. Only the isolated child ([`super::isolated::page_child`]) reads
/// pages through it.
pub enum PageImages {
    /// A parsed PDF.
    Pdf(Box<Document>),
    /// The bytes of an image file.
    Image(Vec<u8>),
}

impl PageImages {
    /// The page images of a file's bytes, whose type is `mime` (a PDF is parsed and decrypted
    /// here; any other type is read as an image file).
    pub fn from_bytes(bytes: Vec<u8>, mime: &str) -> Result<Self, (Reason, String)> {
        Ok(if mime == "application/pdf" { Self::Pdf(Box::new(super::pdf::open_document(&bytes)?)) } else { Self::Image(bytes) })
    }

    /// Page `page` (1-based) as an image, refusing images over `cap` pixels.
    pub fn page(&self, page: u32, cap: u64) -> Result<PageImage> {
        match self {
            Self::Pdf(doc) => page_image(doc, page, cap),
            Self::Image(_) if page != 1 => bail!("an image file has one page, not page {page}"),
            Self::Image(bytes) => Ok(PageImage { image: load_bytes(bytes, cap).context("not a readable image")?, note: None }),
        }
    }
}

/// Reads page `page` (1-based) of `doc` as an image.
/// Images (and the composed page) over `cap` pixels are refused or scaled down.
pub fn page_image(doc: &Document, page: u32, cap: u64) -> Result<PageImage> {
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
        match Layer::decode(doc, p, cap) {
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
            let canvas = compose(&layers, media_box(doc, id), cap).with_context(|| format!("page {page}"))?;
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
    let Some(content) = doc.get_page_content(page).ok().and_then(|c| Content::decode(&c).ok()) else { return Vec::new() };
    let mut walk = Walk { doc, budget: FormBudget::per_page(), forms: HashMap::new(), out: Vec::new() };
    walk.run(&content.operations, &page_resources(doc, page), [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], 0);
    walk.out
}

/// A page's content run for the images it draws, through the forms it draws. Each form is
/// decoded once however often it is drawn, and forms that nest too deep or are drawn over and
/// over (a damaged or hostile file) are left out.
struct Walk<'a> {
    doc: &'a Document,
    budget: FormBudget,
    /// Per form: its content's length and operations (`None`: it does not decode).
    forms: HashMap<*const Stream, Option<Rc<(usize, Content)>>>,
    out: Vec<Placed<'a>>,
}

impl<'a> Walk<'a> {
    fn run(&mut self, ops: &[Operation], res: &[&'a Dictionary], start: Matrix, depth: usize) {
        let doc = self.doc;
        let mut stack = Vec::new();
        let (mut ctm, mut fill) = (start, [0u8; 3]);
        let unit = |o: &Object| (number(o).unwrap_or(0.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        for op in ops {
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
                "k" if args.len() == 4 => {
                    fill = Space::Cmyk.rgb(&[unit(&args[0]), unit(&args[1]), unit(&args[2]), unit(&args[3])])
                }
                "Do" => {
                    let Some(name) = args.first().and_then(|o| o.as_name().ok()) else { continue };
                    let Some(s) = find_xobject(doc, res, name) else { continue };
                    if is_subtype(s, b"Image") {
                        self.out.push(Placed { stream: s, ctm, fill });
                    } else if is_subtype(s, b"Form")
                        && let Some(form) = self.form(s)
                        && self.budget.enter(depth + 1, form.0).is_ok()
                    {
                        let form_matrix = s.dict.get(b"Matrix").ok().and_then(|m| m.as_array().ok()).and_then(|a| matrix(a));
                        let m = then(&form_matrix.unwrap_or([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]), &ctm);
                        let own = s.dict.get(b"Resources").ok().and_then(|r| resolve(doc, r).as_dict().ok());
                        let res: Vec<&Dictionary> = own.into_iter().chain(res.iter().copied()).collect();
                        self.run(&form.1.operations, &res, m, depth + 1);
                    }
                }
                _ => {}
            }
        }
    }

    fn form(&mut self, s: &Stream) -> Option<Rc<(usize, Content)>> {
        let decode = || {
            let body = s.decompressed_content().ok()?;
            Some(Rc::new((body.len(), Content::decode(&body).ok()?)))
        };
        self.forms.entry(s).or_insert_with(decode).clone()
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
    ancestors(doc, page).take(32).find_map(|node| node.get(key).ok()).map(|v| resolve(doc, v))
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
    fn decode(doc: &Document, p: &Placed, cap: u64) -> Result<Self> {
        let pixels = decode(doc, p.stream, cap)?;
        let stencil = p.stream.dict.get(b"ImageMask").and_then(Object::as_bool).unwrap_or(false).then_some(p.fill);
        let alpha = match p.stream.dict.get(b"SMask").map(|o| resolve(doc, o)) {
            Ok(Object::Stream(s)) => Some(image::DynamicImage::ImageRgb8(decode(doc, s, cap).context("soft mask")?).to_luma8()),
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
fn compose(layers: &[Layer], page: Option<[f64; 4]>, cap: u64) -> Result<RgbImage> {
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
    let cap = cap as f64;
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
        page_image(doc, 1, crate::extract::image::DEFAULT_MAX_DECODE_PIXELS).unwrap()
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
        let rgb = jpx(include_bytes!("../../../tests/data/jpeg2000/pattern.jp2"), "DeviceRGB");
        let doc = page((48, 40), "48 0 0 40 0 0 cm /Im0 Do", vec![rgb], Dictionary::new());
        let img = read(&doc).image;
        for (x, y, px) in img.enumerate_pixels() {
            assert_eq!(px.0, [(4 * x % 256) as u8, (5 * y % 256) as u8, (x ^ y) as u8], "({x}, {y})");
        }
        let gray = jpx(include_bytes!("../../../tests/data/jpeg2000/pattern_gray.j2k"), "DeviceGray");
        let doc = page((48, 40), "48 0 0 40 0 0 cm /Im0 Do", vec![gray], Dictionary::new());
        for (x, y, px) in read(&doc).image.enumerate_pixels() {
            assert_eq!(px.0, [((3 * x + 7 * y) % 256) as u8; 3], "({x}, {y})");
        }
    }

    #[test]
    fn an_image_behind_flate_is_decoded() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(include_bytes!("../../../tests/data/jpeg2000/pattern_gray.j2k")).unwrap();
        let d = dictionary! { "Type" => "XObject", "Subtype" => "Image", "Width" => 48, "Height" => 40,
        "ColorSpace" => "DeviceGray", "BitsPerComponent" => 8,
        "Filter" => vec![Object::Name(b"FlateDecode".to_vec()), Object::Name(b"JPXDecode".to_vec())] };
        let doc = page((48, 40), "48 0 0 40 0 0 cm /Im0 Do", vec![Stream::new(d, z.finish().unwrap())], Dictionary::new());
        assert_eq!(read(&doc).image.get_pixel(5, 3).0, [36; 3]);
    }
}
