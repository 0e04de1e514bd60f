#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| deltadoc::fuzz::image_file(data));
