//! The request's deadline: the route's request timeout from its arrival, or a gRPC call's own
//! shorter `grpc-timeout`; and what the upstream is told of a gRPC call's deadline. A body that
//! keeps coming moves it on (`request_body::Progress::moved`).

use std::time::Duration;

use http::{HeaderValue, request::Parts};
use tokio::time::Instant;

use crate::{
    decide::grpc,
    proxy::{
        error::{Phase, ProxyError},
        exchange::Exchange,
        router::CompiledRoute,
    },
};

/// The request timeout (or a gRPC call's shorter deadline), from its arrival.
#[derive(Clone, Copy)]
pub(super) struct Deadline {
    pub at: Instant,
    /// `at` is the gRPC call's `grpc-timeout`.
    pub grpc: bool,
    /// A gRPC call's own deadline (`grpc-timeout`, from its arrival), whether or not it is
    /// shorter than the route's: what the upstream is told, and as far as a body that keeps
    /// coming moves the request deadline.
    pub call_end: Option<Instant>,
}

impl Deadline {
    /// A gRPC call already past its own deadline (`grpc-timeout: 0S`, or shorter than its
    /// arrival and routing took) is answered `DEADLINE_EXCEEDED` at once, and no upstream
    /// stream is opened for it: a gRPC server starts no handler for such a call either.
    /// Before, the gateway picked an endpoint and sent the call, then cancelled it.
    pub fn passed(&self, start: Instant) -> Result<(), ProxyError> {
        if self.grpc && self.at <= Instant::now() {
            return Err(ProxyError::RequestTimeout {
                timeout: self.at.saturating_duration_since(start),
                endpoint: None,
                phase: Phase::OnArrival,
                grpc_deadline: true,
            });
        }
        Ok(())
    }
}

/// `grpc-timeout` as sent upstream: the header's name.
pub(super) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The request's deadline: the route's request timeout from its arrival, or, for a gRPC call,
/// its own `grpc-timeout` when that is shorter; whether it is the latter; and the call's own
/// deadline, if it has one.
pub(super) fn deadline(ex: &Exchange, route: &CompiledRoute, parts: &Parts) -> Deadline {
    let limit = route.policy.request_timeout;
    let asked = ex
        .grpc
        .then(|| parts.headers.get(GRPC_TIMEOUT))
        .flatten()
        .and_then(|v| grpc::parse_timeout(v.as_bytes()));
    let grpc = asked.is_some_and(|t| t < limit);
    Deadline {
        at: ex.record.start + asked.filter(|_| grpc).unwrap_or(limit),
        grpc,
        call_end: asked.map(|t| ex.record.start + t),
    }
}

/// What the upstream is told beyond what is left of the call's deadline. The gateway holds the
/// client's deadline: at it, the gateway answers `DEADLINE_EXCEEDED` with its reason and
/// drops the upstream stream (hyper resets it, `CANCEL`). An upstream told the very same
/// instant races it, and when the gateway's timer fired a few milliseconds late (a loaded
/// host) the upstream's bare `DEADLINE_EXCEEDED` reached the client instead, without the
/// reason (seen once in the suite's `proxy_grpc`).
const GRPC_UPSTREAM_MARGIN: Duration = Duration::from_millis(50);

/// The `grpc-timeout` to send upstream: what is left of the deadline, plus
/// [`GRPC_UPSTREAM_MARGIN`].
pub(super) fn grpc_timeout_left(deadline: Instant) -> HeaderValue {
    let left = deadline.saturating_duration_since(Instant::now()) + GRPC_UPSTREAM_MARGIN;
    HeaderValue::try_from(grpc::format_timeout(left))
        .expect("digits and a unit are a valid header value")
}
