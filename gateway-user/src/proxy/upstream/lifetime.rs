//! How many requests an upstream lets one HTTP/2 connection carry, learned from how its
//! connections end.
//!
//! An upstream may end each connection with a GOAWAY after a fixed number of requests (nginx's
//! `keepalive_requests`, 1,000 by default; some set it far lower). When that number is below
//! `max_concurrent_streams`, every connection refuses the streams above it, and their retries
//! pile onto the connections made for them: with a limit of 10 and 64 streams allowed, the
//! gateway held about 1,000 connections to one nginx for 128 requests in flight, and nginx,
//! out of `worker_connections`, closed new ones before their first request
//! (`proxy_http2_upstream`). So each endpoint learns the number: a connection that ended with
//! streams the upstream never processed (refused by its GOAWAY, or handed back unsent)
//! processed `started − unprocessed`; when two such connections in a row processed the same
//! number, later connections carry at most that many requests each and are then retired, so
//! that the upstream refuses none. A graceful restart also ends connections with refused
//! streams, after however many requests each happened to carry; two in a row agreeing by
//! chance would cost only extra connections, never a failed request. The limit is forgotten
//! after [`FORGET_AFTER`], in case the upstream's setting went up: relearning it costs one
//! round of refused streams, which are retried (`decide::retry`, rule 6).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use tracing::info;

/// How long a learned limit holds.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// One endpoint's learned limit of requests per HTTP/2 connection.
pub(crate) struct StreamLifetime {
    endpoint: SocketAddr,
    /// Requests per connection; 0 while none is known.
    limit: AtomicUsize,
    /// What the last connection that ended with unprocessed streams processed (0: none yet).
    last: AtomicUsize,
    /// When `limit` was learned, in the caller's milliseconds.
    learned_ms: AtomicU64,
}

impl StreamLifetime {
    pub fn new(endpoint: SocketAddr) -> StreamLifetime {
        StreamLifetime {
            endpoint,
            limit: AtomicUsize::new(0),
            last: AtomicUsize::new(0),
            learned_ms: AtomicU64::new(0),
        }
    }

    /// Requests one connection may carry: `usize::MAX` while no limit is known. `now_ms` is
    /// read only when one is.
    pub fn limit(&self, now_ms: impl FnOnce() -> u64) -> usize {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return usize::MAX;
        }
        let age = now_ms().saturating_sub(self.learned_ms.load(Ordering::Relaxed));
        if age >= FORGET_AFTER.as_millis() as u64 {
            self.limit.store(0, Ordering::Relaxed);
            self.last.store(0, Ordering::Relaxed);
            return usize::MAX;
        }
        limit
    }

    /// A connection ended having carried `started` streams, `unprocessed` of which the
    /// upstream never processed.
    pub fn ended(&self, started: usize, unprocessed: usize, now_ms: u64) {
        if unprocessed == 0 {
            return;
        }
        let processed = started.saturating_sub(unprocessed);
        if processed == 0 {
            return;
        }
        if self.last.swap(processed, Ordering::Relaxed) != processed
            || self.limit.load(Ordering::Relaxed) == processed
        {
            return;
        }
        self.learned_ms.store(now_ms, Ordering::Relaxed);
        self.limit.store(processed, Ordering::Relaxed);
        info!(
            upstream = %self.endpoint,
            requests = processed,
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
        // Forgotten after a while.
        let later = 10 + FORGET_AFTER.as_millis() as u64;
        assert_eq!(l.limit(|| later - 1), 10);
        assert_eq!(l.limit(|| later), usize::MAX);
        assert_eq!(l.limit(|| later), usize::MAX);
    }

    #[test]
    fn a_restart_that_ends_connections_after_differing_counts_sets_nothing() {
        let l = lifetime();
        l.ended(64, 61, 0);
        l.ended(64, 47, 0);
        l.ended(20, 5, 0);
        assert_eq!(l.limit(|| 0), usize::MAX);
        // Nothing processed at all (the upstream went away at once) is not a limit either.
        l.ended(5, 5, 0);
        l.ended(5, 5, 0);
        assert_eq!(l.limit(|| 0), usize::MAX);
    }
}
