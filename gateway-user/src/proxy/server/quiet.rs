//! The timers of a connection served by `serve_with` (HTTPS, and plain HTTP/2 with prior
//! knowledge), looked at every [`Quiet::step`]:
//!
//! - a connection that has started no request within the header-read timeout is closed,
//!   unless it sent the whole HTTP/2 preface (hyper has no timer while it waits to tell
//!   HTTP/1 from HTTP/2, nor for the preface of a connection ALPN made HTTP/2);
//! - an HTTP/2 connection with no stream open for `http2_idle_timeout` gets GOAWAY (looked at
//!   every epoch while a stream is open; with none, it sleeps until the idle limit, woken by
//!   the first stream that opens);
//! - an HTTP/2 connection one of whose response streams has waited the write timeout for its
//!   client to take the next frame (`io::Owed`) is closed, as an HTTP/1 connection whose
//!   socket takes no byte for as long is: a client that never opens its flow-control window
//!   would otherwise hold the stream, and the upstream connection behind it, for ever. It is
//!   closed between the write timeout and about 1.15 times it (for timeouts of 1.6 s and
//!   more; up to 4 epochs of 50 ms late below). Response bodies are handed to hyper in pieces of at most `OWED_PIECE`, so that a
//!   client that reads slowly, but reads, frees room for the next piece well within that time;
//! - an HTTP/2 connection whose client resets too many of its streams early (rapid reset,
//!   `proxy::resets`) is closed, woken by the stream whose end tipped it over.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tracing::{debug, warn};

use super::{H1, H2, Phase, UNKNOWN};
use crate::{
    config::{Downstream, settings::PrematureResets},
    proxy::{classify, io::Activity, request::Client, resets, shared::Shared},
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

/// The next of a connection's rare events: `None` for a timer (or a wake-up, `io::Owed::wake`),
/// else whether the drain's phase changed (`false`: its sender is gone).
pub(super) async fn next_event(
    check: Option<Instant>,
    phase: &mut watch::Receiver<Phase>,
    wake: Option<&Notify>,
) -> Option<bool> {
    let woken = async {
        match wake {
            Some(w) => w.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = tokio::time::sleep_until(check.unwrap_or_else(Instant::now)), if check.is_some() => None,
        _ = woken => None,
        changed = phase.changed() => Some(changed.is_ok()),
    }
}

/// The connection's activity. Response streams are watched for a client that stopped reading
/// them on connections known to speak HTTP/2 (ALPN, or the preface on a plain listener):
/// HTTP/1's socket guard sees that client, and an HTTPS connection without ALPN `h2` speaks
/// HTTP/1 only (`serve_with`).
pub(super) fn activity(speaks: u8, limits: &Limits) -> Arc<Activity> {
    Arc::new(if speaks == H2 {
        Activity::watching_streams(limits.premature_resets)
    } else {
        Activity::default()
    })
}

/// What [`Quiet`] goes by, from `[router.downstream]`.
pub(super) struct Limits {
    header_timeout: Duration,
    idle: Duration,
    write_timeout: Duration,
    /// The rapid-reset rule of HTTP/2 connections.
    premature_resets: PrematureResets,
    /// `gateway_client_http2_reset_floods_total`.
    reset_floods: Counter,
}

impl Limits {
    pub(super) fn of(ds: &Downstream, shared: &Shared) -> Limits {
        Limits {
            header_timeout: ds.header_read_timeout,
            idle: ds.http2_idle_timeout,
            write_timeout: ds.write_timeout,
            premature_resets: ds.http2_premature_resets,
            reset_floods: shared.telemetry.metrics.client_reset_floods.clone(),
        }
    }
}

/// `serve_with`'s timers: the first request's deadline, then, on HTTP/2, the idle one and the
/// stream watchdog.
pub(super) struct Quiet {
    first_by: Instant,
    idle_limit: Duration,
    /// When to look next.
    next: Instant,
    /// Requests started when last looked at, and since when none has been open and none
    /// started (`None`: one was open).
    seen: u64,
    quiet_since: Option<Instant>,
    /// The write timeout's `io::Owed` epochs: their length, when the next one starts, and how
    /// many make a stalled stream.
    epoch: Duration,
    epoch_at: Instant,
    lag: u64,
    /// A GOAWAY waits for the preface ([`Quiet::go_away_when_ready`]).
    goaway_due: bool,
    /// `gateway_client_http2_reset_floods_total`.
    reset_floods: Counter,
}

/// Epochs per write timeout, at most: an epoch lasts a 32nd of it, and at least
/// [`MIN_EPOCH`], since a stream is looked at every epoch.
const EPOCHS: u32 = 32;
const MIN_EPOCH: Duration = Duration::from_millis(50);
/// How many epochs a stamp may lag behind the time it was made: a body that began to wait
/// just before a look is stamped with the epoch that look ends, and the look itself may come
/// late; beyond this, the count restarts (see [`Quiet::check`]).
const STALE_EPOCHS: u32 = 2;

impl Quiet {
    pub(super) fn new(limits: Limits, speaks: u8, activity: &Activity) -> Quiet {
        let now = Instant::now();
        let first_by = now + limits.header_timeout;
        let epoch = (limits.write_timeout / EPOCHS).max(MIN_EPOCH);
        let per_timeout = limits.write_timeout.as_nanos().div_ceil(epoch.as_nanos()) as u64;
        let mut q = Quiet {
            first_by,
            idle_limit: limits.idle,
            next: first_by,
            seen: 0,
            quiet_since: Some(now),
            epoch,
            epoch_at: now + epoch,
            lag: per_timeout + 1 + u64::from(STALE_EPOCHS),
            goaway_due: false,
            reset_floods: limits.reset_floods,
        };
        if speaks == H2 {
            q.sleep(now + q.idle_limit, activity);
            q.next = q.next.min(first_by);
        }
        q
    }

    /// When to look at the connection next; `None`: never (an HTTP/1 connection that has
    /// started a request: hyper's header-read timer bounds it from then on).
    pub(super) fn next_check(&self, speaks: u8, shutting_down: bool) -> Option<Instant> {
        (!shutting_down && speaks != H1).then_some(self.next)
    }

    /// `stop`, except a GOAWAY for a connection ALPN made HTTP/2 that has not sent its whole
    /// preface: hyper would cancel its wait for the preface and drop the connection instead
    /// of sending one. That GOAWAY is sent once the preface is in, looked for every
    /// [`MIN_EPOCH`] (the first-request timer closes a client that never sends it).
    pub(super) fn go_away_when_ready(
        &mut self,
        stop: Option<Stop>,
        speaks: u8,
        activity: &Activity,
        shutting_down: bool,
    ) -> Option<Stop> {
        let ready = speaks != H2 || activity.bytes_read() >= PREFACE_LEN;
        match stop {
            Some(Stop::GoAway) if !ready => {
                self.goaway_due = true;
                self.next = self.next.min(Instant::now() + MIN_EPOCH);
                None
            }
            None if self.goaway_due && !shutting_down => {
                if ready {
                    return Some(Stop::GoAway);
                }
                self.next = self.next.min(Instant::now() + MIN_EPOCH);
                None
            }
            stop => stop,
        }
    }

    /// The connection ended with `e`: a flood h2 closed it for (`resets::h2_flood`), or a
    /// request hyper answered itself (`rejected`), is counted and logged.
    pub(super) fn ended_with(
        &self,
        e: &(dyn std::error::Error + 'static),
        activity: &Activity,
        (shared, client): (&Shared, &Client),
    ) {
        debug!(client = %client.addr, error = %e, "client connection ended with an error");
        if classify::h2_cause(e).is_some_and(resets::h2_flood) {
            self.reset_flood(activity, client.addr, true);
        }
        super::rejected::note(shared, client, e);
    }

    /// The connection is closed for its client's resets: by the rule, or by h2 (`by_h2`,
    /// `resets::h2_flood`). Counted and logged.
    pub(super) fn reset_flood(&self, activity: &Activity, peer: SocketAddr, by_h2: bool) {
        self.reset_floods.inc();
        let Some(suppressed) = resets::LOG.due() else {
            return;
        };
        let (streams, early) = activity.owed().map_or((0, 0), |o| o.resets.counts());
        let every_s = resets::LOG_EVERY.as_secs();
        if by_h2 {
            warn!(client = %peer, streams, reset_early = early, suppressed, every_s,
                "HTTP/2 client connection closed by h2 (GOAWAY ENHANCE_YOUR_CALM): most often streams reset before they were accepted (rapid reset; the limit follows http2_premature_reset_streams), else a flood of stream errors, header or CONTINUATION frames, or DATA frames, which h2 does not tell apart (counted in gateway_client_http2_reset_floods_total)");
        } else {
            warn!(client = %peer, streams, reset_early = early, suppressed, every_s,
                "HTTP/2 client reset most of its streams soon after opening them (rapid reset; http2_premature_reset_streams and _lifetime_ms): connection closed (counted in gateway_client_http2_reset_floods_total)");
        }
    }

    /// A timer fired: whether the connection is to stop.
    pub(super) fn check(
        &mut self,
        speaks: u8,
        activity: &Activity,
        peer: SocketAddr,
    ) -> Option<Stop> {
        if activity.owed().is_some_and(|o| o.resets.tripped()) {
            self.reset_flood(activity, peer, false);
            return Some(Stop::Close);
        }
        let now = Instant::now();
        let requests = activity.requests();
        if requests == 0 && now >= self.first_by {
            // An incomplete HTTP/2 preface is still in hyper's handshake, which no GOAWAY
            // ends; a connection that sent more (part of an HTTP/1 head) is asked to finish.
            if activity.bytes_read() < PREFACE_LEN {
                debug!(client = %peer, "no request within the header-read timeout: closed");
                return Some(Stop::Close);
            }
            if speaks == UNKNOWN {
                debug!(client = %peer, "no request within the header-read timeout: GOAWAY");
                return Some(Stop::GoAway);
            }
        }
        if speaks == UNKNOWN {
            return None;
        }
        // Looked at every epoch (at most an eighth of the idle limit) while a stream is open;
        // with none open, at the idle limit (below), or sooner when a stream opens
        // (`io::Owed::wake`).
        let open = !activity.between_requests();
        self.next = now + self.epoch.min(self.idle_limit / 8);
        if let Some(o) = activity.owed() {
            o.sleeping.store(false, Ordering::Relaxed);
        }
        if requests == 0 && now < self.first_by {
            self.next = self.next.min(self.first_by);
        }
        if let Some(owed) = activity.owed() {
            // Not looked at for a while (a worker stall, or no stream open): stamps made
            // meanwhile are too coarse to judge by, so the count restarts from now.
            if now > self.epoch_at + self.epoch * STALE_EPOCHS {
                self.epoch_at = now;
            }
            while now >= self.epoch_at {
                self.epoch_at += self.epoch;
                if owed.advance(self.lag) {
                    debug!(client = %peer, "a response stream waited the write timeout for the client to read it: closed");
                    activity.client_stopped_reading();
                    return Some(Stop::Close);
                }
            }
        }
        if requests != self.seen || open {
            self.seen = requests;
            self.quiet_since = (!open).then_some(now);
            if !open {
                self.sleep(now + self.idle_limit, activity);
            }
            return None;
        }
        let since = *self.quiet_since.get_or_insert(now);
        if now.duration_since(since) >= self.idle_limit {
            debug!(client = %peer, "HTTP/2 connection idle: GOAWAY");
            return Some(Stop::GoAway);
        }
        self.sleep(since + self.idle_limit, activity);
        if requests == 0 && now < self.first_by {
            self.next = self.next.min(self.first_by);
        }
        None
    }

    /// No stream open: the next look is at `until`, unless a stream opens first (it wakes the
    /// watchdog then).
    fn sleep(&mut self, until: Instant, activity: &Activity) {
        self.next = until;
        if let Some(o) = activity.owed() {
            o.sleeping.store(true, Ordering::Relaxed);
            // A stream that opened before the mark was set did not wake anyone.
            if !activity.between_requests() {
                o.sleeping.store(false, Ordering::Relaxed);
                self.next = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::io::Owed;

    #[test]
    fn a_body_still_waiting_lag_epochs_later_is_reported_and_one_paid_in_time_never() {
        const LAG: u64 = 35;
        let o = Owed::default();
        let waiting = o.owe();
        for e in 1..LAG {
            assert!(!o.advance(LAG), "epoch {e}: not yet");
        }
        assert!(o.advance(LAG), "waited LAG - 1 whole epochs");
        o.paid(waiting);
        // Bodies that hyper comes back for within the lag, over several laps of the ring.
        let o = Owed::default();
        for e in 0..1000 {
            let w = o.owe();
            if e % 7 == 0 {
                assert!(!o.advance(LAG), "epoch {e}");
            }
            o.paid(w);
            assert!(!o.advance(LAG), "epoch {e}");
        }
    }
}
