//! Build plumbing only (no code): see `Cargo.toml`. `tally-kernels` depends
//! on this crate, so every package selection that builds burn also resolves
//! these shared dependencies with the same features.
//!
//! To check or refresh the list: print each selection's resolved features and
//! compare them, e.g.
//! `cargo tree -p tally-sim -e normal,build -f '{p}|{f}' --prefix none`
//! against `cargo tree --workspace -e normal,build,dev -f '{p}|{f}' --prefix none`;
//! any third-party package listed with different features belongs here.
