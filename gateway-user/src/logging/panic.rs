//! A panic, as `gateway run` reports it: one `error` line of its own log, through the log's
//! queue, and a count (`gateway_panics_total`).
//!
//! Rust's default panic hook writes to stderr on the panicking thread. tokio catches a
//! panic of a connection's task, and the worker serves on; but with a stalled stderr (see
//! [`super::output`]) the hook's write held the worker, and every connection it had, for as
//! long as stderr did. Its message was also plain text several lines long in a JSON log, which
//! a log pipeline splits into lines that parse as nothing. Nothing counted panics, so none
//! could be alerted on.

use std::{any::Any, sync::LazyLock};

use prometheus_client::metrics::counter::Counter;
use tracing::error;

/// Panics since start, on any thread: the counter `gateway run`'s metrics register
/// (`gateway_panics_total`). It exists before the metrics do.
pub static PANICS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The log's writer thread, where a line logged goes to a write that is not coming (the
/// thread is unwinding): its panic goes to stderr as Rust prints it.
const LOG_THREAD: &str = "log";

/// Reports panics through the log from now on. The default hook stays for the log's own
/// writer thread.
///
/// The hook logs on the panicking thread, which may be inside the log already: tracing's
/// formatter takes its per-thread buffer with `try_borrow_mut` and the queue's `OWN` buffer
/// is only borrowed briefly, so both allow it. The one way it could wait for good is a panic
/// inside a field's `Debug` while the level filter matches a field-value directive, with a
/// level change (`PUT /logging`, SIGHUP) waiting for the filter's lock at that moment.
pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.inc();
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        // The log's writer thread, or a level that leaves errors out (`off`): Rust's own
        // message rather than none.
        if name == LOG_THREAD || !tracing::enabled!(tracing::Level::ERROR) {
            default(info);
            return;
        }
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        // Captured only when asked for: RUST_LIB_BACKTRACE, else RUST_BACKTRACE.
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        error!(
            thread = name,
            location = location.as_deref().unwrap_or("unknown"),
            backtrace = backtrace.as_deref(),
            "panic: {}",
            message(info.payload())
        );
    }));
}

/// What `panic!` was given: a `&str` or a `String` (formatted), else nothing readable.
fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a payload that is not a string)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panics_message_is_its_str_or_string() {
        let s: Box<dyn Any + Send> = Box::new("static");
        assert_eq!(message(&*s), "static");
        let s: Box<dyn Any + Send> = Box::new(format!("formatted {}", 1));
        assert_eq!(message(&*s), "formatted 1");
        let s: Box<dyn Any + Send> = Box::new(7_u32);
        assert_eq!(message(&*s), "(a payload that is not a string)");
    }
}
