#![no_main]
//! See `whereabouts::fuzz::pool_keys`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| whereabouts::fuzz::pool_keys(data));
