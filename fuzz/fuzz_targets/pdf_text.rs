#![no_main]

// Extraction catches pdf-extract's panics per page (src/extract/pdf.rs), so only a panic that
// escapes is a finding: the hook that aborts on every panic is replaced by a silent one, and an
// escaping panic still aborts where it leaves the fuzz target.
libfuzzer_sys::fuzz_target!(init: std::panic::set_hook(Box::new(|_| {})), |data: &[u8]| deltadoc::fuzz::pdf_text(data));
