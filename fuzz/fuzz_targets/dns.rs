#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| common_fuzz::dns::run(data));
