#![no_main]
//! See `whereabouts::fuzz::k8s_doctor`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| whereabouts::fuzz::k8s_doctor(data));
