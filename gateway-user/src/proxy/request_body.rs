//! The client's request body on its way upstream, streamed frame by frame, never buffered
//! whole: memory per request is bounded by hyper's buffers, whatever the body size.
//!
//! It enforces `max_request_body_bytes` on the fly (for chunked bodies whose size is unknown
//! up front) and says when the client's body has ended, which starts the response timeout.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use thiserror::Error;
use tokio::sync::oneshot;

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
