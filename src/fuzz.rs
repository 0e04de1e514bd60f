//! Entry points of the fuzz targets (fuzz/fuzz_targets/, run by `cargo fuzz`, which compiles
//! this module with `--cfg fuzzing`): untrusted bytes through each parser the way the product
//! reads them. Every entry must return for every input; an error is an answer, while a panic
//! that escapes, a hang or an allocation out of proportion to the input is a finding.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::extract::page_image::PageImages;
use crate::extract::{self, ExtractLimits};

/// Pixel cap of the image targets: every seed page fits, and a declared bomb is refused before
/// it costs anything.
const CAP: u64 = 1 << 24;

/// Moves libFuzzer's crash handler onto an alternate signal stack, once. Its handler runs on
/// the thread's own stack, and the fuzz targets do not start through Rust's `main`, which would
/// set up one: a stack overflow then killed the process before the input was saved (a second
/// round of `pdf_text` ended so, with no artifact). On the alternate stack the handler saves
/// the input like any other crash's.
fn save_inputs_that_overflow_the_stack() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        const SIZE: usize = 1 << 20;
        let stack: &'static mut [u8] = Box::leak(vec![0u8; SIZE].into_boxed_slice());
        // SAFETY: the leaked buffer outlives the process's signal handling; sigaction reads and
        // writes back libFuzzer's own SIGSEGV action with one more flag.
        unsafe {
            let ss = libc::stack_t { ss_sp: stack.as_mut_ptr().cast(), ss_flags: 0, ss_size: SIZE };
            libc::sigaltstack(&ss, std::ptr::null_mut());
            let mut act: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut act);
            act.sa_flags |= libc::SA_ONSTACK;
            libc::sigaction(libc::SIGSEGV, &act, std::ptr::null_mut());
        }
    });
}

/// PDF text per page (`deltadoc extract`), damaged-file repair included. pdf-extract's own
/// panics are caught per page there, as they are here.
pub fn pdf_text(data: &[u8]) {
    save_inputs_that_overflow_the_stack();
    let _ = extract::pdf::extract(data, ExtractLimits { max_pages: 64 });
}

/// Page images of a PDF (`deltadoc extract --page N`): placement, composition and every codec.
pub fn pdf_page_images(data: &[u8]) {
    save_inputs_that_overflow_the_stack();
    let Ok(images) = PageImages::from_bytes(data.to_vec(), "application/pdf") else { return };
    for page in 1..=4 {
        let _ = images.page(page, CAP);
    }
}

/// Image files (PNG, JPEG, TIFF, GIF, WebP, BMP) as the ocr stage reads them.
pub fn image_file(data: &[u8]) {
    let _ = extract::image::load_bytes(data, CAP);
}

/// Type detection, text decoding (every encoding path) and HTML to text.
pub fn text(data: &[u8]) {
    let _ = extract::detect_mime(Path::new("fuzz.txt"), data);
    let _ = extract::text::extract(data, "text/plain");
    let _ = extract::text::extract(data, "text/html");
}

/// A pipeline file (`pipelines/*.yaml`), stages and their checks included.
pub fn pipeline_yaml(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!("deltadoc-fuzz-{}", std::process::id()));
    let file = dir.join("p.yaml");
    if std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, data)).is_ok() {
        let _ = crate::config::load_pipeline(&file, Some(&dir));
    }
}

/// The JSON Schema of an `extract` stage: validity, bounds and the constraint's grammar.
pub fn extract_schema(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice(data) {
        let _ = crate::constrain::Schema::new(v);
    }
}

/// A state snapshot or prefill checkpoint read back from disk. The checksum is made to match,
/// so the input reaches the parser behind it, as a file written by someone else would.
pub fn snapshot(data: &[u8]) {
    let mut bytes = data.to_vec();
    bytes.extend_from_slice(&Sha256::digest(data));
    let _ = crate::snapshot::Snapshot::from_bytes(&bytes);
}
