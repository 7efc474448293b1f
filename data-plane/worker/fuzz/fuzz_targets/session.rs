#![no_main]
// Run with: cargo +nightly fuzz run -s none session (from data-plane/worker).
libfuzzer_sys::fuzz_target!(|data: &[u8]| gatehouse_worker::fuzzing::run(data));
