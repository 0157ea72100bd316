//! What `RequestBody::read_ahead` holds: the start of a body, read before any upstream was
//! asked, in one buffer, and the trailers if the body ended with them.
//!
//! Two bounds keep it small whatever the client does:
//! - the data is copied into one buffer, so that a body sent as thousands of one-byte chunks
//!   or DATA frames costs its bytes, not a frame's bookkeeping per byte;
//! - all requests together hold at most `[router.downstream] request_buffering_memory_bytes`
//!   ([`Budget`]; 64 MiB by default), give or take one read each, read ahead and kept for a
//!   retry together. Past it, a body is not read ahead (or no further): it streams to the
//!   upstream as it arrives, as it did before read-ahead, counted in
//!   `gateway_request_read_ahead_over_budget_total`, and a warning says so (at most once per
//!   10 s).
//!
//! The copy kept for a retry ([`Charge`]) draws on the same budget: a body read ahead is kept
//! once, as the buffer it was read into ([`Ahead::seal`], `request_body::Kept`), and a body
//! the budget has no room for is not kept, so its request is not sent again once its body went
//! upstream (`gateway_request_retry_copy_over_budget_total`).

use std::{
    sync::{
        Arc, LazyLock,
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
static KEEP_LOG: LazyLock<LogEvery> = LazyLock::new(|| LogEvery::new(Duration::from_secs(10)));

/// What happens to bodies while the budget is full, for its warning.
const STREAMED: &str = "request bodies read ahead and kept for retries hold all of request_buffering_memory_bytes: bodies stream to their upstream as they arrive (counted in gateway_request_read_ahead_over_budget_total)";
const NOT_KEPT: &str = "request bodies read ahead and kept for retries hold all of request_buffering_memory_bytes: bodies are not kept, so their requests are not retried once their body went upstream (counted in gateway_request_retry_copy_over_budget_total)";

/// What all requests together may hold of their bodies (read ahead, and kept for a retry), and
/// where it is counted: one per process (in `Shared`), its limit set at start and at every
/// reload.
#[derive(Debug)]
pub(crate) struct Budget {
    /// `request_buffering_memory_bytes`.
    pub limit: AtomicU64,
    /// `gateway_request_read_ahead_bytes`: what is held read ahead now.
    pub held: Gauge,
    /// `gateway_request_read_ahead_over_budget_total`.
    pub over: Counter,
    /// `gateway_request_retry_copy_bytes`: what is kept for retries now.
    kept: Gauge,
    /// `gateway_request_retry_copy_over_budget_total`.
    kept_over: Counter,
}

impl Budget {
    pub fn new(ds: &crate::config::Downstream, m: &crate::metrics::GatewayMetrics) -> Arc<Budget> {
        Arc::new(Budget {
            limit: AtomicU64::new(ds.request_buffering_memory_bytes),
            held: m.read_ahead_bytes.clone(),
            over: m.read_ahead_over_budget.clone(),
            kept: m.retry_copy_bytes.clone(),
            kept_over: m.retry_copy_over_budget.clone(),
        })
    }

    /// Whether `total`, what all requests would hold with a new read, is past the limit.
    fn past(&self, total: i64) -> bool {
        u64::try_from(total).unwrap_or(0) > self.limit.load(Ordering::Relaxed)
    }

    /// The budget turned a body away (`what` it meant for it): logged at most every 10 s.
    fn warn_full(&self, log: &LogEvery, what: &str) {
        if let Some(unlogged) = log.due() {
            warn!(
                request_buffering_memory_bytes = self.limit.load(Ordering::Relaxed),
                unlogged, "{what}"
            );
        }
    }
}

/// One request's bytes on one of the [`Budget`]'s gauges (read ahead, or kept), given back
/// when dropped.
#[derive(Debug)]
struct Share {
    gauge: Gauge,
    bytes: i64,
}

impl Share {
    fn new(gauge: &Gauge) -> Share {
        Share {
            gauge: gauge.clone(),
            bytes: 0,
        }
    }

    /// Counts `n` more bytes: what the gauge reads with them.
    fn add(&mut self, n: i64) -> i64 {
        self.bytes += n;
        self.gauge.inner().fetch_add(n, Ordering::Relaxed) + n
    }

    fn remove(&mut self, n: i64) {
        self.bytes -= n;
        self.gauge.dec_by(n);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

/// A request's copy kept for a retry, as the [`Budget`] counts it; given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    share: Share,
}

impl Charge {
    pub fn new(budget: &Arc<Budget>) -> Charge {
        Charge {
            budget: budget.clone(),
            share: Share::new(&budget.kept),
        }
    }

    /// Counts `n` more bytes kept: false, and nothing counted, when all requests together would
    /// then hold more than the limit, which is counted and logged (the copy is given up).
    pub fn take(&mut self, n: usize) -> bool {
        let b = &self.budget;
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if b.past(self.share.add(n).saturating_add(b.held.get())) {
            self.share.remove(n);
            b.kept_over.inc();
            b.warn_full(&KEEP_LOG, NOT_KEPT);
            return false;
        }
        true
    }

    /// The copy was given up: its bytes go back to the budget now.
    pub fn give_back(&mut self) {
        self.share = Share::new(&self.budget.kept);
    }
}

#[derive(Default)]
pub(super) struct Ahead {
    data: BytesMut,
    /// `data` frozen once read ahead ([`Ahead::seal`]), so that the copy kept for a retry
    /// shares its buffer.
    sealed: Bytes,
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
        let after = self.count(data.len(), budget);
        budget.past(after.saturating_add(budget.kept.get()))
    }

    /// Counts `n` more bytes held read ahead: what all requests together hold read ahead now.
    fn count(&mut self, n: usize, budget: &Budget) -> i64 {
        self.share
            .get_or_insert_with(|| Share::new(&budget.held))
            .add(i64::try_from(n).unwrap_or(i64::MAX))
    }

    /// Once read ahead: freezes the data into the one buffer that is handed on, and hands it to
    /// `keep`, the copy kept for a retry, which shares it (kept now, not when handed on: an
    /// HTTP/2 request can fail before its body is polled). The bytes are counted once: as
    /// kept when `keep` took them (it says so), as read ahead otherwise.
    pub(super) fn seal(&mut self, budget: &Budget, keep: impl FnOnce(&Bytes) -> bool) {
        if self.data.is_empty() {
            return;
        }
        self.sealed = self.data.split().freeze();
        // Given back first, so that the copy's charge does not count the same bytes twice.
        self.share = None;
        if !keep(&self.sealed) {
            self.count(self.sealed.len(), budget);
        }
    }

    /// The budget ran out with the body still arriving: the rest streams, counted and logged.
    fn stop(&mut self, budget: &Budget) {
        self.stopped = true;
        budget.over.inc();
        budget.warn_full(&BUDGET_LOG, STREAMED);
    }

    /// Data or trailers still to hand on (once sealed: `RequestBody::read_ahead` seals what it
    /// read before any of it is handed on).
    pub(super) fn is_empty(&self) -> bool {
        debug_assert!(self.data.is_empty(), "handed on before it was sealed");
        self.sealed.is_empty() && self.trailers.is_none()
    }

    /// Bytes of data still to hand on.
    pub(super) fn len(&self) -> u64 {
        self.sealed.len() as u64
    }

    /// The next frame to hand on: the data, then the trailers.
    pub(super) fn next(&mut self) -> Option<Frame<Bytes>> {
        if !self.sealed.is_empty() {
            self.share = None;
            return Some(Frame::data(std::mem::take(&mut self.sealed)));
        }
        self.trailers.take().map(Frame::trailers)
    }
}
