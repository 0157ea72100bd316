//! Keep-alive upstream connections: one bounded idle list per endpoint, and the connection a
//! request holds ([`UpstreamConn`]): an HTTP/1.1 connection of its own, or a stream on a
//! shared HTTP/2 connection (see `multiplex`, which keeps those; only HTTP/1.1 connections
//! go through the idle list).
//!
//! A connection holds one of its cluster's connection slots (`max_connections`) for its whole
//! life, idle or busy, so dropping it frees the slot at once. The idle list is LIFO: the most
//! recently used connection is the likeliest to be alive and warm, and everything older than
//! the newest expired one is expired too. A connection goes back to the list only once hyper
//! says it is ready for another request, i.e. the previous response was read to the end.
//!
//! The list is sharded by worker thread ([`worker_index`]): a worker takes and
//! returns connections whose I/O task runs on its own single-threaded runtime, so a request
//! and its upstream connection never wake another thread. A worker steals from another
//! shard only when the cluster is at `max_connections`.
//!
//! A connection is handed out only if it is still good: hyper says it is ready, it is younger
//! than the idle timeout and than the upstream's own `Keep-Alive: timeout=N` (less a margin),
//! and, once it has been idle for [`PEEK_AFTER_IDLE`], a peek at its socket finds neither a FIN
//! nor stray bytes that arrived while it sat idle (an upstream that closed it an instant ago,
//! before hyper's task saw it). A connection taken back sooner is not peeked: under load that
//! is almost every request, and the peek was one system call in five of a proxied request;
//! the close the peek is for comes from an upstream's idle timeout, which is never that short.
//! A request can still meet a connection closed while it is being written (or closed for
//! another reason within those milliseconds); `decide::retry` covers that race.

use std::{
    cell::Cell,
    os::fd::RawFd,
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::future::Either;
use http::{Request, Response, Uri, Version, header::HOST, uri::Scheme};
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use tokio::{
    sync::{Notify, OwnedSemaphorePermit},
    time::{Instant, Sleep},
};

use super::multiplex::StreamGuard;
use crate::proxy::request_body::RequestBody;

/// How long a connection sits idle before taking it back costs a peek at its socket (see the
/// module's documentation).
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(10);

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker number (0 outside worker threads): its shard of every idle list.
pub(crate) fn worker_index() -> usize {
    WORKER.with(Cell::get)
}

/// Called once by each worker thread when it starts.
pub(crate) fn set_worker_index(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// How a request is sent on a connection.
pub(crate) enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    /// A clone of the shared connection's sender.
    Http2(http2::SendRequest<RequestBody>),
}

/// What a connection holds while a request uses it: its own connection slot (HTTP/1.1), or a
/// stream of a shared connection, which holds the slot (HTTP/2).
pub(crate) enum Hold {
    Slot { _permit: OwnedSemaphorePermit },
    Stream(StreamGuard),
}

pub(crate) type SendResult = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>;

/// The connection a request goes on: an HTTP/1.1 connection, or a stream of an HTTP/2 one.
pub(crate) struct UpstreamConn {
    pub sender: Sender,
    /// `SO_COOKIE` of the socket: the join key with the kernel's records.
    pub cookie: u64,
    /// The socket, owned by hyper's connection task: only peeked at and asked for `TCP_INFO`,
    /// and only while the cookie read through it still matches (see [`UpstreamConn::socket`]).
    fd: RawFd,
    /// How long the TCP connect took; `None` for a connection taken from the idle list.
    pub connect_time: Option<Duration>,
    /// The upstream's `Keep-Alive: timeout=N`, when it sent one.
    pub keep_alive: Option<Duration>,
    idle_since: Instant,
    hold: Hold,
    /// The timer `request::attempt` waits for a response head with (HTTP/1.1 only), kept from
    /// one request to the next: moved to a later deadline while still registered, a tokio
    /// timer is only marked, where a new one is put in the timer wheel and taken out again
    /// (about 300 instructions per request, `bench instructions`). Made at first use; dropped
    /// when another worker steals the connection (it belongs to this worker's runtime).
    head_timer: Option<Pin<Box<Sleep>>>,
}

impl UpstreamConn {
    /// A new HTTP/1.1 connection.
    pub fn new(
        sender: http1::SendRequest<RequestBody>,
        cookie: u64,
        fd: RawFd,
        connect_time: Duration,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        UpstreamConn::with(
            Sender::Http1(sender),
            cookie,
            fd,
            Some(connect_time),
            Hold::Slot { _permit: slot },
        )
    }

    pub(super) fn with(
        sender: Sender,
        cookie: u64,
        fd: RawFd,
        connect_time: Option<Duration>,
        hold: Hold,
    ) -> Self {
        UpstreamConn {
            sender,
            cookie,
            fd,
            connect_time,
            keep_alive: None,
            idle_since: Instant::now(),
            hold,
            head_timer: None,
        }
    }

    /// The timer to wait for a response head with, for an HTTP/1.1 connection (see
    /// `head_timer`); `None` for a stream of an HTTP/2 one, which lasts one request.
    pub fn head_timer(&mut self) -> Option<Pin<&mut Sleep>> {
        if self.is_http2() {
            return None;
        }
        let t = self
            .head_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now())));
        Some(t.as_mut())
    }

    /// Sends `req`; the future awaits the response head (it does not borrow the connection).
    /// On HTTP/2 the request gets the absolute URI its `:scheme` and `:authority` come from
    /// (RFC 9113 section 8.3.1), from its `Host`.
    #[expect(
        clippy::result_large_err,
        reason = "hyper's TrySendError hands the unsent request back, to send it again; it is moved once per attempt, never kept"
    )]
    pub fn send(
        &mut self,
        mut req: Request<RequestBody>,
        tls: bool,
    ) -> impl std::future::Future<Output = SendResult> + Send + use<> {
        match &mut self.sender {
            Sender::Http1(s) => Either::Left(s.try_send_request(req)),
            Sender::Http2(s) => {
                to_h2(&mut req, tls);
                let Hold::Stream(stream) = &mut self.hold else {
                    return Either::Right(Either::Left(s.try_send_request(req)));
                };
                let entered = stream.conn().gate.enter();
                if entered.is_some() {
                    let sent = s.try_send_request(req);
                    drop(entered);
                    // In hyper's queue: a new connection's first stream, others may follow.
                    stream.list();
                    return Either::Right(Either::Left(sent));
                }
                // hyper's dispatcher is being dropped: once it is, the send fails at once and
                // hands the request back.
                let (mut s, gate) = (s.clone(), stream.conn().gate.clone());
                Either::Right(Either::Right(async move {
                    gate.wait_dropped().await;
                    s.try_send_request(req).await
                }))
            }
        }
    }

    /// A new HTTP/2 connection: requests waiting for it (`connecting` counts them) see it
    /// once this request is in its queue, not before.
    pub fn hold_connecting(&mut self, connecting: super::multiplex::Connecting) {
        if let Hold::Stream(stream) = &mut self.hold {
            stream.hold_connecting(connecting);
        }
    }

    pub fn is_http2(&self) -> bool {
        matches!(self.sender, Sender::Http2(_))
    }

    /// The shared connection, for a stream of an HTTP/2 one.
    pub fn h2(&self) -> Option<&std::sync::Arc<super::multiplex::H2Conn>> {
        match &self.hold {
            Hold::Stream(g) => Some(g.conn()),
            Hold::Slot { .. } => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        match &self.sender {
            Sender::Http1(s) => s.is_ready(),
            Sender::Http2(s) => !s.is_closed(),
        }
    }

    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    /// Ready for another request (HTTP/1.1: the previous response was read to the end).
    pub fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<hyper::Result<()>> {
        match &mut self.sender {
            Sender::Http1(s) => s.poll_ready(cx),
            Sender::Http2(s) => s.poll_ready(cx),
        }
    }

    /// The connection's socket, if `fd` is still it: the fd is checked by its cookie, so a
    /// socket that hyper closed (and whose number the kernel gave to another) is never read.
    pub fn socket(&self) -> Option<RawFd> {
        (socket_cookie(self.fd) == Some(self.cookie)).then_some(self.fd)
    }

    /// The socket's descriptor as it was at connect; check it with [`socket_of`] before use.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// How long it may stay idle: the pool's idle timeout, or less when the upstream said it
    /// closes sooner (`Keep-Alive: timeout=N`, less a quarter, at most a second, so that the
    /// gateway gives it up before the upstream's timer fires).
    fn idle_limit(&self, idle_timeout: Duration) -> Duration {
        match self.keep_alive {
            Some(k) => idle_timeout.min(k - (k / 4).min(Duration::from_secs(1))),
            None => idle_timeout,
        }
    }
}

/// `fd` if it is still the socket with `cookie` (see [`UpstreamConn::socket`]), for a caller
/// that holds only the descriptor and the cookie.
pub(crate) fn socket_of(fd: RawFd, cookie: u64) -> Option<RawFd> {
    (socket_cookie(fd) == Some(cookie)).then_some(fd)
}

/// `SO_COOKIE` of `fd`.
fn socket_cookie(fd: RawFd) -> Option<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a writable u64 and `len` its size; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// Whether the peer closed (FIN or RST) or sent bytes nobody asked for while the connection
/// was idle: a non-blocking peek of one byte. A peek never consumes data, so even a stale fd
/// number could not disturb another socket.
fn peer_spoke(fd: RawFd) -> bool {
    // 0: FIN; > 0: stray bytes (a late or unsolicited response); an error other than EAGAIN.
    !matches!(crate::proxy::io::peek(fd, &mut [0u8]), Err(e) if e.raw_os_error() == Some(libc::EAGAIN))
}

pub(crate) struct IdlePool {
    shards: Box<[Mutex<Vec<UpstreamConn>>]>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Requests waiting for a connection of this endpoint (see `checkout`).
    pub waiters: AtomicUsize,
    pub returned: Notify,
    /// The endpoint left its cluster ([`IdlePool::close`]).
    closed: AtomicBool,
}

impl IdlePool {
    /// `max_idle` is per shard.
    pub fn new(shards: usize, max_idle: usize, idle_timeout: Duration) -> Self {
        IdlePool {
            shards: (0..shards.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            max_idle,
            idle_timeout,
            waiters: AtomicUsize::new(0),
            returned: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Vec<UpstreamConn>> {
        // A panic while holding the lock cannot leave the list inconsistent.
        self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn own(&self) -> usize {
        worker_index()
    }

    /// The most recently returned live connection of this worker's shard, if any. `now` may be
    /// a little in the past (the request's arrival): it only decides idle expiry.
    pub fn take(&self, now: Instant) -> Option<UpstreamConn> {
        self.take_from(self.own(), now)
    }

    /// A live connection from another worker's shard.
    pub fn steal(&self) -> Option<UpstreamConn> {
        let own = self.own() % self.shards.len();
        let mut c = (0..self.shards.len())
            .filter(|&s| s != own)
            .find_map(|s| self.take_from(s, Instant::now()))?;
        c.head_timer = None;
        Some(c)
    }

    fn take_from(&self, shard: usize, now: Instant) -> Option<UpstreamConn> {
        let mut idle = self.lock(shard);
        while let Some(mut c) = idle.pop() {
            let idle_for = now.saturating_duration_since(c.idle_since);
            if idle_for >= self.idle_timeout {
                // LIFO: every older connection is past the idle timeout too.
                idle.clear();
                return None;
            }
            if idle_for < c.idle_limit(self.idle_timeout)
                && c.is_ready()
                && (idle_for < PEEK_AFTER_IDLE || !peer_spoke(c.fd))
            {
                c.connect_time = None;
                return Some(c);
            }
            // Closed (or about to be) by the upstream while idle: dropped here, which closes
            // it and frees its slot.
        }
        None
    }

    /// Closes every idle connection, and each one returned from now on: the endpoint left
    /// its cluster (a DNS refresh, a reload), and nothing would take or sweep them, so each
    /// would hold a connection slot for as long as anything holds the endpoint.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for s in 0..self.shards.len() {
            self.lock(s).clear();
        }
        self.returned.notify_waiters();
    }

    /// It was closed ([`IdlePool::close`]).
    #[cfg(test)]
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Returns a connection that is ready for another request.
    pub fn put(&self, mut c: UpstreamConn) {
        c.idle_since = Instant::now();
        let mut idle = self.lock(self.own());
        // Under the shard's lock, which `close` takes after marking the pool closed: a put
        // racing the close either finds the mark or is cleared by it.
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if idle.len() < self.max_idle {
            idle.push(c);
            drop(idle);
            if self.waiters.load(Ordering::Acquire) > 0 {
                self.returned.notify_one();
            }
        }
    }

    /// Closes the oldest idle connection, freeing its slot for another endpoint.
    pub fn evict_oldest(&self) -> bool {
        (0..self.shards.len()).any(|s| {
            let mut idle = self.lock(s);
            if idle.is_empty() {
                false
            } else {
                idle.remove(0);
                true
            }
        })
    }

    /// Closes expired and dead idle connections.
    pub fn sweep(&self) {
        let now = Instant::now();
        for s in 0..self.shards.len() {
            self.lock(s).retain(|c| {
                now.duration_since(c.idle_since) < c.idle_limit(self.idle_timeout) && !c.is_closed()
            });
        }
    }
}

/// The request as HTTP/2 wants it: an absolute URI (`:scheme`, `:authority` from `Host`), no
/// `Host` header (RFC 9113 section 8.3.1: the two must not disagree; `:authority` is the one
/// an HTTP/2 server reads).
fn to_h2(req: &mut Request<RequestBody>, tls: bool) {
    *req.version_mut() = Version::HTTP_2;
    let Some(host) = req.headers_mut().remove(HOST) else {
        return;
    };
    let Ok(authority) = http::uri::Authority::try_from(host.as_bytes()) else {
        // Not a valid authority: keep the Host header, the upstream judges it.
        req.headers_mut().insert(HOST, host);
        return;
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests;
