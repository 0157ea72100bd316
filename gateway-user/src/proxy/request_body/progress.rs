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

    /// Completes once `deadline` has passed and, with an `idle` limit, the client has also
    /// sent nothing of its body for that long: a request timeout that runs from the body's
    /// last byte so far, so that an upload that keeps coming is not cut however long it takes
    /// (Envoy starts its route timeout at the end of the request; nginx's
    /// `client_body_timeout` is a gap between two reads). Without a limit (a gRPC call's own
    /// deadline, which its client set), at `deadline`.
    pub async fn stalled(&self, deadline: Instant, idle: Option<Duration>) {
        loop {
            let until = idle.map_or(deadline, |t| deadline.max(self.last_read() + t));
            tokio::time::sleep_until(until).await;
            // A byte that came meanwhile moved the end on.
            if idle.is_none_or(|t| self.last_read() + t <= Instant::now()) {
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

    /// The request timeout runs from the body's last byte: a byte at 0.8 s moves a 1 s
    /// deadline to 1.8 s; with no byte after, it fires there. A call's own deadline does not
    /// move.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_moves_with_each_byte_of_the_body() {
        let p = Arc::new(Progress::new());
        let start = Instant::now();
        let idle = Duration::from_secs(1);
        let feeder = p.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            feeder.read_now();
        });
        p.stalled(start + idle, Some(idle)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1800));

        let start = Instant::now();
        p.read_now();
        let feeder = p.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            feeder.read_now();
        });
        p.stalled(start + idle, None).await;
        assert_eq!(start.elapsed(), idle);
    }
}
