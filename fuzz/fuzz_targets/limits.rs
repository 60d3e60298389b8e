#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| common_fuzz::limits::run(data));
