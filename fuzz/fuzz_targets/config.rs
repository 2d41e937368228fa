#![no_main]
//! See `whereabouts::fuzz::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| whereabouts::fuzz::config(data));
