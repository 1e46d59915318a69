//! End-to-end tests of Tally live in `tests/e2e.rs` (one integration-test
//! binary): they start the real `tally-server` and `tally-client` binaries
//! over loopback QUIC. This library is intentionally empty.
