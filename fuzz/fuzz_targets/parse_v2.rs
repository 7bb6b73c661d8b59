#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::parse_v2(data));
