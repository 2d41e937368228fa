#![no_main]
//! See `whereabouts::fuzz::decide`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| whereabouts::fuzz::decide(data));
