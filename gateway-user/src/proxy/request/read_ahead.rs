//! The start of a request body, read before any upstream connection is taken: what nginx's
//! `proxy_request_buffering` and HAProxy's `option http-buffer-request` do.
//!
//! Streamed straight through, a body holds its upstream connection for as long as the client
//! takes to send it. A client that sends a small body a byte at a time (slowloris on the
//! body, R.U.D.Y.) then holds one of the cluster's `max_connections` for as long as it keeps
//! sending (the request timeout runs from the body's last byte so far), and a few hundred
//! such requests, which cost the client nothing, take all of them. Read ahead, such a request
//! holds only its own client connection and at most [`READ_AHEAD_BYTES`] of memory until its
//! body is in, and a client that sends nothing for the request timeout is answered
//! `408 client_body_timeout` with no upstream ever asked. The rest of a larger body streams,
//! and holds its upstream connection while it comes, as with Envoy (nginx buffers a whole body
//! to disk first).
//!
//! Memory: at most 64 KiB per request, copied into one buffer, and
//! `[router.downstream] request_buffering_memory_bytes` (64 MiB) for all requests together
//! (`request_body::ahead`), with the copies kept for retries (`REPLAY_BODY_LIMIT`, until the
//! request has its response): a body read ahead is kept as that same buffer. A larger body
//! streams on after its first 64 KiB. gRPC calls and Connect-protocol streams over HTTP/2 to
//! an HTTP/2 cluster always stream (a streaming call's client may wait for the upstream's reply
//! before it sends more); otherwise the content type is only the client's claim (gRPC needs
//! HTTP/2; a Connect client stream over HTTP/1 is read ahead like any body). So do the requests of a route or cluster with
//! `request_buffering = false` (an upload whose client waits on the upstream's progress).

use http::{Request, header::CONTENT_TYPE};
use tokio::time::Instant;

use crate::proxy::{
    error::ProxyError,
    request_body::{Budget, Progress, REPLAY_BODY_LIMIT, RequestBody, RequestBodyError, Slide},
};

/// The most of a body read before an upstream connection is taken.
pub(super) const READ_AHEAD_BYTES: u64 = REPLAY_BODY_LIMIT;

/// A Connect-protocol stream (`application/connect+…`): like a gRPC call, one whose client may
/// wait for the upstream's reply before it sends more.
pub(super) fn connect_stream<B>(req: &Request<B>) -> bool {
    req.headers().get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .get(..20)
            .is_some_and(|t| t.eq_ignore_ascii_case(b"application/connect+"))
    })
}

/// Reads `req`'s body ahead until it ended or [`READ_AHEAD_BYTES`] of it are in, within the
/// process's `budget`; `progress` is the body's. It gives up once the request's `deadline`,
/// moved on by the body as it comes (`slide`: [`Progress::moved`]), has passed. Not called for
/// a streaming call (`request::Plan::streaming`).
pub(super) async fn read_ahead(
    req: &mut Request<RequestBody>,
    progress: &Progress,
    (deadline, slide): (Instant, Option<Slide>),
    budget: &Budget,
) -> Result<(), ProxyError> {
    tokio::select! {
        biased;
        r = req.body_mut().read_ahead(READ_AHEAD_BYTES, budget) => r.map_err(|e| match e {
            RequestBodyError::TooLarge { limit } => ProxyError::RequestBodyTooLarge { limit },
            RequestBodyError::Downstream(source) => ProxyError::DownstreamBodyError { source },
        }),
        () = progress.stalled(deadline, slide) => Err(ProxyError::ClientBodyTimeout {
            timeout: slide.map_or_else(|| deadline.saturating_duration_since(progress.origin()), |s| s.timeout),
            bytes: progress.bytes(),
            grpc_deadline: slide.is_none(),
            upstream_waiting: false,
            slow: progress.below_rate(slide),
        }),
    }
}
