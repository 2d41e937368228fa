#![no_main]
//! See `whereabouts::fuzz::request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| whereabouts::fuzz::request(data));
