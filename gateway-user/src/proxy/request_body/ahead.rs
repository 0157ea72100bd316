//! What `RequestBody::read_ahead` holds: the start of a body, read before any upstream was
//! asked, in one buffer, and the trailers if the body ended with them.
//!
//! Two bounds keep it small whatever the client does:
//! - the data is copied into one buffer, so that a body sent as thousands of one-byte chunks
//!   or DATA frames costs its bytes, not a frame's bookkeeping per byte;
//! - all requests together hold at most [`BUDGET_BYTES`] read ahead. Past it, a body is
//!   not read ahead (or no further): it streams to the upstream as it arrives, as it did before
//!   read-ahead, and a warning says so (at most once per 10 s).

use std::{
    sync::LazyLock,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::Frame;
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::warn;

use super::{RequestBodyError, Streaming};
use crate::proxy::log_every::LogEvery;

/// What all requests together may hold read ahead.
pub(crate) const BUDGET_BYTES: usize = 64 << 20;

static BUDGET: Semaphore = Semaphore::const_new(BUDGET_BYTES);

static BUDGET_LOG: LazyLock<LogEvery> = LazyLock::new(|| LogEvery::new(Duration::from_secs(10)));

#[derive(Default)]
pub(super) struct Ahead {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    /// The data's share of [`BUDGET`], given back once it is handed on.
    budget: Option<SemaphorePermit<'static>>,
    /// The budget ran out: no more is read ahead.
    stopped: bool,
}

impl Ahead {
    /// Reads from the client into this until `bytes` are held, the body ended (with its
    /// trailers, if any), or the budget ran out.
    pub(super) fn fill(
        &mut self,
        s: &mut Streaming,
        bytes: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), RequestBodyError>> {
        while (self.data.len() as u64) < bytes
            && self.trailers.is_none()
            && !self.stopped
            && !s.inner_ended()
        {
            let frame = match s.poll_inner(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            match frame.into_data() {
                Ok(data) => self.add(&data),
                Err(frame) => self.trailers = frame.into_trailers().ok(),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies `data` in, within the budget; past it, this is the last.
    fn add(&mut self, data: &Bytes) {
        if self.data.is_empty() {
            self.data.reserve(data.len().max(super::SMALL_FRAME));
        }
        self.data.extend_from_slice(data);
        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match BUDGET.try_acquire_many(n) {
            Ok(p) => match &mut self.budget {
                Some(held) => held.merge(p),
                None => self.budget = Some(p),
            },
            Err(_) => {
                self.stopped = true;
                if let Some(unlogged) = BUDGET_LOG.due() {
                    warn!(
                        budget_mib = BUDGET_BYTES >> 20,
                        unlogged,
                        "request bodies read ahead hold the whole budget: bodies stream to their upstream as they arrive"
                    );
                }
            }
        }
    }

    /// Data or trailers still to hand on.
    pub(super) fn is_empty(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    /// Bytes of data still to hand on.
    pub(super) fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// The next frame to hand on: the data, then the trailers.
    pub(super) fn next(&mut self) -> Option<Frame<Bytes>> {
        if !self.data.is_empty() {
            self.budget = None;
            return Some(Frame::data(self.data.split().freeze()));
        }
        self.trailers.take().map(Frame::trailers)
    }
}
