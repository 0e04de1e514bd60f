#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| deltadoc::fuzz::pdf_page_images(data));
