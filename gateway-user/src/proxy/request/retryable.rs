//! Responses a route retries (`decide::retry` rules 7 and 8): which ones, and how one is given
//! up so that its connection serves again.

use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Body as _;

use super::{GRPC_STATUS, Plan, Upstream};
use crate::decide::{grpc::GrpcCode, retry::Failure};

/// The most of a given-up response's body read so that its connection can be reused (an error
/// page; a larger body closes an HTTP/1.1 connection, or resets an HTTP/2 stream, instead).
const DRAIN_MAX_BYTES: usize = 64 * 1024;

/// How long reading it may take.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// The response as a failure `decide::retry` may retry, when the route lists its status: a
/// gRPC call's trailers-only status (nothing of the call reached the client yet), or the
/// HTTP status of the response head (before any of it reached the client).
pub(super) fn response(plan: &Plan, up: &Upstream) -> Option<Failure> {
    let retry = &plan.route.retry;
    if plan.grpc {
        if retry.grpc_status_codes.is_empty() {
            return None;
        }
        let code = up
            .response
            .headers()
            .get(GRPC_STATUS)
            .and_then(|v| GrpcCode::parse(v.as_bytes()))?;
        return (code != GrpcCode::OK
            && up.response.body().is_end_stream()
            && retry.grpc_status_codes.contains(code))
        .then_some(Failure::GrpcStatus(code));
    }
    // Only an idempotent request is retried for its status (`decide::retry` rule 8).
    let status = up.response.status().as_u16();
    (plan.idempotent && retry.status_codes.contains(status))
        .then_some(Failure::UpstreamStatus(status))
}

impl Upstream {
    /// Gives this response up for a retry. An empty body gives the connection back at once;
    /// a body of at most [`DRAIN_MAX_BYTES`] is read to its end in the background (within
    /// [`DRAIN_TIME`]) and the connection then given back (an HTTP/2 stream ends cleanly:
    /// resetting the streams of an upstream shedding load would look like an attack to
    /// some); any other is closed (HTTP/1.1, as nginx closes it) or reset (HTTP/2).
    pub(super) fn discard(self) {
        if self.response.body().is_end_stream() {
            self.release();
            return;
        }
        if self.response.body().size_hint().lower() > DRAIN_MAX_BYTES as u64 {
            return;
        }
        tokio::spawn(async move {
            let Upstream {
                response,
                mut lease,
                ..
            } = self;
            let keep_alive = crate::proxy::headers::keep_alive_timeout(response.headers());
            let mut body = response.into_body();
            let drained = tokio::time::timeout(DRAIN_TIME, async {
                let mut read = 0;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return false };
                    read += frame.data_ref().map_or(0, |d| d.len());
                    if read > DRAIN_MAX_BYTES {
                        return false;
                    }
                }
                true
            });
            if let Ok(true) = drained.await {
                lease.conn.keep_alive = keep_alive;
                lease.release();
            }
        });
    }
}
