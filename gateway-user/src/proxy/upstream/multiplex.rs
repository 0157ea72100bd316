//! HTTP/2 upstream connections, shared by the requests in flight on them: one list per
//! endpoint and worker, each connection carrying up to `max_concurrent_streams` requests, or
//! the upstream's own limit when lower (`settings`).
//!
//! A request takes a stream on the first live connection of its worker's list with room,
//! else on another worker's, else a new connection is made (through `checkout`, so it gets
//! the same connect deadline, hedging and kernel evidence as any other). While a connection
//! is being made, requests that would fit on it wait for it instead of each opening their own
//! (at most `max_concurrent_streams` of them per connection being made, or the upstream's
//! per-connection request limit once learned, `lifetime`), so a burst opens one connection per
//! `max_concurrent_streams` requests, not one per request. A new connection joins the list once
//! the request that made it is in hyper's queue, so that it is the connection's first stream
//! ([`Multiplexed::register`]).
//!
//! A connection stops taking new streams (it is *retired*) when hyper says it is closed, when
//! one of its streams failed with a connection-level error (a GOAWAY, the host died), when it
//! has carried as many requests as the upstream lets one connection carry (`lifetime`), or when
//! the pool sweeps it: idle (no stream) for longer than the cluster's `idle_timeout_ms`, like
//! an idle HTTP/1.1 connection. Requests fill the first connection with room, so connections
//! beyond what the load needs go idle and are closed; the streams in flight on it finish (a
//! GOAWAY's last-stream-id and below) or fail on their own. Its connection slot is held until
//! the last stream is gone and hyper closed it.
//!
//! hyper's dispatcher for a connection (its `Connection`, run by `connect::drive`) ends as soon
//! as the upstream's GOAWAY arrives, while other workers may still be handing it requests: each
//! connection has a `gate::SendGate`, so that no request is pushed into the dispatcher's queue
//! while that queue is being dropped (such a request would be neither answered nor failed
//! until the response timeout).
//!
//! The kernel's evidence joins per connection, by its `SO_COOKIE`, like HTTP/1: every request
//! on it records the cookie, and a request waiting for its response reads the connection's
//! record (RTOs with bytes unACKed: the host died, for every stream on it; see
//! `request::attempt` and docs/kernel.md, "HTTP/2 upstreams").

use std::{
    net::SocketAddr,
    os::fd::RawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::client::conn::http2;
use tokio::sync::OwnedSemaphorePermit;

use self::stream::Unlisted;
pub(crate) use self::{
    freed::Freed,
    settings::{PeerSettings, SettingsTap},
    stream::StreamGuard,
};
use super::{
    gate::SendGate,
    lifetime::StreamLifetime,
    pool::{Hold, Sender, UpstreamConn, worker_index},
};
use crate::proxy::request_body::RequestBody;

/// One HTTP/2 connection to an endpoint.
pub(crate) struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    pub cookie: u64,
    fd: RawFd,
    /// Streams in flight.
    streams: AtomicUsize,
    max_streams: usize,
    /// Streams ever taken on it, and those of them the upstream refused unprocessed with a
    /// graceful GOAWAY: what [`StreamLifetime`] learns from.
    started: AtomicUsize,
    refused: AtomicUsize,
    /// Streams the upstream refused in a row with `REFUSED_STREAM` (load shedding): see
    /// [`H2Conn::shed`].
    shed: AtomicUsize,
    lifetime: Arc<StreamLifetime>,
    retired: AtomicBool,
    /// Told when a stream ends, so that a request waiting for room may take it.
    freed: Arc<Freed>,
    /// When its last stream ended, as milliseconds since [`epoch`] (only read when `streams`
    /// is 0).
    idle_since_ms: AtomicU64,
    /// Shared with the connection's `drive` task.
    pub(super) gate: Arc<SendGate>,
    /// What the upstream said of its limits (`settings`).
    settings: Arc<PeerSettings>,
    _slot: OwnedSemaphorePermit,
}

impl H2Conn {
    fn live(&self) -> bool {
        !self.retired.load(Ordering::Acquire) && !self.gate.is_closed() && !self.sender.is_closed()
    }

    /// Takes a stream if there is room, and the connection has not carried as many requests
    /// as the upstream allows one (then it is retired).
    fn try_stream(self: &Arc<Self>) -> Option<StreamGuard> {
        // The upstream's own limit too: above it, h2 would queue the stream unseen while its
        // response timeout runs. At 0 (an upstream shedding load, RFC 9113 section 6.5.2) it
        // takes none until the upstream raises it.
        let max = self.max_streams.min(self.settings.max_streams());
        let mut n = self.streams.load(Ordering::Relaxed);
        loop {
            if n >= max || !self.live() {
                return None;
            }
            match self
                .streams
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        let limit = self.lifetime.limit(now_ms);
        let counted = self
            .started
            .try_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s < limit).then_some(s + 1)
            });
        if counted.is_err() {
            self.retire();
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(StreamGuard {
            conn: self.clone(),
            unlisted: None,
        })
    }

    /// No new streams on this connection; those in flight go on.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// The upstream refused one of its streams with `RST_STREAM(REFUSED_STREAM)`: it sheds
    /// load, and the connection stays (a new one per refusal costs an upstream already short
    /// of capacity a handshake each), unless [`SHED_TO_RETIRE`] streams in a row were refused
    /// on it, with no response between them: a connection it will not serve.
    pub fn shed(&self) {
        if self.shed.fetch_add(1, Ordering::Relaxed) + 1 >= SHED_TO_RETIRE {
            self.retire();
        }
    }

    /// A stream on it got its response head: the refusals in a row start again.
    pub fn answered(&self) {
        // Read first: a store on every response would bounce the line between workers.
        if self.shed.load(Ordering::Relaxed) != 0 {
            self.shed.store(0, Ordering::Relaxed);
        }
    }

    /// One of its streams was refused unprocessed by the upstream's graceful GOAWAY.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn idle(&self) -> bool {
        self.streams.load(Ordering::Acquire) == 0
    }

    /// No stream for `limit` or longer.
    fn idle_for(&self, limit: Duration, now_ms: u64) -> bool {
        self.idle()
            && now_ms.saturating_sub(self.idle_since_ms.load(Ordering::Relaxed))
                >= limit.as_millis() as u64
    }
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.lifetime
            .ended(*self.started.get_mut(), *self.refused.get_mut(), now_ms());
    }
}

/// The base of [`H2Conn::idle_since_ms`]: the first time it was asked for.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// See [`H2Conn::shed`].
const SHED_TO_RETIRE: usize = 8;

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

#[derive(Default)]
struct Shard {
    conns: Vec<Arc<H2Conn>>,
    /// Connections being made for this shard, and the requests waiting for them.
    connecting: usize,
    waiting: usize,
}

/// An endpoint's HTTP/2 connections.
pub(crate) struct Multiplexed {
    shards: Box<[Mutex<Shard>]>,
    max_streams: usize,
    /// A connection idle this long is closed by [`Multiplexed::sweep`].
    idle_timeout: Duration,
    /// A stream ended, a connection came up, or a connect failed.
    pub freed: Arc<Freed>,
    /// This endpoint has spoken HTTP/2 (an `auto` cluster learns it from ALPN).
    pub speaks_h2: AtomicBool,
    lifetime: Arc<StreamLifetime>,
    /// The upstream's own limit on streams per connection, from the last connection listed
    /// (`usize::MAX`: none said): a burst waiting for a new connection is sized by it.
    advertised: AtomicUsize,
    /// The endpoint left its cluster ([`Multiplexed::close`]).
    closed: AtomicBool,
}

/// What a request should do when no stream was free.
pub(crate) enum Wait {
    /// Make a new connection; `Connecting` counts it until dropped.
    Connect(Connecting),
    /// A connection being made has room for this request: wait for it (`Waiting` counts the
    /// request until dropped).
    ForConnect(Waiting),
}

impl Multiplexed {
    pub fn new(
        endpoint: SocketAddr,
        shards: usize,
        max_streams: usize,
        idle_timeout: Duration,
    ) -> Self {
        Multiplexed {
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
            max_streams: max_streams.max(1),
            idle_timeout,
            freed: Arc::default(),
            speaks_h2: AtomicBool::new(false),
            lifetime: Arc::new(StreamLifetime::new(endpoint)),
            advertised: AtomicUsize::new(usize::MAX),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Shard> {
        // Nothing a panic could leave half-done: the list is only pushed to and filtered.
        self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many requests the upstream lets one connection carry, once learned from its
    /// graceful GOAWAYs (`lifetime`); `/status` and the metrics show it.
    pub fn learned_limit(&self) -> Option<usize> {
        self.lifetime.known(now_ms)
    }

    /// A stream on a live connection of this worker's list with room, dropping dead ones.
    pub fn take(&self) -> Option<UpstreamConn> {
        let mut shard = self.lock(worker_index());
        take_from(&mut shard)
    }

    /// A stream on another worker's connection.
    pub fn steal(&self) -> Option<UpstreamConn> {
        let own = worker_index() % self.shards.len();
        (0..self.shards.len())
            .filter(|&s| s != own)
            .find_map(|s| take_from(&mut self.lock(s)))
    }

    /// No stream free: wait for a connection being made, or make one.
    pub fn plan(self: &Arc<Self>) -> Wait {
        let shard_index = worker_index();
        let mut shard = self.lock(shard_index);
        // The request that makes a connection takes its first stream; it carries at most
        // what the upstream lets one connection carry, when that is known.
        let carries = self
            .max_streams
            .min(self.lifetime.limit(now_ms))
            .min(self.advertised.load(Ordering::Relaxed))
            .max(1);
        if shard.connecting * (carries - 1) > shard.waiting {
            shard.waiting += 1;
            return Wait::ForConnect(Waiting {
                mux: self.clone(),
                shard: shard_index,
            });
        }
        shard.connecting += 1;
        Wait::Connect(Connecting {
            mux: self.clone(),
            shard: shard_index,
        })
    }

    /// A new connection with one stream taken for the request that made it. It joins the
    /// endpoint's list once that request is in hyper's queue ([`StreamGuard::list`]), so that
    /// the request is the connection's first stream: an upstream that ends each connection
    /// after N requests (nginx's `keepalive_requests`) processes it. That is where a request
    /// whose stream was refused twice goes (`decide::retry`, rule 6).
    pub fn register(
        self: &Arc<Self>,
        sender: http2::SendRequest<RequestBody>,
        cookie: u64,
        fd: RawFd,
        slot: OwnedSemaphorePermit,
        connect_time: std::time::Duration,
        (gate, settings): (Arc<SendGate>, Arc<PeerSettings>),
    ) -> UpstreamConn {
        self.speaks_h2.store(true, Ordering::Relaxed);
        let conn = Arc::new(H2Conn {
            sender: sender.clone(),
            cookie,
            fd,
            streams: AtomicUsize::new(1),
            max_streams: self.max_streams,
            started: AtomicUsize::new(1),
            refused: AtomicUsize::new(0),
            shed: AtomicUsize::new(0),
            lifetime: self.lifetime.clone(),
            // A connection made for an endpoint that has left its cluster carries the request
            // that made it, and no other.
            retired: AtomicBool::new(self.closed.load(Ordering::Acquire)),
            freed: self.freed.clone(),
            idle_since_ms: AtomicU64::new(now_ms()),
            gate,
            settings,
            _slot: slot,
        });
        let unlisted = Unlisted {
            mux: self.clone(),
            shard: worker_index(),
            connecting: None,
        };
        UpstreamConn::with(
            Sender::Http2(sender),
            cookie,
            fd,
            Some(connect_time),
            Hold::Stream(StreamGuard {
                conn,
                unlisted: Some(Box::new(unlisted)),
            }),
        )
    }

    /// Retires every connection (each closes once its last stream is done) and each one made
    /// from now on: the endpoint left its cluster, and nothing would sweep them.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for s in 0..self.shards.len() {
            for c in self.lock(s).conns.drain(..) {
                c.retire();
            }
        }
    }

    /// Closes one connection with no stream in flight, to free its slot.
    pub fn evict_idle(&self) -> bool {
        (0..self.shards.len()).any(|s| {
            let mut shard = self.lock(s);
            match shard.conns.iter().position(|c| c.idle()) {
                Some(i) => {
                    shard.conns.swap_remove(i).retire();
                    true
                }
                None => false,
            }
        })
    }

    /// Drops retired and closed connections from the lists (they close once their last
    /// stream is done), and retires those idle for `idle_timeout` (closed at once: the list
    /// held the last handle of their sender).
    pub fn sweep(&self) {
        let now = now_ms();
        for s in 0..self.shards.len() {
            self.lock(s).conns.retain(|c| {
                if c.idle_for(self.idle_timeout, now) {
                    c.retire();
                }
                c.live()
            });
        }
    }
}

fn take_from(shard: &mut Shard) -> Option<UpstreamConn> {
    shard.conns.retain(|c| c.live());
    shard.conns.iter().find_map(|c| {
        let guard = c.try_stream()?;
        Some(UpstreamConn::with(
            Sender::Http2(c.sender.clone()),
            c.cookie,
            c.fd,
            None,
            Hold::Stream(guard),
        ))
    })
}

/// Counts a connection being made until dropped (made, or failed).
pub(crate) struct Connecting {
    mux: Arc<Multiplexed>,
    shard: usize,
}

impl Drop for Connecting {
    fn drop(&mut self) {
        self.mux.lock(self.shard).connecting -= 1;
        // Made (listed, which notified already) or failed: either way the waiters look
        // again, and one of them connects if no connection came up.
        self.mux.freed.notify();
    }
}

/// Counts a request waiting for a connection being made, until dropped.
pub(crate) struct Waiting {
    mux: Arc<Multiplexed>,
    shard: usize,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.mux.lock(self.shard).waiting -= 1;
    }
}

mod freed;
mod settings;
mod stream;
#[cfg(test)]
mod tests;
