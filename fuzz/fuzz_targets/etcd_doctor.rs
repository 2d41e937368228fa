#![no_main]
//! See `whereabouts::fuzz::etcd_doctor`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| whereabouts::fuzz::etcd_doctor(data));
