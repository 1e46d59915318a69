#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tally_server::fuzz_entry::state_wal(data));
