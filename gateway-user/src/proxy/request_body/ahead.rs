//! What `RequestBody::read_ahead` holds: the start of a body, read before any upstream was
//! asked, in one buffer, and the trailers if the body ended with them.
//!
//! Two bounds keep it small whatever the client does:
//! - the data is copied into one buffer, so that a body sent as thousands of one-byte chunks
//!   or DATA frames costs its bytes, not a frame's bookkeeping per byte;
//! - all requests together hold at most `[router.downstream] request_buffering_memory_bytes`
//!   read ahead ([`Budget`]; 64 MiB by default), give or take one read each. Past it, a body
//!   is not read ahead (or no further): it streams to the upstream as it arrives, as it did
//!   before read-ahead, counted in `gateway_request_read_ahead_over_budget_total`, and a
//!   warning says so (at most once per 10 s).

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::Frame;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tracing::warn;

use super::{RequestBodyError, Streaming};
use crate::proxy::log_every::LogEvery;

static BUDGET_LOG: LazyLock<LogEvery> = LazyLock::new(|| LogEvery::new(Duration::from_secs(10)));

/// What all requests together may hold read ahead, and where it is counted: one per process
/// (in `Shared`), its limit set at start and at every reload.
pub(crate) struct Budget {
    /// `request_buffering_memory_bytes`.
    pub limit: AtomicU64,
    /// `gateway_request_read_ahead_bytes`: what is held now.
    pub held: Gauge,
    /// `gateway_request_read_ahead_over_budget_total`.
    pub over: Counter,
}

impl Budget {
    pub fn new(ds: &crate::config::Downstream, m: &crate::metrics::GatewayMetrics) -> Budget {
        Budget {
            limit: AtomicU64::new(ds.request_buffering_memory_bytes),
            held: m.read_ahead_bytes.clone(),
            over: m.read_ahead_over_budget.clone(),
        }
    }
}

/// One request's share of [`Budget::held`], given back when dropped.
struct Share {
    held: Gauge,
    bytes: i64,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.held.dec_by(self.bytes);
    }
}

#[derive(Default)]
pub(super) struct Ahead {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    /// The data's share of the [`Budget`], given back once it is handed on.
    share: Option<Share>,
    /// The budget ran out: no more is read ahead.
    stopped: bool,
}

impl Ahead {
    /// Reads from the client into this until `bytes` are held, the body ended (with its
    /// trailers, if any), or the budget ran out.
    pub(super) fn fill(
        &mut self,
        s: &mut Streaming,
        (bytes, budget): (u64, &Budget),
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
                Ok(data) => {
                    // Past the budget, no further: unless this read ended the body (or its
                    // first `bytes`), when nothing streams that would not have anyway.
                    if self.add(&data, budget)
                        && (self.data.len() as u64) < bytes
                        && !s.inner_ended()
                    {
                        self.stop(budget);
                    }
                }
                Err(frame) => self.trailers = frame.into_trailers().ok(),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies `data` in and counts it in `budget`: whether that took all requests together
    /// past the budget's limit.
    fn add(&mut self, data: &Bytes, budget: &Budget) -> bool {
        if self.data.is_empty() {
            self.data.reserve(data.len().max(super::SMALL_FRAME));
        }
        self.data.extend_from_slice(data);
        let n = i64::try_from(data.len()).unwrap_or(i64::MAX);
        let before = budget.held.inner().fetch_add(n, Ordering::Relaxed);
        match &mut self.share {
            Some(share) => share.bytes += n,
            None => {
                self.share = Some(Share {
                    held: budget.held.clone(),
                    bytes: n,
                })
            }
        }
        u64::try_from(before.saturating_add(n)).unwrap_or(0) > budget.limit.load(Ordering::Relaxed)
    }

    /// The budget ran out with the body still arriving: the rest streams, counted and logged.
    fn stop(&mut self, budget: &Budget) {
        self.stopped = true;
        budget.over.inc();
        if let Some(unlogged) = BUDGET_LOG.due() {
            warn!(
                request_buffering_memory_bytes = budget.limit.load(Ordering::Relaxed),
                unlogged,
                "request bodies read ahead hold all of request_buffering_memory_bytes: bodies stream to their upstream as they arrive (counted in gateway_request_read_ahead_over_budget_total)"
            );
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
            self.share = None;
            return Some(Frame::data(self.data.split().freeze()));
        }
        self.trailers.take().map(Frame::trailers)
    }
}
