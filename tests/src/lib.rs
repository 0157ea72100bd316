//! Support for the end-to-end tests lives in `tests/common/mod.rs` and `src/bin/connect-probe.rs`.
