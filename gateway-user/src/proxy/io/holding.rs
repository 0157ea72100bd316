//! A socket that carries a guard for as long as it lives.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::delegate::delegate_async_write;

/// A socket and a guard that lives exactly as long as it: a client connection's place in
/// `max_client_connections` and its worker's count (`admission::Permit`). Whoever ends up
/// with the socket holds the place, hyper's connection or, once the connection is upgraded,
/// the tunnel that owns hyper's `Upgraded`.
pub(crate) struct Holding<T, G> {
    inner: T,
    guard: G,
}

impl<T, G> Holding<T, G> {
    pub fn new(inner: T, guard: G) -> Self {
        Holding { inner, guard }
    }

    pub fn into_parts(self) -> (T, G) {
        (self.inner, self.guard)
    }
}

impl<T: AsyncRead + Unpin, G: Unpin> AsyncRead for Holding<T, G> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Holding<T, G> {
    delegate_async_write!(inner);
}
