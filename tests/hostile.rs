//! Hostile files through the real daemon: memory bombs, generated here, each end in quarantine
//! as `too_large` or `parse` within the extraction caps, and the daemon, which never decodes a
//! document's bytes itself (text and page images come from isolated children), holds none of
//! what they would decode to.

mod common;

use std::io::Write;
use std::time::Duration;

use common::sandbox::{Sandbox, metric, wait_for};

/// A PDF of the given objects (1 is the catalog) with a correct cross-reference table.
fn pdf(objects: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n", i + 1).bytes());
        out.extend(o);
        out.extend(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).bytes());
    for o in offsets {
        out.extend(format!("{o:010} 00000 n \n").bytes());
    }
    out.extend(format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).bytes());
    out
}

fn stream(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut s = format!("<< {dict} /Length {} >>\nstream\n", data.len()).into_bytes();
    s.extend(data);
    s.extend(b"\nendstream");
    s
}

/// A one-page PDF whose page is `contents` with `resources`, plus `extra` objects from 5 on.
fn one_page(resources: &str, contents: &[u8], extra: Vec<Vec<u8>>) -> Vec<u8> {
    let mut objects = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        format!("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << {resources} >> /Contents 4 0 R >>")
            .into_bytes(),
        contents.to_vec(),
    ];
    objects.extend(extra);
    pdf(&objects)
}

/// A page that is one image XObject (`dict`, `data`) drawn over the whole page.
fn image_page(dict: &str, data: &[u8]) -> Vec<u8> {
    let image = stream(&format!("/Type /XObject /Subtype /Image {dict}"), data);
    one_page("/XObject << /Im0 5 0 R >>", &stream("", b"q 612 0 0 792 0 0 cm /Im0 Do Q"), vec![image])
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// A JPEG 2000 codestream whose size segment declares `w`×`h` (one 8-bit component), with one
/// empty tile: enough for a decoder to read the header and plan the image.
fn j2k(w: u32, h: u32) -> Vec<u8> {
    fn segment(marker: u16, body: &[u8]) -> Vec<u8> {
        [&marker.to_be_bytes()[..], &(body.len() as u16 + 2).to_be_bytes(), body].concat()
    }
    let mut siz = vec![0, 0];
    for v in [w, h, 0, 0, w, h, 0, 0] {
        siz.extend(v.to_be_bytes());
    }
    siz.extend([0, 1, 7, 1, 1]);
    let mut out = vec![0xff, 0x4f];
    out.extend(segment(0xff51, &siz));
    out.extend(segment(0xff52, &[0, 0, 0, 1, 0, 5, 4, 4, 0, 1]));
    out.extend(segment(0xff5c, &[0x40; 17]));
    out.extend(segment(0xff90, &[0, 0, 0, 0, 0, 0, 0, 1]));
    out.extend([0xff, 0x93]);
    out.extend([0; 16]);
    out.extend([0xff, 0xd9]);
    out
}

#[test]
fn memory_bombs_end_as_too_large_or_parse_and_the_daemon_never_holds_them() {
    let stages = "stages:
  - {name: transcription, kind: ocr, max_new_tokens: 4, max_page_tokens: 256}
  - {name: summary, kind: summarize, max_new_tokens: 4}
";
    let sb = Sandbox::with_stages("", 8192, stages);
    // An extraction cap under what the Flate bomb inflates to; the default file size limit.
    let cfg = std::fs::read_to_string(sb.path("config/deltadoc.yaml")).unwrap();
    sb.write(
        "config/deltadoc.yaml",
        &cfg.replace("extract_memory: 2GiB", "extract_memory: 768MiB").replace("max_file_bytes: 64MiB", "max_file_bytes: 512MiB"),
    );

    let gray = "/ColorSpace /DeviceGray /BitsPerComponent 8";
    let mut bombs: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "huge-image.pdf",
            image_page(&format!("/Width 100000 /Height 100000 {gray} /Filter /FlateDecode"), &zlib(&[0; 1000])),
            "too_large",
        ),
        (
            "jpeg2000-claims.pdf",
            image_page(&format!("/Width 100 /Height 100 {gray} /Filter /JPXDecode"), &j2k(100_000, 100_000)),
            "too_large",
        ),
        (
            "deep.html",
            format!("<html><body>{}deep{}</body></html>", "<div>".repeat(200_000), "</div>".repeat(200_000)).into_bytes(),
            "parse",
        ),
    ];
    // A content stream of 1 GiB of spaces, 4.5 MB compressed.
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(b"BT /F1 12 Tf 72 720 Td (bomb) Tj ET\n").unwrap();
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..1024 {
        z.write_all(&spaces).unwrap();
    }
    let font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec();
    bombs.push((
        "flate-bomb.pdf",
        one_page("/Font << /F1 5 0 R >>", &stream("/Filter /FlateDecode", &z.finish().unwrap()), vec![font]),
        "too_large",
    ));
    // A JBIG2 stream of the corpus that declares a 100000×100000 page, as an image of 100×100.
    if common::corpus().is_some() {
        let giant = std::fs::read(common::corpus_path().join("malformed/pdfjs__bomb_giant.pdf")).unwrap();
        let at = giant.windows(9).position(|w| w == b"6 0 obj\n<").expect("the bomb's first JBIG2 stream");
        let start = at + giant[at..].windows(7).position(|w| w == b"stream\n").unwrap() + 7;
        let data = &giant[start..start + 40763];
        let dict = "/Width 100 /Height 100 /BitsPerComponent 1 /ImageMask true /Filter /JBIG2Decode";
        bombs.push(("jbig2-claims.pdf", image_page(dict, data), "too_large"));
    }
    for (name, bytes, _) in &bombs {
        std::fs::write(sb.path("inbox").join(name), bytes).unwrap();
    }
    // A 1 GiB text file (sparse: it costs no disk) over the file size limit.
    let big = std::fs::File::create(sb.path("inbox/big.txt")).unwrap();
    big.set_len(1 << 30).unwrap();
    bombs.push(("big.txt", Vec::new(), "too_large"));

    let d = sb.serve();
    let quarantined = wait_for("every bomb in quarantine", Duration::from_secs(600), || {
        let q = common::sandbox::json_files(&sb.path("quarantine/p"));
        (q.len() == bombs.len()).then_some(q)
    });
    for (name, _, reason) in &bombs {
        let (_, e) = quarantined.iter().find(|(p, _)| p.to_string_lossy() == format!("{name}.error.json")).unwrap();
        assert_eq!(e["reason"], *reason, "{name}: {e}");
        assert!(e["message"].as_str().unwrap().contains(name), "{name}: the message names the file: {e}");
        eprintln!("{name}: {} ({})", e["reason"], e["message"]);
    }
    assert!(sb.results().is_empty(), "no bomb has a result");
    // The daemon decoded none of it: the smallest bomb inflates to 1 GiB, the image ones to
    // 10 gigapixels.
    let peak = metric(&d.scrape(), "deltadoc_process_peak_resident_memory_bytes", &[]).unwrap();
    eprintln!("daemon peak RSS {:.0} MiB", peak / (1 << 20) as f64);
    assert!(peak < (1u64 << 30) as f64, "daemon peak RSS {peak} bytes");
    d.stop();
}
