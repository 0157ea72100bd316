//! The body sent to the client: the upstream's, streamed frame by frame (never buffered whole),
//! or a gateway-made one. It enforces the response timeout between reads of the upstream body,
//! hands the upstream connection back to the pool when the body ends, and finishes the request
//! (metrics, access log) when the client side is done with it. It owns the request's
//! [`Exchange`].

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use thiserror::Error;
use tokio::time::Sleep;

use super::{error::ErrorKind, exchange::Exchange};

enum Kind {
    Upstream {
        body: Incoming,
        /// The response timeout, between two reads of the upstream body.
        stall: Duration,
        timer: Option<Pin<Box<Sleep>>>,
        armed: bool,
    },
    Full(Option<Bytes>),
}

/// The body sent to the client.
pub struct ResponseBody {
    kind: Kind,
    done: bool,
    exchange: Option<Box<Exchange>>,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream body stalled for longer than the response timeout.
#[derive(Debug, Error)]
#[error("upstream response body stalled for {} ms", .0.as_millis())]
pub(crate) struct BodyStalled(Duration);

impl ResponseBody {
    pub(crate) fn upstream(body: Incoming, stall: Duration, exchange: Box<Exchange>) -> Self {
        ResponseBody {
            kind: Kind::Upstream {
                body,
                stall,
                timer: None,
                armed: false,
            },
            done: false,
            exchange: Some(exchange),
        }
    }

    pub(crate) fn full(bytes: Bytes, exchange: Option<Box<Exchange>>) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(bytes)),
            done: false,
            exchange,
        }
    }

    fn on_end(&mut self) {
        self.done = true;
        if let Some(ex) = self.exchange.as_mut() {
            ex.release();
        }
    }

    fn on_error(&mut self, kind: ErrorKind) {
        if let Some(ex) = self.exchange.as_mut() {
            ex.record.error.get_or_insert(kind);
            // The connection is mid-response: dropping it closes it.
            ex.lease = None;
        }
    }

    fn count(&mut self, n: usize) {
        if let Some(ex) = self.exchange.as_mut() {
            ex.record.bytes += n as u64;
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Full(bytes) => match bytes.take() {
                Some(b) => {
                    let n = b.len();
                    this.count(n);
                    this.on_end();
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => Poll::Ready(None),
            },
            Kind::Upstream {
                body,
                stall,
                timer,
                armed,
            } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    *armed = false;
                    let end = body.is_end_stream();
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    this.count(n);
                    if end {
                        this.on_end();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    this.on_end();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    this.on_error(ErrorKind::UpstreamReset);
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Pending => {
                    let deadline = tokio::time::Instant::now() + *stall;
                    let t =
                        timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if !*armed {
                        t.as_mut().reset(deadline);
                        *armed = true;
                    }
                    if t.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let stall = *stall;
                    this.on_error(ErrorKind::ResponseTimeout);
                    Poll::Ready(Some(Err(Box::new(BodyStalled(stall)))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let Some(mut ex) = self.exchange.take() else {
            return;
        };
        let empty = !self.done && Body::is_end_stream(self);
        if empty {
            // An empty body (or HEAD) that hyper never polled.
            ex.release();
        }
        ex.finish(self.done || empty);
    }
}
