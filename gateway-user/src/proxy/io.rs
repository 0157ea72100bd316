//! Socket wrappers. `StallGuard` turns a write making no progress for too long into an error,
//! on both sides of the proxy. `Parkable` lets an idle HTTP/1 client connection be taken back
//! from hyper without closing it (see `server::park`), with [`Activity`] and [`Busy`] saying
//! when it is idle. `Holding` keeps a guard for as long as its socket lives.
//!
//! A write is pending only when the peer's receive window is full, i.e. the peer stopped
//! reading (or the path died). Reads are not guarded here: an idle keep-alive connection
//! legitimately waits forever for its next read, so read deadlines live where the protocol
//! knows a read is due (header-read timeout, response timeout).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

pub(crate) use self::{
    delegate::delegate_async_write,
    early::{EarlyResponse, ReadsAfterReset},
    holding::Holding,
};

mod delegate;
mod early;
mod holding;
pub(crate) mod linger;

/// The error inside the `io::Error` (kind `TimedOut`) returned when the timer fires.
#[derive(Debug, Error)]
#[error("write made no progress for {} ms: the peer stopped reading", timeout.as_millis())]
pub(crate) struct WriteStalled {
    pub timeout: Duration,
}

pub(crate) struct StallGuard<T> {
    inner: T,
    timeout: Duration,
    /// Allocated on the first stall only; most connections never stall.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<T> StallGuard<T> {
    /// The wrapped socket, e.g. to peek at it.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    pub fn new(inner: T, timeout: Duration) -> Self {
        StallGuard {
            inner,
            timeout,
            timer: None,
            armed: false,
        }
    }

    /// Called when a write returned `Pending`: starts the stall timer if it is not running and
    /// reports whether it has fired.
    fn poll_stall<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let deadline = Instant::now() + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            WriteStalled {
                timeout: self.timeout,
            },
        )))
    }

    fn progress<R>(&mut self, r: io::Result<R>) -> Poll<io::Result<R>> {
        self.armed = false;
        Poll::Ready(r)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => this.progress(r),
            Poll::Pending => this.poll_stall(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => this.progress(r),
            Poll::Pending => this.poll_stall(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => this.progress(r),
            Poll::Pending => this.poll_stall(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What a client connection's parking and idle checks need to know of it, updated by its
/// [`Parkable`] socket and the [`Busy`] guards of its requests. One worker thread touches it
/// in production, but an HTTP/2 connection's streams are tasks of their own, which a test's
/// multi-threaded runtime may run elsewhere: the request counts are read-modify-writes.
#[derive(Default)]
pub(crate) struct Activity {
    /// Reads and writes that moved bytes: unchanged over a while means quiet.
    ticks: AtomicU64,
    /// Bytes read from the client.
    read: AtomicU64,
    /// Requests whose response is not over (their exchange is alive).
    busy: AtomicUsize,
    /// Requests started on the connection.
    requests: AtomicU64,
    /// The connection is being parked: a shutdown of the socket is not passed on.
    parking: AtomicBool,
    /// The last request came with a body: the connection is not parked (hyper may not have
    /// read all of it, and what is left must never be read as a request).
    had_body: AtomicBool,
    /// Bytes were read since the last request started: part of the next head, which hyper
    /// will not give up (asked to stop, it would serve that request with `Connection: close`).
    read_since_request: AtomicBool,
    /// Response streams waiting for the client to take their data (`server::serve_with`'s
    /// connections; `None` on plain HTTP/1 ones, whose socket's `StallGuard` sees a client
    /// that stopped reading).
    owed: Option<Box<Owed>>,
    /// The gateway gave up on the client, which stopped reading for the write timeout: what
    /// the connection then cuts short is `client_write_timeout`, not `client_closed`.
    stopped_reading: AtomicBool,
    /// A request's `101` handed the connection's socket to a tunnel: it is not the
    /// connection's to linger on any more.
    upgraded: AtomicBool,
}

impl Activity {
    /// For a connection whose response streams are watched for a client that stopped
    /// reading them ([`Owed`]), and whose resets for rapid reset (`rule`).
    pub fn watching_streams(rule: crate::config::settings::PrematureResets) -> Activity {
        Activity {
            owed: Some(Box::new(Owed {
                resets: super::resets::Resets::new(rule),
                ..Owed::default()
            })),
            ..Activity::default()
        }
    }

    pub fn owed(&self) -> Option<&Owed> {
        self.owed.as_deref()
    }

    fn tick(&self) {
        // Only this connection's worker writes it: no read-modify-write needed.
        self.ticks
            .store(self.ticks.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// No request running, the last one had no body, and nothing was read since it started.
    pub fn idle(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
            && !self.had_body.load(Ordering::Relaxed)
            && !self.read_since_request.load(Ordering::Relaxed)
    }

    /// See the field.
    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// The last request came with a body (hyper may not have read all of it).
    pub fn had_body(&self) -> bool {
        self.had_body.load(Ordering::Relaxed)
    }

    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Ordering::Relaxed);
    }

    /// A request starts (with a body or not); it counts as running until the guard is dropped
    /// (with its exchange, when the response is over).
    pub fn busy(self: &Arc<Self>, has_body: bool) -> Busy {
        self.had_body.store(has_body, Ordering::Relaxed);
        self.read_since_request.store(false, Ordering::Relaxed);
        if self.busy.fetch_add(1, Ordering::Relaxed) == 0
            && let Some(o) = &self.owed
            && o.sleeping.swap(false, Ordering::Relaxed)
        {
            o.wake.notify_one();
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// No request running: between responses, when the next head is awaited.
    pub fn between_requests(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
    }

    /// The connection is closed because its client stopped reading for the write timeout: a
    /// write stalled ([`StallGuard`]), or an HTTP/2 stream's data waited unread (`Owed`).
    pub fn client_stopped_reading(&self) {
        self.stopped_reading.store(true, Ordering::Relaxed);
    }

    /// `e`, from a write to the client: the write timeout's, noted as above.
    fn note_write_error(&self, e: &io::Error) {
        if is_write_stall(e).is_some() {
            self.client_stopped_reading();
        }
    }
}

/// A running request of a client connection (see [`Activity::busy`]).
pub(crate) struct Busy(Arc<Activity>);

impl Busy {
    pub fn owed(&self) -> Option<&Owed> {
        self.0.owed()
    }

    /// See [`Activity::client_stopped_reading`].
    pub fn client_stopped_reading(&self) -> bool {
        self.0.stopped_reading.load(Ordering::Relaxed)
    }

    /// The request's `101` hands the connection's socket to a tunnel (see `Activity`).
    pub fn upgrade(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }
}

/// Epochs kept apart in [`Owed`]; more than any lag [`Owed::advance`] is asked for.
pub(crate) const OWED_RING: usize = 64;

/// Response bodies that gave hyper data which hyper has not come back for: on HTTP/2 it
/// polls a body again only once the client's flow-control window has room, so a client that
/// never opens its window (or stops reading one stream) would hold the stream, and the
/// upstream connection behind it, for ever while its socket stays busy with other frames.
/// Counted by the epoch in which each began to wait (a ring of counters: no allocation, no
/// lock per frame); the connection's watchdog advances the epoch and reads the counter of
/// the epoch its lag ago.
pub(crate) struct Owed {
    epoch: AtomicU64,
    waiting: [AtomicUsize; OWED_RING],
    /// Told when a stream opens while the connection's watchdog sleeps until the idle limit
    /// (`sleeping`); while streams are open it looks every epoch and needs no telling.
    pub wake: tokio::sync::Notify,
    pub sleeping: AtomicBool,
    /// The connection's streams and those its client reset early (HTTP/2 rapid reset).
    pub resets: super::resets::Resets,
}

impl Default for Owed {
    fn default() -> Owed {
        Owed {
            epoch: AtomicU64::new(0),
            waiting: std::array::from_fn(|_| AtomicUsize::new(0)),
            wake: tokio::sync::Notify::new(),
            sleeping: AtomicBool::new(false),
            resets: Default::default(),
        }
    }
}

impl Owed {
    /// A body gave hyper data: it waits from now (the returned epoch) until [`Owed::paid`].
    pub fn owe(&self) -> u64 {
        let e = self.epoch.load(Ordering::Relaxed);
        self.waiting[(e % OWED_RING as u64) as usize].fetch_add(1, Ordering::Relaxed);
        e
    }

    /// The body that began to wait in `epoch` was polled again (or dropped).
    pub fn paid(&self, epoch: u64) {
        self.waiting[(epoch % OWED_RING as u64) as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// Starts the next epoch; whether a body has been waiting since `lag` epochs ago (a body
    /// still waiting then has waited at least `lag - 1` whole epochs, less those by which its
    /// stamp lagged). `lag` is below [`OWED_RING`].
    pub fn advance(&self, lag: u64) -> bool {
        debug_assert!(lag > 0 && lag < OWED_RING as u64);
        let e = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        e >= lag
            && self.waiting[((e - lag) % OWED_RING as u64) as usize].load(Ordering::Relaxed) > 0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client socket served by hyper that can be taken back: bytes read before (`prefix`, what
/// hyper had read but not parsed when the connection was last taken back) come first, reads
/// and writes are counted in [`Activity`], and while the connection is being parked, a
/// shutdown is not passed on, so hyper's end of the connection leaves the socket open.
pub(crate) struct Parkable<T> {
    inner: T,
    prefix: Bytes,
    activity: Arc<Activity>,
}

impl<T> Parkable<T> {
    pub fn new(inner: T, prefix: Bytes, activity: Arc<Activity>) -> Self {
        Parkable {
            inner,
            prefix,
            activity,
        }
    }

    /// The socket, and what of `prefix` hyper did not read.
    pub fn into_inner(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Parkable<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let a = &this.activity;
            let n = (buf.filled().len() - before) as u64;
            // The connection's own task is the only reader: no read-modify-write needed.
            a.read
                .store(a.read.load(Ordering::Relaxed) + n, Ordering::Relaxed);
            a.tick();
            this.activity
                .read_since_request
                .store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Parkable<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))
            .inspect_err(|e| this.activity.note_write_error(e))?;
        this.activity.tick();
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))
            .inspect_err(|e| this.activity.note_write_error(e))?;
        this.activity.tick();
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        Poll::Ready(r.inspect_err(|e| this.activity.note_write_error(e)))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A non-blocking `MSG_PEEK` of up to `buf.len()` bytes of socket `fd` (0: the peer closed).
/// A peek never consumes data, so even a stale descriptor number could not disturb another
/// socket.
pub(crate) fn peek(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_now(fd, buf, libc::MSG_PEEK)
}

/// A non-blocking recv(2) of up to `buf.len()` bytes of socket `fd` with `flags` (0: the peer
/// closed; `WouldBlock`: nothing there yet).
pub(crate) fn recv_now(fd: std::os::fd::RawFd, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length; MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Whether an error chain contains a [`WriteStalled`].
pub(crate) fn is_write_stall(err: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(s) = e.downcast_ref::<WriteStalled>() {
            return Some(s.timeout);
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(s) = io.get_ref().and_then(|i| i.downcast_ref::<WriteStalled>())
        {
            return Some(s.timeout);
        }
        cur = e.source();
    }
    None
}
