//! The timers of a connection served by `serve_with` (HTTPS, and plain HTTP/2 with prior
//! knowledge), looked at every [`Quiet::step`]:
//!
//! - a connection that has started no request within the header-read timeout is closed,
//!   unless it sent the whole HTTP/2 preface (hyper has no timer while it waits to tell
//!   HTTP/1 from HTTP/2, nor for the preface of a connection ALPN made HTTP/2);
//! - an HTTP/2 connection with no stream open for `http2_idle_timeout` gets GOAWAY;
//! - an HTTP/2 connection one of whose response streams has waited the write timeout for its
//!   client to take the next frame (`io::Owed`) is closed, as an HTTP/1 connection whose
//!   socket takes no byte for as long is: a client that never opens its flow-control window
//!   would otherwise hold the stream, and the upstream connection behind it, for ever.

use std::{net::SocketAddr, time::Duration};

use tokio::time::Instant;
use tracing::debug;

use super::{H1, H2, UNKNOWN};
use crate::{
    config::Downstream,
    proxy::io::{Activity, Owed},
};

/// The HTTP/2 connection preface's length: a connection that sent less is still in hyper's
/// handshake, which has no timer of its own.
pub(super) const PREFACE_LEN: u64 = 24;

/// What a connection served by [`serve_with`] is to do.
pub(super) enum Stop {
    /// Finish what is open (HTTP/1: the current response, then close; HTTP/2: GOAWAY).
    GoAway,
    /// Close now.
    Close,
}

/// What [`Quiet`] goes by, from `[router.downstream]`.
pub(super) struct Limits {
    header_timeout: Duration,
    idle: Duration,
    write_timeout: Duration,
}

impl Limits {
    pub(super) fn of(ds: &Downstream) -> Limits {
        Limits {
            header_timeout: ds.header_read_timeout,
            idle: ds.http2_idle_timeout,
            write_timeout: ds.write_timeout,
        }
    }
}

/// `serve_with`'s timers: the first request's deadline, then, on HTTP/2, the idle one.
pub(super) struct Quiet {
    first_by: Instant,
    idle_limit: Duration,
    /// When to look next.
    next: Instant,
    /// Requests started when last looked at, and since when none has been open and none
    /// started (`None`: one was open).
    seen: u64,
    quiet_since: Option<Instant>,
    /// The write timeout's [`Owed`] epochs: their length, and when the next one starts.
    epoch: Duration,
    epoch_at: Instant,
}

impl Quiet {
    pub(super) fn new(limits: Limits, speaks: u8) -> Quiet {
        let now = Instant::now();
        let first_by = now + limits.header_timeout;
        let epoch = (limits.write_timeout / (Owed::LAG as u32 - 1)).max(Duration::from_millis(1));
        let mut q = Quiet {
            first_by,
            idle_limit: limits.idle,
            next: first_by,
            seen: 0,
            quiet_since: Some(now),
            epoch,
            epoch_at: now + epoch,
        };
        if speaks == H2 {
            q.next = (now + q.step()).min(first_by);
        }
        q
    }

    /// When to look at the connection next; `None`: never (an HTTP/1 connection that has
    /// started a request: hyper's header-read timer bounds it from then on).
    pub(super) fn next_check(&self, speaks: u8, shutting_down: bool) -> Option<Instant> {
        (!shutting_down && speaks != H1).then_some(self.next)
    }

    /// An eighth of the idle limit, a quarter of the write timeout, at most a second: a
    /// connection is closed at most a quarter of either late.
    fn step(&self) -> Duration {
        (self.idle_limit / 8)
            .min(self.epoch * 8)
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(1))
    }

    /// A timer fired: whether the connection is to stop.
    pub(super) fn check(
        &mut self,
        speaks: u8,
        activity: &Activity,
        peer: SocketAddr,
    ) -> Option<Stop> {
        let now = Instant::now();
        let no_preface = activity.bytes_read() < PREFACE_LEN;
        if activity.requests() == 0 && (speaks == UNKNOWN || no_preface) && now >= self.first_by {
            debug!(client = %peer, "no request within the header-read timeout: closed");
            return Some(Stop::Close);
        }
        if speaks == UNKNOWN {
            return None;
        }
        self.next = now + self.step();
        if activity.requests() == 0 && now < self.first_by {
            self.next = self.next.min(self.first_by);
        }
        if let Some(owed) = activity.owed() {
            while now >= self.epoch_at {
                self.epoch_at += self.epoch;
                if owed.advance() {
                    debug!(client = %peer, "a response stream waited the write timeout for the client to read it: closed");
                    return Some(Stop::Close);
                }
            }
        }
        let requests = activity.requests();
        if requests != self.seen || !activity.between_requests() {
            self.seen = requests;
            self.quiet_since = activity.between_requests().then_some(now);
            return None;
        }
        let since = *self.quiet_since.get_or_insert(now);
        if now.duration_since(since) >= self.idle_limit {
            debug!(client = %peer, "HTTP/2 connection idle: GOAWAY");
            return Some(Stop::GoAway);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_still_waiting_lag_epochs_later_is_reported_and_one_paid_in_time_never() {
        let o = Owed::default();
        let waiting = o.owe();
        for e in 1..Owed::LAG {
            assert!(!o.advance(), "epoch {e}: not yet");
        }
        assert!(o.advance(), "waited LAG - 1 whole epochs");
        o.paid(waiting);
        // Bodies that hyper comes back for within the lag, over several laps of the ring.
        let o = Owed::default();
        for e in 0..1000 {
            let w = o.owe();
            if e % 7 == 0 {
                assert!(!o.advance(), "epoch {e}");
            }
            o.paid(w);
            assert!(!o.advance(), "epoch {e}");
        }
    }
}
