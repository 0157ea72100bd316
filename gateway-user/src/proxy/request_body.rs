//! The client's request body on its way upstream, streamed frame by frame, never buffered
//! whole: memory per request is bounded by hyper's buffers, whatever the body size.
//!
//! It enforces `max_request_body_bytes` on the fly (for chunked bodies whose size is unknown
//! up front), counts the bytes (the access log's `request_bytes`) and says when the client's
//! body has ended, which starts the response timeout ([`Progress`]).
//!
//! So that a request can be sent again after an attempt failed (see `decide::retry`), the
//! frames of a small body are also [`Kept`] as they pass (references to the same buffers, not
//! copies), up to [`REPLAY_BODY_LIMIT`]; a larger body cannot be replayed.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use thiserror::Error;
use tokio::sync::Notify;

/// Tells the body's [`Progress`] it ended when dropped: at its end, on an error, or when the
/// body is dropped unfinished (a failed attempt).
#[derive(Debug)]
struct Ended(Arc<Progress>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended.notify_one();
    }
}

/// A body's way upstream, as the request path watches it: the bytes read from the client so
/// far, and a notification when the body ended (or failed, or was dropped unfinished).
#[derive(Debug, Default)]
pub(crate) struct Progress {
    bytes: AtomicU64,
    ended: Notify,
}

impl Progress {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Completes once the body ended (at once if it already has).
    pub async fn ended(&self) {
        self.ended.notified().await;
    }
}

/// Why the request body stopped flowing to the upstream.
#[derive(Debug, Error)]
pub(crate) enum RequestBodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("client request body: {0}")]
    Downstream(#[source] hyper::Error),
}

/// The largest request body kept for a replay.
pub(crate) const REPLAY_BODY_LIMIT: u64 = 64 * 1024;

/// A body's frames as they passed, for sending it again.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    frames: Vec<Bytes>,
    len: u64,
    complete: bool,
    /// Past [`REPLAY_BODY_LIMIT`] (or failed): nothing kept.
    given_up: bool,
}

pub(crate) type KeptBody = Arc<Mutex<Kept>>;

fn lock(k: &KeptBody) -> std::sync::MutexGuard<'_, Kept> {
    k.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The client's request body on its way upstream.
pub(crate) struct RequestBody {
    inner: Option<Incoming>,
    /// A replayed body's frames, in order.
    replayed: std::vec::IntoIter<Bytes>,
    limit: Option<u64>,
    seen: u64,
    /// Told once, when the body ends (or this is dropped); `None` after that (and for a
    /// replay).
    done: Option<Ended>,
    keep: Option<KeptBody>,
}

impl RequestBody {
    /// Returns the body, and for a body that is not empty, its [`Progress`].
    pub fn new(inner: Incoming, limit: Option<u64>) -> (Self, Option<Arc<Progress>>) {
        let (done, rx) = if inner.is_end_stream() {
            (None, None)
        } else {
            let p = Arc::new(Progress::default());
            (Some(Ended(p.clone())), Some(p))
        };
        (
            RequestBody {
                inner: Some(inner),
                replayed: Vec::new().into_iter(),
                limit,
                seen: 0,
                done,
                keep: None,
            },
            rx,
        )
    }

    /// No body, for replaying a bodiless request.
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            replayed: Vec::new().into_iter(),
            limit: None,
            seen: 0,
            done: None,
            keep: None,
        }
    }

    /// Keeps the frames as they pass (up to [`REPLAY_BODY_LIMIT`]); the handle tells, later,
    /// whether the whole body was kept.
    pub fn keep(&mut self) -> KeptBody {
        let k = KeptBody::default();
        self.keep = Some(k.clone());
        k
    }

    /// The body again, if all of it was kept.
    pub fn replay(kept: &KeptBody) -> Option<RequestBody> {
        let k = lock(kept);
        (k.complete && !k.given_up).then(|| RequestBody {
            replayed: k.frames.clone().into_iter(),
            ..RequestBody::empty()
        })
    }

    fn finish(&mut self) {
        self.ended();
        if let Some(k) = self.keep.take() {
            lock(&k).complete = true;
        }
    }

    /// Keeps `data` if the copy is still within its limit.
    fn kept(&mut self, data: &Bytes) {
        let Some(k) = &self.keep else { return };
        let mut k = lock(k);
        k.len += data.len() as u64;
        if k.len > REPLAY_BODY_LIMIT {
            k.given_up = true;
            k.frames = Vec::new();
            drop(k);
            self.keep = None;
        } else {
            k.frames.push(data.clone());
        }
    }

    /// Tells the request path the body is over (ended or failed).
    fn ended(&mut self) {
        self.done = None;
    }

    fn give_up_keeping(&mut self) {
        if let Some(k) = self.keep.take() {
            lock(&k).given_up = true;
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
            return Poll::Ready(this.replayed.next().map(|b| Ok(Frame::data(b))));
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(p) = &this.done {
                        p.0.bytes.store(this.seen, Ordering::Relaxed);
                    }
                    if let Some(limit) = this.limit
                        && this.seen > limit
                    {
                        this.inner = None;
                        this.ended();
                        this.give_up_keeping();
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit })));
                    }
                    this.kept(data);
                } else {
                    // Trailers are not kept: such a body is not replayed.
                    this.give_up_keeping();
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
                this.ended();
                this.give_up_keeping();
                Poll::Ready(Some(Err(RequestBodyError::Downstream(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(i) => i.is_end_stream(),
            None => self.replayed.len() == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(i) => i.size_hint(),
            None => SizeHint::with_exact(
                self.replayed
                    .as_slice()
                    .iter()
                    .map(|b| b.len() as u64)
                    .sum(),
            ),
        }
    }
}
