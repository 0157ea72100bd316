//! `StallGuard`: a socket wrapper that turns a write making no progress for too long into an
//! error, on both sides of the proxy.
//!
//! A write is pending only when the peer's receive window is full, i.e. the peer stopped
//! reading (or the path died). Reads are not guarded here: an idle keep-alive connection
//! legitimately waits forever for its next read, so read deadlines live where the protocol
//! knows a read is due (header-read timeout, response timeout).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

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
