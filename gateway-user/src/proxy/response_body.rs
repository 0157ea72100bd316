//! The body sent to the client: the upstream's, streamed frame by frame (never buffered whole),
//! trailers included, or a gateway-made one. It enforces the response timeout between reads of
//! the upstream body (and a gRPC call's deadline), hands the upstream connection back to the
//! pool when the body ends, and finishes the request (metrics, access log) when the client side
//! is done with it. It owns the request's [`Exchange`].
//!
//! A gRPC call whose upstream body fails or stalls ends with trailers the gateway writes —
//! `grpc-status` 14 (UNAVAILABLE) for a connection that broke, 4 (DEADLINE_EXCEEDED) for a
//! timer — instead of a reset stream, so that the client sees a status and a reason.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use thiserror::Error;
use tokio::time::{Instant, Sleep};

use super::{classify, error::ErrorKind, exchange::Exchange};
use crate::decide::grpc::{self, GrpcCode};

enum Kind {
    Upstream {
        body: Incoming,
        /// The response timeout, between two reads of the upstream body.
        stall: Duration,
        /// A gRPC call's deadline (`grpc-timeout`), for the whole body.
        call_deadline: Option<Instant>,
        timer: Option<Pin<Box<Sleep>>>,
        armed: bool,
        /// What is left of an upstream frame handed on in pieces ([`OWED_PIECE`]).
        rest: Bytes,
    },
    Full(Option<Bytes>),
    /// The gateway's trailers ending a failed gRPC response, then the end.
    Trailers(Option<HeaderMap>),
}

/// The body sent to the client.
pub struct ResponseBody {
    kind: Kind,
    done: bool,
    exchange: Option<Box<Exchange>>,
    /// The epoch since which hyper has had this body's last frame and not come back for the
    /// next (`io::Owed`: the client connection's watchdog closes a connection whose client
    /// leaves a stream waiting longer than the write timeout).
    owed: Option<u64>,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most of an upstream frame handed to hyper at once on a connection whose streams are
/// watched (`io::Owed`): hyper comes back for the next piece once the client's window has room
/// for what is left of the last, so a large piece would make a client that reads slowly, but
/// reads, look stalled. HTTP/2's default frame size.
const OWED_PIECE: usize = 16 * 1024;

/// The upstream body stalled for longer than the response timeout.
#[derive(Debug, Error)]
#[error("upstream response body stalled for {} ms", .0.as_millis())]
pub(crate) struct BodyStalled(Duration);

/// A gRPC call's deadline passed while its response streamed.
#[derive(Debug, Error)]
#[error("the call's deadline (grpc-timeout) passed before the end of the response")]
pub(crate) struct CallDeadline;

impl ResponseBody {
    pub(crate) fn upstream(
        body: Incoming,
        stall: Duration,
        call_deadline: Option<Instant>,
        exchange: Box<Exchange>,
    ) -> Self {
        ResponseBody {
            kind: Kind::Upstream {
                body,
                stall,
                call_deadline,
                timer: None,
                armed: false,
                rest: Bytes::new(),
            },
            done: false,
            exchange: Some(exchange),
            owed: None,
        }
    }

    /// No body at all (the head ends the stream: a gRPC trailers-only answer).
    pub(crate) fn headers_only(exchange: Box<Exchange>) -> Self {
        ResponseBody {
            kind: Kind::Full(None),
            done: false,
            exchange: Some(exchange),
            owed: None,
        }
    }

    /// No body, no request to finish (a `101`, whose tunnel owns the exchange).
    pub(crate) fn empty() -> Self {
        ResponseBody {
            kind: Kind::Full(None),
            done: true,
            exchange: None,
            owed: None,
        }
    }

    pub(crate) fn full(bytes: Bytes, exchange: Option<Box<Exchange>>) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(bytes)),
            done: false,
            exchange,
            owed: None,
        }
    }

    fn on_end(&mut self) {
        self.done = true;
        if let Some(ex) = self.exchange.as_mut() {
            ex.release();
        }
    }

    /// The upstream body failed: the error for the client, or, for a gRPC call, the trailers
    /// that end its response with a status.
    fn on_error(
        &mut self,
        kind: ErrorKind,
        e: BoxError,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(ex) = self.exchange.as_mut() else {
            return Poll::Ready(Some(Err(e)));
        };
        ex.record.error.get_or_insert(kind);
        // A gRPC call's own deadline (the only request timeout here) is the client's choice,
        // not the upstream's failure: a reason of its own.
        let reason = match kind {
            ErrorKind::RequestTimeout => super::telemetry::GRPC_DEADLINE_REASON,
            _ => kind.reason(),
        };
        debug_assert!(
            super::telemetry::INCOMPLETE_REASONS.contains(&reason),
            "{reason}: gateway_responses_incomplete_total's series of it would outlive its route"
        );
        ex.record.cut_short = Some(reason);
        // The connection is mid-response: dropping it closes it.
        ex.lease = None;
        let detail = format!("{kind}: {}", classify::with_causes(&*e));
        ex.record.error_detail.get_or_insert_with(|| detail.clone());
        if !ex.grpc {
            return Poll::Ready(Some(Err(e)));
        }
        let code = match kind {
            ErrorKind::UpstreamReset => GrpcCode::UNAVAILABLE,
            ErrorKind::InvalidUpstreamResponse => GrpcCode::INTERNAL,
            _ => GrpcCode::DEADLINE_EXCEEDED,
        };
        ex.record.grpc_status = Some(code.0);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static(code.as_str()));
        let message = match ex.expose {
            crate::config::ExposeErrors::None => None,
            crate::config::ExposeErrors::Reason => Some(format!("gateway: {kind}")),
            crate::config::ExposeErrors::Full => Some(format!("gateway: {detail}")),
        };
        if let Some(v) = message.and_then(|m| HeaderValue::try_from(grpc::encode_message(&m)).ok())
        {
            t.insert("grpc-message", v);
        }
        self.kind = Kind::Trailers(None);
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(t))))
    }

    /// A gRPC call's status from the upstream's trailers, for the log.
    fn trailers_seen(&mut self, t: &HeaderMap) {
        if let Some(ex) = self.exchange.as_mut()
            && ex.grpc
            && let Some(code) = t
                .get("grpc-status")
                .and_then(|v| GrpcCode::parse(v.as_bytes()))
        {
            ex.record.grpc_status = Some(code.0);
        }
    }

    /// hyper has this body's frame: it waits for hyper to come back (`io::Owed`).
    fn owe(&mut self) {
        if let Some(o) = self.exchange.as_ref().and_then(|ex| ex.owed()) {
            self.owed = Some(o.owe());
        }
    }

    /// hyper came back for the next frame, or dropped the body.
    fn pay(&mut self) {
        if let Some(e) = self.owed.take()
            && let Some(o) = self.exchange.as_ref().and_then(|ex| ex.owed())
        {
            o.paid(e);
        }
    }

    /// Hands hyper `piece` of the upstream's data (`end`: the last of the body).
    fn handed(&mut self, piece: Bytes, end: bool) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.count(piece.len());
        if end {
            self.on_end();
        }
        self.owe();
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn count(&mut self, n: usize) {
        if let Some(ex) = self.exchange.as_mut() {
            ex.record.bytes += n as u64;
        }
    }
}

/// The upstream body had nothing: whether it has now stalled for the response timeout (or
/// run past a gRPC call's deadline), with what to report; else the timer is armed.
fn stalled(
    cx: &mut Context<'_>,
    stall: Duration,
    call_deadline: Option<Instant>,
    timer: &mut Option<Pin<Box<Sleep>>>,
    armed: &mut bool,
) -> Option<(ErrorKind, BoxError)> {
    let mut deadline = Instant::now() + stall;
    if let Some(d) = call_deadline {
        deadline = deadline.min(d);
    }
    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if !*armed {
        t.as_mut().reset(deadline);
        *armed = true;
    }
    if t.as_mut().poll(cx).is_pending() {
        return None;
    }
    Some(match call_deadline {
        Some(d) if Instant::now() >= d => (ErrorKind::RequestTimeout, Box::new(CallDeadline)),
        _ => (ErrorKind::ResponseTimeout, Box::new(BodyStalled(stall))),
    })
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // hyper came back for the next frame.
        this.pay();
        let watched = this.exchange.as_ref().is_some_and(|ex| ex.owed().is_some());
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
            Kind::Trailers(t) => Poll::Ready(t.take().map(|t| Ok(Frame::trailers(t)))),
            Kind::Upstream { body, rest, .. } if !rest.is_empty() => {
                let piece = rest.split_to(rest.len().min(OWED_PIECE));
                let end = rest.is_empty() && body.is_end_stream();
                this.handed(piece, end)
            }
            Kind::Upstream {
                body,
                stall,
                call_deadline,
                timer,
                armed,
                rest,
            } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame)))
                    if watched && frame.data_ref().is_some_and(|d| d.len() > OWED_PIECE) =>
                {
                    *armed = false;
                    let mut data = frame.into_data().unwrap_or_default();
                    let piece = data.split_to(OWED_PIECE);
                    *rest = data;
                    this.handed(piece, false)
                }
                Poll::Ready(Some(Ok(frame))) => {
                    *armed = false;
                    // Trailers are a body's last frame, and hyper asks for nothing after
                    // them: an HTTP/1 upstream's body, which says it ended only when polled
                    // once more, would be taken for one the client cut short.
                    let end = body.is_end_stream() || frame.is_trailers();
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    this.count(n);
                    if let Some(t) = frame.trailers_ref() {
                        this.trailers_seen(t);
                    }
                    if end {
                        this.on_end();
                    }
                    this.owe();
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    this.on_end();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => this.on_error(classify::body_error(&e), e.into()),
                Poll::Pending => match stalled(cx, *stall, *call_deadline, timer, armed) {
                    Some((kind, e)) => this.on_error(kind, e),
                    None => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Trailers(t) => t.is_none(),
            Kind::Upstream { body, rest, .. } => rest.is_empty() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) | Kind::Trailers(_) => SizeHint::with_exact(0),
            Kind::Upstream { body, rest, .. } => {
                let mut h = body.size_hint();
                let n = rest.len() as u64;
                h.set_lower(h.lower() + n);
                // A gRPC call's length is not passed on (`respond`): hyper would write it
                // back from an exact hint.
                if self.exchange.as_ref().is_some_and(|e| e.grpc) {
                    let mut open = SizeHint::new();
                    open.set_lower(h.lower());
                    return open;
                }
                if let Some(u) = h.upper() {
                    h.set_upper(u + n);
                }
                h
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.pay();
        let Some(mut ex) = self.exchange.take() else {
            return;
        };
        let empty = !self.done && Body::is_end_stream(self);
        if empty {
            // An empty body (or HEAD) that hyper never polled.
            ex.release();
        }
        // hyper stops polling a body once it has written its `content-length` bytes (and
        // writes none for HEAD, 204 and 304): an HTTP/2 upstream's END_STREAM may still be on
        // its way, in a frame of its own, and the client has had all of it all the same.
        let whole = matches!(self.kind, Kind::Upstream { .. })
            && (Body::size_hint(self).upper() == Some(0)
                || ex.record.method == http::Method::HEAD
                || matches!(ex.record.status, 204 | 304));
        ex.finish(self.done || empty || whole);
    }
}
