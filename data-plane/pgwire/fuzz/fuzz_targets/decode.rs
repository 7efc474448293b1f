#![no_main]
// Run with: cargo +nightly fuzz run decode (from data-plane/pgwire).
libfuzzer_sys::fuzz_target!(|data: &[u8]| gatehouse_pgwire::fuzz_input(data));
