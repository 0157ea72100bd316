//! HTTP/2 rapid reset (CVE-2023-44487): a client opens streams and resets each at once. Every
//! stream the gateway accepted has started an upstream request, and a reset before the response
//! costs the client nothing but frames while the upstream does the work, and on HTTP/1
//! upstreams, one connection per reset request: the gateway cannot reuse a connection whose
//! response it abandoned.
//!
//! h2 (under hyper) answers streams reset before the server accepted them with a GOAWAY
//! (`ENHANCE_YOUR_CALM`), by default after 20, but a client that waits for each batch to be
//! accepted before resetting it gets past that: measured with Python's `h2`, 5,000 streams
//! opened in batches of 50 and reset 30 ms later all reached the upstream, on one connection
//! that stayed open. h2's limit is set to this rule's ([`pending_accept_limit`]), and a
//! connection it closes is counted and logged as the rule's are ([`h2_flood`]).
//!
//! So each HTTP/2 client connection counts its streams and those its client reset within a
//! second of their start, before their response was over, and is closed once those are at
//! least half of its first 500 streams, or half of all its streams after that: Envoy's rule for
//! premature resets (`overload.premature_reset_total_stream_count` 500 and
//! `overload.premature_reset_min_stream_lifetime_seconds` 1). A client whose calls are cancelled
//! now and then (gRPC deadlines, a browser leaving a page) stays far below it. Both numbers are
//! `[router.downstream]` settings (`PrematureResets`), as Envoy's are runtime keys, and the
//! first 0 turns the rule off.

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::log_every::LogEvery;
use crate::config::settings::PrematureResets;

/// The warning for a connection closed so, at most once per [`LOG_EVERY`] for the process
/// (with the number not logged): an attacker opens connections by the thousand.
pub(crate) static LOG: LazyLock<LogEvery> = LazyLock::new(|| LogEvery::new(LOG_EVERY));
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// One HTTP/2 client connection's ended streams and premature resets.
#[derive(Default)]
pub(crate) struct Resets {
    rule: PrematureResets,
    ended: AtomicU64,
    premature: AtomicU64,
    tripped: AtomicBool,
}

impl Resets {
    pub fn new(rule: PrematureResets) -> Resets {
        Resets {
            rule,
            ..Resets::default()
        }
    }

    /// A stream ended; `premature`: its client reset it early. Whether the connection is to be
    /// closed now (`true` once).
    pub fn ended(&self, premature: bool) -> bool {
        let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
        if !premature {
            // The share of premature resets only falls: nothing to decide.
            return false;
        }
        let p = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let streams = self.rule.streams;
        streams != 0 && p * 2 >= ended.max(streams) && !self.tripped.swap(true, Ordering::Relaxed)
    }

    /// A stream of the connection whose watchdog `wake` wakes ended; `reset`: its client went
    /// away before its response was over, a premature reset if within the rule's lifetime of
    /// `start`. The watchdog is woken when the connection is to be closed.
    pub fn stream_ended(&self, wake: &Notify, reset: bool, start: Instant) {
        if self.ended(reset && start.elapsed() < self.rule.lifetime) {
            wake.notify_one();
        }
    }

    /// The connection is to be closed.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Relaxed)
    }

    /// Streams ended, and of those, premature resets.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.ended.load(Ordering::Relaxed),
            self.premature.load(Ordering::Relaxed),
        )
    }
}

/// h2's own limit on streams the client reset that wait, at once, for the gateway to accept
/// them: past it, h2 closes the connection (GOAWAY `ENHANCE_YOUR_CALM`). h2 reads all a socket
/// holds before it hands over a stream, so on a busy host a batch's HEADERS and RST_STREAMs
/// come to it together, and its default of 20 closed connections whose rule was off (CI).
/// So the limit is the rule's threshold (half its streams), and with the rule off
/// [`PENDING_PER_CONCURRENT`] times `SETTINGS_MAX_CONCURRENT_STREAMS`; never below h2's 20,
/// nor above the latter: reset streams no longer count as concurrent, and each one waiting is
/// an entry in h2's stream table, which keeps its size (tens of thousands from one read of
/// HEADERS and RST_STREAM pairs, without a limit).
pub fn pending_accept_limit(rule: PrematureResets, max_concurrent_streams: u32) -> usize {
    let cap = usize::try_from(max_concurrent_streams)
        .unwrap_or(usize::MAX)
        .saturating_mul(PENDING_PER_CONCURRENT)
        .max(H2_PENDING_ACCEPT_RESETS);
    if rule.streams == 0 {
        return cap;
    }
    usize::try_from(rule.streams / 2)
        .unwrap_or(usize::MAX)
        .clamp(H2_PENDING_ACCEPT_RESETS, cap)
}

/// h2's default for [`pending_accept_limit`].
const H2_PENDING_ACCEPT_RESETS: usize = 20;
/// Reset streams waiting to be accepted, at most, per stream a client may have open
/// ([`pending_accept_limit`]).
const PENDING_PER_CONCURRENT: usize = 10;

/// Whether a client connection ended with `h` because h2 closed it for a flood (a GOAWAY
/// `ENHANCE_YOUR_CALM` of its own): most often [`pending_accept_limit`] (the classic rapid
/// reset, each RST_STREAM right behind its HEADERS), else too many streams h2 had to reset
/// itself (stream errors, streams refused beyond the concurrency limit), a header block or
/// CONTINUATION flood, or a flood of DATA frames. h2 names which in the GOAWAY's debug data,
/// but the error it returns carries none (seen: `GoAway(b"", ENHANCE_YOUR_CALM, Library)`),
/// so all are counted and logged with the rule's closures, the log saying so.
/// `h`: the HTTP/2 error under the connection's (`classify::h2_cause`).
pub fn h2_flood(h: &h2::Error) -> bool {
    h.is_go_away() && h.is_library() && h.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAMS: u64 = crate::config::model::DEFAULT_HTTP2_PREMATURE_RESET_STREAMS;

    /// Feeds `n` streams, every `every`-th a premature reset; the stream at which it tripped.
    fn trips_at(r: &Resets, n: u64, every: u64) -> Option<u64> {
        (1..=n).find(|i| r.ended(i % every == 0))
    }

    #[test]
    fn the_rule_follows_its_setting_and_0_turns_it_off() {
        let rule = |streams| {
            Resets::new(PrematureResets {
                streams,
                ..PrematureResets::default()
            })
        };
        assert_eq!(trips_at(&rule(5000), 100_000, 1), Some(2500));
        assert_eq!(trips_at(&rule(10), 100_000, 1), Some(5));
        assert_eq!(trips_at(&rule(0), 100_000, 1), None);
    }

    #[test]
    fn h2s_limit_on_resets_before_accept_is_the_rules() {
        let limit = |streams, concurrent| {
            pending_accept_limit(
                PrematureResets {
                    streams,
                    ..PrematureResets::default()
                },
                concurrent,
            )
        };
        assert_eq!(limit(STREAMS, 200), 250);
        assert_eq!(limit(40, 200), 20);
        assert_eq!(limit(10, 200), 20, "not below h2's own");
        assert_eq!(
            limit(0, 200),
            2000,
            "the rule off: ten per concurrent stream"
        );
        assert_eq!(limit(1_000_000, 200), 2000, "nor above that");
        assert_eq!(limit(0, 1), 20);
        assert_eq!(limit(0, u32::MAX), u32::MAX as usize * 10);
    }

    #[test]
    fn half_of_the_first_streams_reset_early_closes_the_connection_once() {
        // Every stream reset: closed at the 250th, half of the first 500.
        let r = Resets::default();
        assert_eq!(trips_at(&r, 10_000, 1), Some(STREAMS / 2));
        assert!(r.tripped());
        assert!(!r.ended(true), "told once");
        // One in two: half of the first 500 are reset at the 500th.
        assert_eq!(trips_at(&Resets::default(), 10_000, 2), Some(STREAMS));
    }

    #[test]
    fn a_client_that_cancels_some_streams_is_never_closed() {
        // One stream in three reset early, over a long connection.
        let r = Resets::default();
        assert_eq!(trips_at(&r, 100_000, 3), None);
        assert!(!r.tripped());
        assert_eq!(r.counts(), (100_000, 33_333));
    }

    #[test]
    fn after_the_first_streams_it_takes_half_of_all_of_them() {
        // 10,000 good streams, then only resets: closed once they are half of all.
        let r = Resets::default();
        for _ in 0..10_000 {
            assert!(!r.ended(false));
        }
        let tripped = (1..=20_000).find(|_| r.ended(true));
        assert_eq!(tripped, Some(10_000));
    }
}
