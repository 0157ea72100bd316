//! How many requests an upstream lets one HTTP/2 connection carry, learned from how its
//! connections end.
//!
//! An upstream may end each connection with a GOAWAY after a fixed number of requests (nginx's
//! `keepalive_requests`, 1,000 by default; some set it far lower). When that number is below
//! `max_concurrent_streams`, every connection refuses the streams above it, and their retries
//! pile onto the connections made for them: with a limit of 10 and 64 streams allowed, the
//! gateway held about 1,000 connections to one nginx for 128 requests in flight, and nginx,
//! out of `worker_connections`, closed new ones before their first request
//! (`proxy_http2_upstream`). So each endpoint learns the number: a connection whose streams
//! the upstream refused with a graceful GOAWAY (NO_ERROR) processed `started − refused`; when
//! two such connections ending within [`PAIR_WITHIN`] of each other processed the same number,
//! at least [`LEAST`], later connections carry at most that many requests each and are then
//! retired, so that the upstream refuses none, and requests wait for a connection being made
//! only as many as it will carry.
//!
//! A graceful restart also ends connections with refused streams, after however many requests
//! each happened to carry. Two in a row agreeing by chance would make connections shorter than
//! needed (more handshakes, never a failed request) until the limit is forgotten, after
//! [`FORGET_AFTER`]; that is also how a limit the upstream raised is noticed. Relearning costs
//! a round of refused streams, which are retried (`decide::retry`, rule 6). Each limit learned
//! is logged.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use tracing::info;

/// How long a learned limit holds.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Two connections' counts pair only when they ended this close together.
pub const PAIR_WITHIN: Duration = Duration::from_secs(60);
/// The smallest limit learned: a connection per request is never inferred.
pub const LEAST: usize = 2;

/// One endpoint's learned limit of requests per HTTP/2 connection.
pub(crate) struct StreamLifetime {
    endpoint: SocketAddr,
    /// Requests per connection; 0 while none is known.
    limit: AtomicUsize,
    /// When `limit` is forgotten, in the caller's milliseconds.
    until_ms: AtomicU64,
    /// What the last connection that ended with refused streams processed (0: none yet), and
    /// when it ended.
    last: AtomicUsize,
    last_ms: AtomicU64,
}

impl StreamLifetime {
    pub fn new(endpoint: SocketAddr) -> StreamLifetime {
        StreamLifetime {
            endpoint,
            limit: AtomicUsize::new(0),
            until_ms: AtomicU64::new(0),
            last: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Requests one connection may carry: `usize::MAX` while no limit is known. `now_ms` is
    /// read only when one is.
    pub fn limit(&self, now_ms: impl FnOnce() -> u64) -> usize {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return usize::MAX;
        }
        if now_ms() >= self.until_ms.load(Ordering::Relaxed) {
            self.limit.store(0, Ordering::Relaxed);
            self.last.store(0, Ordering::Relaxed);
            return usize::MAX;
        }
        limit
    }

    /// The limit in force, for `/status` and the metrics: `None` while none is known.
    pub fn known(&self, now_ms: impl FnOnce() -> u64) -> Option<usize> {
        Some(self.limit(now_ms)).filter(|l| *l != usize::MAX)
    }

    /// A connection ended having carried `started` streams, `refused` of which the upstream
    /// refused unprocessed with a graceful GOAWAY.
    pub fn ended(&self, started: usize, refused: usize, now_ms: u64) {
        if refused == 0 {
            return;
        }
        let processed = started.saturating_sub(refused);
        if processed < LEAST {
            return;
        }
        let previous = self.last.swap(processed, Ordering::Relaxed);
        let previous_ms = self.last_ms.swap(now_ms, Ordering::Relaxed);
        let paired = previous == processed
            && now_ms.saturating_sub(previous_ms) <= PAIR_WITHIN.as_millis() as u64;
        if !paired || self.limit.load(Ordering::Relaxed) == processed {
            return;
        }
        self.until_ms
            .store(now_ms + FORGET_AFTER.as_millis() as u64, Ordering::Relaxed);
        self.limit.store(processed, Ordering::Relaxed);
        info!(
            upstream = %self.endpoint,
            requests = processed,
            forget_after_s = FORGET_AFTER.as_secs(),
            "upstream ends each HTTP/2 connection after this many requests; a connection now carries at most that many"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifetime() -> StreamLifetime {
        StreamLifetime::new("127.0.0.1:80".parse().unwrap())
    }

    #[test]
    fn two_connections_in_a_row_that_processed_as_many_set_the_limit() {
        let l = lifetime();
        assert_eq!(l.limit(|| 0), usize::MAX);
        // Ended cleanly: says nothing.
        l.ended(64, 0, 0);
        assert_eq!(l.limit(|| 0), usize::MAX);
        l.ended(64, 54, 0);
        assert_eq!(l.limit(|| 0), usize::MAX, "one connection is not a pattern");
        l.ended(40, 30, 10);
        assert_eq!(l.limit(|| 10), 10);
        assert_eq!(l.known(|| 10), Some(10));
        // Forgotten after a while.
        let later = 10 + FORGET_AFTER.as_millis() as u64;
        assert_eq!(l.limit(|| later - 1), 10);
        assert_eq!(l.limit(|| later), usize::MAX);
        assert_eq!(l.limit(|| later), usize::MAX);
        assert_eq!(l.known(|| later), None);
    }

    #[test]
    fn a_restart_that_ends_connections_after_differing_counts_sets_nothing() {
        let l = lifetime();
        l.ended(64, 61, 0);
        l.ended(64, 47, 0);
        l.ended(20, 5, 0);
        assert_eq!(l.limit(|| 0), usize::MAX);
        // Nothing or one request processed (an upstream going away) is not a limit either.
        for _ in 0..3 {
            l.ended(5, 5, 0);
            l.ended(5, 4, 0);
        }
        assert_eq!(l.limit(|| 0), usize::MAX);
        // Two connections that agree, but far apart, are no pattern.
        let apart = PAIR_WITHIN.as_millis() as u64 + 1;
        l.ended(64, 54, 0);
        l.ended(64, 54, apart);
        assert_eq!(l.limit(|| apart), usize::MAX);
        l.ended(64, 54, apart + 1);
        assert_eq!(l.limit(|| apart + 1), 10);
    }
}
