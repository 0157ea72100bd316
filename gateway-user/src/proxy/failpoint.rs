//! Debug builds only (the tests' binaries): a request whose path is the value of
//! `GATEWAY_DEBUG_PANIC_PATH` panics in its worker, so that a test can see what a panic does
//! to the real binary (`logging::panic`). A release build has no such path.

use std::sync::LazyLock;

/// The path, read once.
static PANIC_PATH: LazyLock<Option<String>> =
    LazyLock::new(|| std::env::var("GATEWAY_DEBUG_PANIC_PATH").ok());

/// Panics when `path` is the one asked for.
pub fn panic_on(path: &str) {
    if PANIC_PATH.as_deref() == Some(path) {
        panic!("GATEWAY_DEBUG_PANIC_PATH {path}: a panic a test asked for");
    }
}
