#![no_main]
//! See `whereabouts::fuzz::slices`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| whereabouts::fuzz::slices(data));
