//! The start of a request body, read before any upstream connection is taken: what nginx's
//! `proxy_request_buffering` and HAProxy's `option http-buffer-request` do.
//!
//! Streamed straight through, a body holds its upstream connection for as long as the client
//! takes to send it. A client that sends a small body a byte at a time (slowloris on the
//! body, R.U.D.Y.) then holds one of the cluster's `max_connections` for the whole request
//! timeout, and a few hundred such requests, which cost the client nothing, take all of them.
//! Read ahead, such a request holds only its own client connection and at most
//! [`READ_AHEAD_BYTES`] of memory until its body is in, and its request timeout ends it as
//! `408 client_body_timeout` with no upstream ever asked.
//!
//! Memory: at most 64 KiB per request, copied into one buffer, and
//! `[router.downstream] request_buffering_memory_bytes` (64 MiB) for all requests together
//! (`request_body::ahead`), with the copies kept for retries (`REPLAY_BODY_LIMIT`, until the
//! request has its response): a body read ahead is kept as that same buffer. A larger body
//! streams on after its first 64 KiB. gRPC calls and Connect-protocol
//! streams always stream (a streaming call's client may wait for the upstream's reply before it
//! sends more), and so do the requests of a route or cluster with `request_buffering = false`
//! (an upload whose client waits on the upstream's progress).

use http::{Request, header::CONTENT_TYPE};
use tokio::time::Instant;

use crate::proxy::{
    error::ProxyError,
    request_body::{Budget, Progress, REPLAY_BODY_LIMIT, RequestBody, RequestBodyError},
};

/// The most of a body read before an upstream connection is taken.
pub(super) const READ_AHEAD_BYTES: u64 = REPLAY_BODY_LIMIT;

/// Reads `req`'s body ahead until it ended or [`READ_AHEAD_BYTES`] of it are in, by the
/// request's `deadline`, within the process's `budget`; `progress` is the body's. Not a Connect-protocol stream's
/// (`application/connect+…`): like gRPC's, its client may wait for the upstream's reply before
/// it sends more.
pub(super) async fn read_ahead(
    req: &mut Request<RequestBody>,
    progress: &Progress,
    (start, deadline): (Instant, Instant),
    budget: &Budget,
) -> Result<(), ProxyError> {
    let streaming = req.headers().get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .get(..20)
            .is_some_and(|t| t.eq_ignore_ascii_case(b"application/connect+"))
    });
    if streaming {
        return Ok(());
    }
    tokio::select! {
        biased;
        r = req.body_mut().read_ahead(READ_AHEAD_BYTES, budget) => r.map_err(|e| match e {
            RequestBodyError::TooLarge { limit } => ProxyError::RequestBodyTooLarge { limit },
            RequestBodyError::Downstream(source) => ProxyError::DownstreamBodyError { source },
        }),
        () = tokio::time::sleep_until(deadline) => Err(ProxyError::ClientBodyTimeout {
            timeout: deadline.saturating_duration_since(start),
            bytes: progress.bytes(),
            grpc_deadline: false,
            upstream_waiting: false,
        }),
    }
}
