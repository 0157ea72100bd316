//! The client's request body on its way upstream, streamed frame by frame, never buffered
//! whole: memory per request is bounded by hyper's buffers and the 64 KiB read ahead of the
//! upstream ([`RequestBody::read_ahead`]), whatever the body size.
//!
//! It enforces `max_request_body_bytes` on the fly (for chunked bodies whose size is unknown
//! up front), counts the bytes (the access log's `request_bytes`) and says when the client's
//! body has ended, which starts the response timeout ([`Progress`]).
//!
//! So that a request can be sent again after an attempt failed (see `decide::retry`), the
//! frames of a small body are also [`Kept`] as they are read (references to the same
//! buffers, not copies: for a body read ahead, the buffer it was read into), up to
//! [`REPLAY_BODY_LIMIT`] and within `request_buffering_memory_bytes` with what is read ahead
//! ([`Budget`], [`Charge`]); a larger body, or one the budget has no room for, cannot be
//! replayed.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, atomic::Ordering},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use thiserror::Error;

use self::{ahead::Ahead, progress::Ended};
pub(crate) use self::{
    ahead::{Budget, Charge},
    progress::{BodyFailure, MIN_BODY_RATE, Progress, Slide},
};

mod ahead;
mod progress;

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

/// A body's frames as they passed, for sending it again: references to the same buffers,
/// except small frames, which are copied together (a client sending its body a byte per frame
/// would otherwise cost a `Bytes` per byte).
#[derive(Debug)]
pub(crate) struct Kept {
    frames: Vec<Bytes>,
    /// Small frames since the last one kept by reference, copied.
    tail: BytesMut,
    len: u64,
    complete: bool,
    /// Past [`REPLAY_BODY_LIMIT`], past the budget, or failed: nothing kept.
    given_up: bool,
    /// The bytes kept, as `request_buffering_memory_bytes` counts them.
    charge: Charge,
}

impl Kept {
    fn flush_tail(&mut self) {
        if !self.tail.is_empty() {
            let tail = self.tail.split().freeze();
            self.frames.push(tail);
        }
    }

    /// Nothing is kept, and nothing will be: the bytes are given back to the budget.
    fn give_up(&mut self) {
        self.given_up = true;
        self.frames = Vec::new();
        self.tail = BytesMut::new();
        self.charge.give_back();
    }
}

/// A data frame smaller than this is copied where it is held (kept, read ahead).
const SMALL_FRAME: usize = 1024;

pub(crate) type KeptBody = Arc<Mutex<Kept>>;

fn lock(k: &KeptBody) -> std::sync::MutexGuard<'_, Kept> {
    k.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The client's request body on its way upstream.
///
/// A request is moved by value several times on its way into hyper (and back, unsent), so
/// its body is kept to 32 bytes, which keeps the whole request within 256: a bodiless
/// request, the usual one, carries nothing, and a streamed body is boxed.
pub(crate) enum RequestBody {
    /// No body: the client sent none (its body ended with its head), or a replay of none.
    Empty,
    /// The client's body, read as it is sent.
    Streaming(Box<Streaming>),
    /// A replayed body's frames, in order.
    Replayed(VecDeque<Bytes>),
}

/// The client's body while it streams.
pub(crate) struct Streaming {
    /// `None` once cut at the limit.
    inner: Option<Incoming>,
    /// What [`RequestBody::read_ahead`] read, sent before `inner`'s next frames.
    ahead: Option<Box<Ahead>>,
    /// [`RequestBody::read_ahead`] is running: the end of the client's body is not the end of
    /// what the upstream is sent.
    reading_ahead: bool,
    limit: Option<u64>,
    seen: u64,
    /// Told once, when the body ends (or this is dropped); `None` after that.
    done: Option<Ended>,
    keep: Option<KeptBody>,
    /// The client's body ended (hyper's `is_end_stream` stays false after a chunked body's
    /// end).
    client_ended: bool,
}

impl RequestBody {
    /// Returns the body, and for a body that is not empty, its [`Progress`].
    pub fn new(inner: Incoming, limit: Option<u64>) -> (Self, Option<Arc<Progress>>) {
        if inner.is_end_stream() {
            return (RequestBody::Empty, None);
        }
        let p = Arc::new(Progress::new());
        let body = RequestBody::Streaming(Box::new(Streaming {
            inner: Some(inner),
            ahead: None,
            reading_ahead: false,
            limit,
            seen: 0,
            done: Some(Ended(p.clone())),
            keep: None,
            client_ended: false,
        }));
        (body, Some(p))
    }

    /// No body, for replaying a bodiless request.
    pub fn empty() -> Self {
        RequestBody::Empty
    }

    /// Keeps the frames as they are read (up to [`REPLAY_BODY_LIMIT`], within `budget`); what
    /// is read ahead, once read ahead, as the buffer it was read into. The handle tells, later,
    /// whether the whole body was kept; [`RequestBody::forget`] gives the copy up. Only a
    /// streaming body is kept (the request path asks for no other): the handle of any other is
    /// never complete.
    pub fn keep(&mut self, budget: &Arc<Budget>) -> KeptBody {
        let k = Arc::new(Mutex::new(Kept {
            frames: Vec::new(),
            tail: BytesMut::new(),
            len: 0,
            complete: false,
            given_up: false,
            charge: Charge::new(budget),
        }));
        if let RequestBody::Streaming(s) = self {
            s.keep = Some(k.clone());
        }
        k
    }

    /// Reads the client's body ahead of any upstream, until it has ended or `bytes` of it are
    /// held, so that a client sending its body slowly holds no upstream connection while it
    /// does (see `request::read_ahead`). What was read is sent first when the body is. Ready
    /// at once for a body that is not streaming.
    pub async fn read_ahead(
        &mut self,
        bytes: u64,
        budget: &Budget,
    ) -> Result<(), RequestBodyError> {
        let RequestBody::Streaming(s) = self else {
            return Ok(());
        };
        s.reading_ahead = true;
        let r = std::future::poll_fn(|cx| {
            let mut ahead = s.ahead.take().unwrap_or_default();
            let r = ahead.fill(s, (bytes, budget), cx);
            s.ahead = Some(ahead);
            r
        })
        .await;
        s.reading_ahead = false;
        if let Some(mut ahead) = s.ahead.take() {
            ahead.seal(budget, |data| s.kept(data));
            s.ahead = Some(ahead);
        }
        if s.inner_ended() {
            // All of the body is read (and, unless it had trailers or is too large, kept).
            s.kept_whole();
            if s.ahead.as_ref().is_some_and(|a| a.is_empty()) {
                s.ended();
            }
        }
        r
    }

    /// The copy will not be replayed (the request has its response): its bytes go back to the
    /// budget now, not when the client's body ends.
    pub fn forget(kept: &KeptBody) {
        lock(kept).give_up();
    }

    /// The body again, if all of it was kept.
    pub fn replay(kept: &KeptBody) -> Option<RequestBody> {
        let k = lock(kept);
        (k.complete && !k.given_up).then(|| RequestBody::Replayed(VecDeque::from(k.frames.clone())))
    }

    /// Whether [`RequestBody::replay`] would give the body again.
    pub fn replayable(kept: &KeptBody) -> bool {
        let k = lock(kept);
        k.complete && !k.given_up
    }
}

impl Streaming {
    /// The client's body ended: it is over for the request path once what was read ahead of it
    /// is handed on too, and kept whole once what was read ahead is kept.
    fn finish(&mut self) {
        // hyper's `is_end_stream` stays false for a chunked body after its end.
        self.client_ended = true;
        if let Some(p) = &self.done {
            p.0.complete.store(true, Ordering::Relaxed);
        }
        if !self.reading_ahead {
            self.ended();
            self.kept_whole();
        }
    }

    /// All of the body was read and kept (unless the copy was given up): the copy is whole.
    fn kept_whole(&mut self) {
        if let Some(k) = self.keep.take() {
            let mut k = lock(&k);
            k.flush_tail();
            k.complete = true;
        }
    }

    /// Keeps `data` if the copy is still wanted, within its limit and the budget: whether it
    /// was kept (and is counted as kept).
    fn kept(&mut self, data: &Bytes) -> bool {
        let Some(k) = &self.keep else { return false };
        let mut k = lock(k);
        k.len += data.len() as u64;
        if k.given_up || k.len > REPLAY_BODY_LIMIT || !k.charge.take(data.len()) {
            k.give_up();
            drop(k);
            self.keep = None;
            return false;
        }
        if data.len() < SMALL_FRAME {
            k.tail.extend_from_slice(data);
        } else {
            k.flush_tail();
            k.frames.push(data.clone());
        }
        true
    }

    /// Tells the request path the body is over (ended or failed).
    fn ended(&mut self) {
        self.done = None;
    }

    /// The body failed: the request path is told how, then that it is over.
    fn failed(&mut self, how: BodyFailure) {
        if let Some(p) = &self.done {
            let _ = p.0.failure.set(how);
        }
        self.ended();
        self.give_up_keeping();
    }

    fn give_up_keeping(&mut self) {
        if let Some(k) = self.keep.take() {
            lock(&k).give_up();
        }
    }

    /// No more frames will come from the client.
    fn inner_ended(&self) -> bool {
        self.client_ended || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        if let Some(ahead) = self.ahead.as_mut() {
            let frame = ahead.next();
            // Kept already, when it was read ahead.
            if ahead.is_empty() {
                self.ahead = None;
                if self.inner_ended() {
                    // The last of the body is handed on: the response timeout may start.
                    self.ended();
                }
            }
            if let Some(frame) = frame {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        self.poll_inner(cx)
    }

    /// The client's next frame, counted, checked against the limit and kept.
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Some(p) = &self.done {
            p.0.waiting.store(polled.is_pending(), Ordering::Relaxed);
            if matches!(polled, Poll::Ready(Some(Ok(_)) | None)) {
                p.0.read_now();
            }
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.seen += data.len() as u64;
                    if let Some(p) = &self.done {
                        p.0.bytes.store(self.seen, Ordering::Relaxed);
                    }
                    if let Some(limit) = self.limit
                        && self.seen > limit
                    {
                        self.inner = None;
                        self.failed(BodyFailure::TooLarge { limit });
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit })));
                    }
                    if !self.reading_ahead {
                        // Read ahead, it is kept once read ahead, in the buffer it is read into.
                        self.kept(data);
                    }
                } else {
                    // Trailers are not kept: such a body is not replayed.
                    self.give_up_keeping();
                }
                if self.inner.as_ref().is_some_and(Body::is_end_stream) {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.failed(BodyFailure::Downstream);
                Poll::Ready(Some(Err(RequestBodyError::Downstream(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Streaming(s) => s.poll_frame(cx),
            RequestBody::Replayed(frames) => {
                Poll::Ready(frames.pop_front().map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Streaming(s) => {
                s.ahead.as_ref().is_none_or(|a| a.is_empty()) && s.inner_ended()
            }
            RequestBody::Replayed(frames) => frames.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Streaming(s) => {
                // hyper's hint is what the client has still to send.
                let rest = s
                    .inner
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
                let ahead = s.ahead.as_ref().map_or(0, |a| a.len());
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + ahead);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + ahead);
                }
                hint
            }
            RequestBody::Replayed(frames) => {
                SizeHint::with_exact(frames.iter().map(|b| b.len() as u64).sum())
            }
        }
    }
}
