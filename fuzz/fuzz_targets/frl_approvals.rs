#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tally_protocol::fuzz_entry::frl_approvals(data));
