//! Streaming bodies. Neither direction is ever buffered whole: frames pass through as they
//! arrive, so memory per request is bounded by hyper's buffers, whatever the body size.
//!
//! `RequestBody` enforces `max_request_body_bytes` on the fly (for chunked bodies whose size is
//! unknown up front) and says when the client's body has ended, which starts the response
//! timeout. `ResponseBody` enforces the response timeout between reads of the upstream body,
//! hands the upstream connection back to the pool when the body ends, and writes the access log
//! line when the client side is done with it.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use thiserror::Error;
use tokio::{sync::oneshot, time::Sleep};

use super::{
    Shared,
    access_log::Exchange,
    cluster::{Cluster, Endpoint},
    error::ErrorKind,
    pool::UpstreamConn,
};

/// Why the request body stopped flowing to the upstream.
#[derive(Debug, Error)]
pub(crate) enum RequestBodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("client request body: {0}")]
    Downstream(#[source] hyper::Error),
}

/// The client's request body on its way upstream.
pub(crate) struct RequestBody {
    inner: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
    done: Option<oneshot::Sender<()>>,
}

impl RequestBody {
    /// Returns the body, and for a body that is not empty, a receiver told when it has been
    /// read to the end (or has failed).
    pub fn new(inner: Incoming, limit: Option<u64>) -> (Self, Option<oneshot::Receiver<()>>) {
        let (done, rx) = if inner.is_end_stream() {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        (
            RequestBody {
                inner: Some(inner),
                limit,
                seen: 0,
                done,
            },
            rx,
        )
    }

    /// No body, for replaying a bodiless request.
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            limit: None,
            seen: 0,
            done: None,
        }
    }

    fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(limit) = this.limit
                        && this.seen > limit
                    {
                        this.inner = None;
                        this.done = None;
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit })));
                    }
                }
                if this.inner.as_ref().is_some_and(Body::is_end_stream) {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = None;
                Poll::Ready(Some(Err(RequestBodyError::Downstream(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// An upstream connection lent to one request, with the endpoint's in-flight count.
pub(crate) struct Lease {
    pub conn: UpstreamConn,
    pub endpoint: Arc<Endpoint>,
    pub idle_timeout: Duration,
    pub _in_flight: InFlight,
}

/// Counts a request in flight to an endpoint, for least-request balancing.
pub(crate) struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn new(ep: &Arc<Endpoint>) -> Self {
        ep.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(ep.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What happens when the response is over: the access log line, and the connection's return.
pub(crate) struct Finish {
    pub exchange: Exchange,
    pub shared: Arc<Shared>,
    pub lease: Option<Lease>,
}

impl Finish {
    fn release(&mut self) {
        if let Some(l) = self.lease.take() {
            Cluster::release(l.endpoint, l.conn, l.idle_timeout);
        }
    }
}

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
    finish: Option<Box<Finish>>,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream body stalled for longer than the response timeout.
#[derive(Debug, Error)]
#[error("upstream response body stalled for {} ms", .0.as_millis())]
pub(crate) struct BodyStalled(Duration);

impl ResponseBody {
    pub(crate) fn upstream(body: Incoming, stall: Duration, finish: Box<Finish>) -> Self {
        ResponseBody {
            kind: Kind::Upstream {
                body,
                stall,
                timer: None,
                armed: false,
            },
            done: false,
            finish: Some(finish),
        }
    }

    pub(crate) fn full(bytes: Bytes, finish: Option<Box<Finish>>) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(bytes)),
            done: false,
            finish,
        }
    }

    fn on_end(&mut self) {
        self.done = true;
        if let Some(f) = self.finish.as_mut() {
            f.release();
        }
    }

    fn on_error(&mut self, kind: ErrorKind) {
        if let Some(f) = self.finish.as_mut() {
            f.exchange.error.get_or_insert(kind);
            // The connection is mid-response: dropping it closes it.
            f.lease = None;
        }
    }

    fn count(&mut self, n: usize) {
        if let Some(f) = self.finish.as_mut() {
            f.exchange.bytes += n as u64;
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
        let Some(mut f) = self.finish.take() else {
            return;
        };
        if !self.done && Body::is_end_stream(self) {
            // An empty body (or HEAD) that hyper never polled.
            f.release();
        } else if !self.done && f.exchange.error.is_none() {
            // The client went away before the end of the response.
            f.exchange.aborted = true;
        }
        f.shared.telemetry.request_done(&f.exchange);
        f.shared.log.log(&f.exchange);
    }
}
