//! What the request path sees of a client's body on its way upstream ([`Progress`]).

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// Tells the body's [`Progress`] it ended when dropped: at its end, on an error, or when the
/// body is dropped unfinished (a failed attempt).
#[derive(Debug)]
pub(super) struct Ended(pub(super) Arc<Progress>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended.notify_one();
    }
}

/// The slowest average rate, in bytes per second since the request's arrival, at which a body
/// still moves the request deadline on ([`Progress::moved`]): Apache's `mod_reqtimeout`
/// default (`MinRate=500`). A 100 MB upload may take 55 hours at it.
pub(crate) const MIN_BODY_RATE: f64 = 500.0;

/// How a body that keeps coming moves the request deadline ([`Progress::moved`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slide {
    /// The route's request timeout, run from the body's last byte.
    pub timeout: Duration,
    /// Never past this: a gRPC call's own deadline.
    pub cap: Option<Instant>,
    /// Each byte buys at most 1/[`MIN_BODY_RATE`] s. Not for a streaming call (gRPC, a
    /// Connect stream), whose client sends a message when it has one and may be quiet
    /// between.
    pub min_rate: bool,
}

/// A body's way upstream, as the request path watches it: the bytes read from the client so
/// far and when the last of them came, and a notification when the body ended (or failed, or
/// was dropped unfinished).
#[derive(Debug)]
pub(crate) struct Progress {
    pub(super) bytes: AtomicU64,
    /// When the client last sent some of the body (a frame, or its end), in nanoseconds after
    /// `origin`: the request timeout runs from it ([`Progress::stalled`]).
    pub(super) last_read_ns: AtomicU64,
    pub(super) origin: Instant,
    pub(super) ended: Notify,
    /// The upstream connection asked for the body's next frame and the client has not sent
    /// it: a request that runs out of time so waits on its client, not on its upstream.
    pub(super) waiting: AtomicBool,
    /// The client's body was read to its end.
    pub(super) complete: AtomicBool,
    /// How the body failed, if it did.
    pub(super) failure: OnceLock<BodyFailure>,
}

/// How a client's body failed on its way upstream. An HTTP/2 upstream connection (hyper's
/// client) drops the body's error and resets the stream: the request learns of it only from
/// here, and otherwise blamed the upstream (`502 upstream_reset`, gRPC `UNAVAILABLE`) for a
/// body over `max_request_body_bytes` or a client that broke its upload off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyFailure {
    TooLarge { limit: u64 },
    Downstream,
}

impl Progress {
    pub(super) fn new() -> Progress {
        Progress {
            bytes: AtomicU64::new(0),
            last_read_ns: AtomicU64::new(0),
            origin: Instant::now(),
            ended: Notify::new(),
            waiting: AtomicBool::new(false),
            complete: AtomicBool::new(false),
            failure: OnceLock::new(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// When the client last sent some of its body: the body's start (about the request's
    /// arrival) until a first frame came.
    pub fn last_read(&self) -> Instant {
        self.origin + Duration::from_nanos(self.last_read_ns.load(Ordering::Relaxed))
    }

    pub(super) fn read_now(&self) {
        let ns = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_read_ns.store(ns, Ordering::Relaxed);
    }

    /// When the body started (about the request's arrival).
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// The request `deadline` as the body read so far moves it on: the request timeout runs
    /// from the body's last byte, so that an upload that keeps coming is not cut (Envoy starts
    /// its route timeout at the end of the request; nginx's `client_body_timeout` is a gap
    /// between two reads). Each byte buys at most 1/[`MIN_BODY_RATE`] s past the timeout from
    /// the arrival, as Apache's `RequestReadTimeout body=…,MinRate=500` does, so that a client
    /// trickling a byte now and then cannot hold its connection, an upstream's and its
    /// read-ahead memory for hours (unless `slide.min_rate` is off); and never past
    /// `slide.cap`.
    pub fn moved(&self, deadline: Instant, slide: Slide) -> Instant {
        let mut moved = self.last_read() + slide.timeout;
        if slide.min_rate {
            let earned = Duration::from_secs_f64(self.bytes() as f64 / MIN_BODY_RATE);
            moved = moved.min(self.origin + slide.timeout + earned);
        }
        deadline.max(slide.cap.map_or(moved, |c| moved.min(c)))
    }

    /// How long the body has been coming, when it timed out below the minimum rate rather than
    /// by stopping for the timeout: for the error's words.
    pub fn below_rate(&self, slide: Option<Slide>) -> Option<Duration> {
        let s = slide.filter(|s| s.min_rate)?;
        let earned = Duration::from_secs_f64(self.bytes() as f64 / MIN_BODY_RATE);
        let by_rate = self.origin + s.timeout + earned;
        // The rate, not a stop nor a gRPC call's own deadline, ended it.
        (by_rate < self.last_read() + s.timeout && s.cap.is_none_or(|c| by_rate <= c))
            .then(|| self.origin.elapsed())
    }

    /// Completes once the request `deadline`, moved on by the body as it comes
    /// ([`Progress::moved`]), has passed; without a `slide` (a gRPC call's own deadline, which
    /// its client set), at `deadline`.
    pub async fn stalled(&self, deadline: Instant, slide: Option<Slide>) {
        let until = || slide.map_or(deadline, |s| self.moved(deadline, s));
        loop {
            tokio::time::sleep_until(until()).await;
            // A byte that came meanwhile moved the end on.
            if until() <= Instant::now() {
                return;
            }
        }
    }

    /// Whether the client's body was read to its end.
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
    }

    /// How the body failed, if it did.
    pub fn failure(&self) -> Option<BodyFailure> {
        self.failure.get().copied()
    }

    /// Whether the body waits for its client (see `waiting`).
    pub fn waiting_for_client(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Completes once the body ended (at once if it already has).
    pub async fn ended(&self) {
        self.ended.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes read at these offsets from now (`bytes` in all by each), on another task.
    fn feed(p: &Arc<Progress>, at: &[(u64, u64)]) {
        let (p, at) = (p.clone(), at.to_vec());
        tokio::spawn(async move {
            let start = Instant::now();
            for (ms, bytes) in at {
                tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
                p.bytes.store(bytes, Ordering::Relaxed);
                p.read_now();
            }
        });
    }

    /// The request timeout runs from the body's last byte: a byte at 0.8 s moves a 1 s
    /// deadline to 1.8 s. Each byte buys at most 2 ms past the timeout (500 bytes/s): 250
    /// bytes that trickle in until 1.3 s end it at 1.5 s, unless the request is a streaming
    /// call. Never past a gRPC call's own deadline; and a call whose own deadline it is does
    /// not move.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_moves_with_the_body_at_a_minimum_rate() {
        let timeout = Duration::from_secs(1);
        let slide = Slide {
            timeout,
            cap: None,
            min_rate: true,
        };
        // Bytes read, the cap, the minimum rate, when it ends, and whether the rate ended it.
        for (at, cap, min_rate, want, slow) in [
            (vec![(800, 1000)], None, true, 1800, false),
            (vec![(800, 200), (1300, 250)], None, true, 1500, true),
            (vec![(800, 100_000)], Some(1200), true, 1200, false),
            // A streaming call's messages move it however small they are.
            (vec![(800, 10), (1600, 20)], None, false, 2600, false),
        ] {
            let p = Arc::new(Progress::new());
            let start = p.origin();
            feed(&p, &at);
            let slide = Slide {
                cap: cap.map(|ms| start + Duration::from_millis(ms)),
                min_rate,
                ..slide
            };
            p.stalled(start + timeout, Some(slide)).await;
            assert_eq!(start.elapsed(), Duration::from_millis(want), "{at:?}");
            assert_eq!(p.below_rate(Some(slide)).is_some(), slow, "{at:?}");
        }
        let p = Arc::new(Progress::new());
        let start = p.origin();
        feed(&p, &[(800, 1000)]);
        p.stalled(start + timeout, None).await;
        assert_eq!(start.elapsed(), timeout);
    }
}
