//! An upstream connection (HTTP/1, or any under TLS) whose upstream may answer before it has
//! read the whole request: `413` for a body too large, `401` before an upload, and then close.
//! Its kernel answers the rest of the body with a reset, and hyper's next write fails (`EPIPE`,
//! `ECONNRESET`). hyper takes that failure for the exchange's, though the response may be
//! waiting in the socket: the client got `502 upstream_reset` where the upstream had answered
//! (4 of 5 times for a 3 MB upload in a black-box test).
//!
//! Here, once a write fails so, further writes are taken and dropped (up to
//! [`DISCARD_MAX_BYTES`]) so that hyper goes on to read: a response waiting is delivered, and
//! without one the read fails at once (the reset, or the end of the stream), as the exchange's
//! failure, the same `upstream_reset`. Bytes written to a connection that reset were lost
//! anyway. A tunnel (an upgraded connection) whose upstream reset it ends on its read side;
//! until then, what its client sends is dropped (at most the same 1 MiB). Ending the room at
//! the first read that finds the end of the stream, as a review suggested, was tried and left
//! out: in one test run a client got `100 Continue` and then nothing.
//!
//! Reads after the failure go to the socket itself (`recv`, non-blocking): tokio learns that
//! the socket is readable only when its driver next polls the kernel, and a task busy taking
//! the client's body never gave it the chance. hyper took the response for not there yet and
//! went on writing until the room above was spent.
//!
//! So it takes two layers: [`EarlyResponse`], next to hyper, takes and drops hyper's writes
//! and yields to its reads, and [`ReadsAfterReset`], on the TCP socket, passes the failure up
//! and then reads the socket itself. On a plain connection they sit one on the other; over
//! TLS rustls is between them, so that what the upstream sent reaches rustls to be decrypted.
//! One layer under rustls would not do: rustls
//! takes hyper's plaintext into its own buffer whatever the socket below says, so the yield
//! never reached hyper (1 upload of 80 still got `502` so; 0 of 880 with the two layers).
//! Before either, an upstream over HTTPS that answered early got `502` for 51 uploads of 60.
//! An HTTP/2 connection has them only under TLS, where ALPN chooses the protocol after the
//! layers are set; over h2c a failed write fails as it is.
//!
//! After the failure, a write first yields once (waking the task at once) unless hyper read
//! since the previous one. hyper's connection writes the request body in a loop that reads
//! nothing while the body has data ready: a client that sent faster than the upstream took (an
//! HTTP/2 client with a 1 MiB window) filled the whole room in one turn of that loop, and got
//! `502 upstream_reset` though the `413` waited in the socket (about 1 upload in 150, 1 in 100
//! over HTTP/2, in `proxy_early_response`; the trace showed no read between the failure and
//! the room spent).

use std::{
    io,
    os::fd::RawFd,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes taken and dropped after the write failed, before its error is returned
/// after all (a read that would fail at once does not, somehow).
pub(crate) const DISCARD_MAX_BYTES: usize = 1024 * 1024;

pub(crate) struct EarlyResponse<T> {
    inner: T,
    /// The failure of the first write that failed, and what may still be dropped.
    failed: Option<(io::ErrorKind, usize)>,
    /// After the failure: hyper read since the last write was taken.
    read_since: bool,
    /// After the failure: the last write yielded (see [`EarlyResponse::yield_to_read`]).
    yielded: bool,
}

impl<T> EarlyResponse<T> {
    /// `inner` a socket wrapped in [`ReadsAfterReset`], or a TLS stream over one.
    pub fn new(inner: T) -> Self {
        EarlyResponse {
            inner,
            failed: None,
            read_since: false,
            yielded: false,
        }
    }

    /// The stream under it (the TLS stream, for its ALPN).
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// After the failure: `Pending` once (the task woken at once) when hyper has not read since
    /// the last write was taken, so that its connection goes round to read the response. Only
    /// once in a row: a connection that reads no more (its read side closed) would otherwise
    /// spin; it gets every other write taken, until the room is spent.
    fn yield_to_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let go = self.read_since || self.yielded;
        (self.read_since, self.yielded) = (false, false);
        if go {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A write's result, the failure above turned into a write taken, while there is room.
    fn written(&mut self, r: io::Result<usize>, len: usize) -> io::Result<usize> {
        match r {
            Ok(n) => Ok(n),
            Err(e) if self.took(&e) => self.dropped(len),
            Err(e) => Err(e),
        }
    }

    /// A flush's or a shutdown's result, the failure turned into success. Over TLS they write:
    /// the records rustls still holds, which it held because the upstream had stopped reading.
    fn flushed(&mut self, r: io::Result<()>) -> io::Result<()> {
        match r {
            Err(e) if !self.took(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether `e` is the failure, now noted.
    fn took(&mut self, e: &io::Error) -> bool {
        let first = self.failed.is_none() && is_reset(e);
        if first {
            self.failed = Some((e.kind(), DISCARD_MAX_BYTES));
        }
        first
    }

    /// After the failure: `len` bytes taken and dropped, or the failure once there is no room.
    fn dropped(&mut self, len: usize) -> io::Result<usize> {
        match &mut self.failed {
            Some((_, room)) if *room >= len => {
                *room -= len;
                Ok(len)
            }
            Some((kind, _)) => Err(io::Error::new(
                *kind,
                "the upstream stopped taking the request and sent no response",
            )),
            None => Ok(len),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for EarlyResponse<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some((kind, _)) = this.failed else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        this.read_since = true;
        // The failed write took the socket's error: over TLS, what follows is the end of the
        // stream, which rustls calls a close without `close_notify`. It was the reset.
        match std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf)) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Err(io::Error::new(kind, e)))
            }
            r => Poll::Ready(r),
        }
    }
}

/// A write failure after which the upstream's answer may still wait in the socket.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// After the failure: what socket `fd` holds, without waiting; `None` when it holds nothing
/// yet (the socket's own readiness then wakes the task).
fn recv_now(fd: RawFd, buf: &mut ReadBuf<'_>) -> Option<io::Result<()>> {
    match super::recv_now(fd, buf.initialize_unfilled(), 0) {
        Ok(n) => {
            buf.advance(n);
            Some(Ok(()))
        }
        Err(e) => (e.kind() != io::ErrorKind::WouldBlock).then_some(Err(e)),
    }
}

/// The TCP socket `fd` under an [`EarlyResponse`] (with rustls between them over TLS): a write
/// that fails with a reset fails as it is (over TLS, tokio-rustls passes it up from a write, a
/// flush or a shutdown), for the layer above to take, and from then on a read asks the socket
/// itself first.
pub(crate) struct ReadsAfterReset<T> {
    inner: T,
    fd: RawFd,
    reset: bool,
}

impl<T> ReadsAfterReset<T> {
    pub fn new(inner: T, fd: RawFd) -> Self {
        ReadsAfterReset {
            inner,
            fd,
            reset: false,
        }
    }

    fn written(&mut self, r: io::Result<usize>) -> io::Result<usize> {
        if r.as_ref().is_err_and(is_reset) {
            self.reset = true;
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadsAfterReset<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset
            && let Some(r) = recv_now(this.fd, buf)
        {
            return Poll::Ready(r);
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadsAfterReset<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf));
        Poll::Ready(this.written(r))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs));
        Poll::Ready(this.written(r))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for EarlyResponse<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.failed.is_some() {
            std::task::ready!(this.yield_to_read(cx));
            return Poll::Ready(this.dropped(buf.len()));
        }
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf));
        Poll::Ready(this.written(r, buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.failed.is_some() {
            std::task::ready!(this.yield_to_read(cx));
            return Poll::Ready(this.dropped(len));
        }
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs));
        Poll::Ready(this.written(r, len))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_flush(cx));
        Poll::Ready(this.flushed(r))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        let r = std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
        Poll::Ready(this.flushed(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_write_is_taken_until_the_room_is_spent_then_fails() {
        let mut e = EarlyResponse::new(());
        assert_eq!(e.written(Ok(5), 10).unwrap(), 5);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(e.written(Err(reset), 10).unwrap(), 10);
        assert_eq!(
            e.dropped(DISCARD_MAX_BYTES - 10).unwrap(),
            DISCARD_MAX_BYTES - 10
        );
        let err = e.dropped(1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        // Other failures are returned as they are.
        let mut e = EarlyResponse::new(());
        let other = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(
            e.written(Err(other), 1).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert!(e.failed.is_none());
    }

    #[test]
    fn a_reset_flush_is_the_failure_too() {
        // Over TLS a flush writes the records rustls holds: its reset is taken as a write's.
        let mut e = EarlyResponse::new(());
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(e.flushed(Err(reset)).is_ok());
        assert_eq!(
            e.failed,
            Some((io::ErrorKind::ConnectionReset, DISCARD_MAX_BYTES))
        );
        // Other failures are returned as they are, and only the first reset is taken.
        let mut e = EarlyResponse::new(());
        let other = io::Error::from(io::ErrorKind::TimedOut);
        assert!(e.flushed(Err(other)).is_err());
        assert!(e.failed.is_none());
        assert!(e.flushed(Ok(())).is_ok());
    }

    #[test]
    fn under_tls_a_reset_write_fails_as_it_is_and_turns_reads_to_the_socket() {
        let mut r = ReadsAfterReset::new((), -1);
        assert_eq!(r.written(Ok(3)).unwrap(), 3);
        let timeout = io::Error::from(io::ErrorKind::TimedOut);
        assert!(r.written(Err(timeout)).is_err());
        assert!(!r.reset);
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        assert_eq!(
            r.written(Err(pipe)).unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        assert!(r.reset);
    }

    #[test]
    fn after_the_failure_a_write_yields_to_a_read_but_never_twice_in_a_row() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut e = EarlyResponse::new(());
        // Before any failure, writes never yield.
        assert!(e.failed.is_none());
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(e.written(Err(reset), 10).unwrap(), 10);
        // No read since: the next write yields once, then goes ahead (no spin when the
        // connection reads no more).
        assert!(e.yield_to_read(&mut cx).is_pending());
        assert!(e.yield_to_read(&mut cx).is_ready());
        assert!(e.yield_to_read(&mut cx).is_pending());
        assert!(e.yield_to_read(&mut cx).is_ready());
        // A read in between: the write goes ahead at once.
        e.read_since = true;
        assert!(e.yield_to_read(&mut cx).is_ready());
        assert!(e.yield_to_read(&mut cx).is_pending());
        // Yielded, then a read: the write goes ahead, and the next one yields again.
        e.read_since = true;
        assert!(e.yield_to_read(&mut cx).is_ready());
        assert!(e.yield_to_read(&mut cx).is_pending());
    }
}
