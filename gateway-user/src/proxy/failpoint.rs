//! Debug builds only (the tests' binaries): a request whose path is the value of
//! `GATEWAY_DEBUG_PANIC_PATH` panics in its worker, and with `GATEWAY_DEBUG_PANIC_ACCEPT` set
//! an accept loop panics on its first connection, so that a test can see what a panic does to
//! the real binary (`logging::panic`, `Shared::fatal`); `GATEWAY_DEBUG_START_DELAY_MS` holds
//! `gateway run` that long after it read its config, before it serves (a new binary that
//! starts slowly in an upgrade); with `GATEWAY_DEBUG_NO_RESERVE` set, the accept loops start
//! without their reserve descriptor, as if it had been lost (`admission::reserve`). A release
//! build has none of them.

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

/// Whether `GATEWAY_DEBUG_PANIC_ACCEPT` is set, read once.
static PANIC_ACCEPT: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("GATEWAY_DEBUG_PANIC_ACCEPT").is_some());

/// Panics in the accept loop that took a connection, when `GATEWAY_DEBUG_PANIC_ACCEPT` is set.
pub fn panic_on_accept() {
    if *PANIC_ACCEPT {
        panic!("GATEWAY_DEBUG_PANIC_ACCEPT: a panic in an accept loop a test asked for");
    }
}

/// Whether `GATEWAY_DEBUG_NO_RESERVE` is set.
pub fn no_reserve() -> bool {
    std::env::var_os("GATEWAY_DEBUG_NO_RESERVE").is_some()
}

/// Waits `GATEWAY_DEBUG_START_DELAY_MS`, when set.
pub async fn delay_start() {
    let ms = std::env::var("GATEWAY_DEBUG_START_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    if let Some(ms) = ms {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
