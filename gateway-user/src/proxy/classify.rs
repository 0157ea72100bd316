//! What a failed exchange on an upstream connection was, from hyper's error: the client's body
//! (too large, or broken off), a write the upstream stopped taking, a response that broke the
//! protocol, a stream the upstream refused unprocessed, or a connection it closed.

use std::{error::Error, net::SocketAddr};

use super::{
    error::{ErrorKind, ProxyError},
    io::is_write_stall,
    request_body::{BodyFailure, Progress, RequestBodyError},
};

/// Maps a failed exchange on an upstream connection to its reason.
pub(crate) fn upstream_error(
    e: hyper::Error,
    endpoint: SocketAddr,
    body: Option<&Progress>,
) -> ProxyError {
    // The client's body: too large, or broken off. HTTP/1 carries the body's error in the
    // chain; HTTP/2 drops it and resets the stream, so the body's own record is asked too.
    let failed = causes(&e)
        .find_map(|c| c.downcast_ref::<RequestBodyError>())
        .map(|b| match b {
            RequestBodyError::TooLarge { limit } => BodyFailure::TooLarge { limit: *limit },
            RequestBodyError::Downstream(_) => BodyFailure::Downstream,
        })
        .or_else(|| body.and_then(Progress::failure));
    match failed {
        Some(BodyFailure::TooLarge { limit }) => return ProxyError::RequestBodyTooLarge { limit },
        Some(BodyFailure::Downstream) => return ProxyError::DownstreamBodyError { source: e },
        None => {}
    }
    if let Some(timeout) = is_write_stall(&e) {
        return ProxyError::UpstreamWriteTimeout { endpoint, timeout };
    }
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() || h2_violation(&e) {
        return ProxyError::InvalidUpstreamResponse {
            endpoint,
            source: e,
        };
    }
    if let Some((goaway, graceful)) = refused_unprocessed(&e) {
        return ProxyError::UpstreamRefusedStream {
            endpoint,
            source: e,
            goaway,
            graceful,
        };
    }
    ProxyError::UpstreamReset {
        endpoint,
        source: e,
    }
}

/// What a failure of an upstream's response body was: one that broke its framing (h2's own
/// reset of the stream for a protocol violation, such as DATA beyond `content-length`; chunked
/// or length framing hyper's HTTP/1 decoder refused) is an invalid response; anything else
/// (a TLS failure included) is the upstream closing or resetting mid-body.
pub(crate) fn body_error(e: &hyper::Error) -> ErrorKind {
    if h2_violation(e) {
        return ErrorKind::InvalidUpstreamResponse;
    }
    // TLS failures (an alert from the upstream, a bad record) come as `InvalidData` too: those
    // are the connection's, not the response's framing.
    let framing = causes(e)
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) && !io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        });
    if framing {
        ErrorKind::InvalidUpstreamResponse
    } else {
        ErrorKind::UpstreamReset
    }
}

/// An error with the causes under it, `outer: inner: ...` (hyper's own text names only the
/// step that failed: "error reading a body from connection").
pub(crate) fn with_causes(e: &(dyn Error + 'static)) -> String {
    let mut s = e.to_string();
    for c in causes(e).skip(1) {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
    }
    s
}

/// `e` and the errors under it, outermost first.
fn causes<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(e), |&c| c.source())
}

/// The first HTTP/2 error under `e`.
pub(crate) fn h2_cause<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a h2::Error> {
    causes(e).find_map(|c| c.downcast_ref::<h2::Error>())
}

/// A RST_STREAM that h2 itself sent the upstream (not one it received) for a response that
/// broke the protocol: no `:status`, a connection-specific header, DATA past its
/// `content-length`. That response was invalid; the upstream did not reset. Only a stream's
/// reset: h2 hands a GOAWAY of its own to every stream in flight on the connection, including
/// those whose responses were fine, and some of its GOAWAYs are its own limits
/// (`ENHANCE_YOUR_CALM` after too many resets it sent), so those stay `upstream_reset`, which
/// a retry may still save.
fn h2_violation(e: &hyper::Error) -> bool {
    h2_cause(e).is_some_and(|h2| {
        h2.is_reset()
            && h2.is_library()
            && matches!(
                h2.reason(),
                Some(
                    h2::Reason::PROTOCOL_ERROR
                        | h2::Reason::FLOW_CONTROL_ERROR
                        | h2::Reason::FRAME_SIZE_ERROR
                )
            )
    })
}

/// Whether an HTTP/2 error says the upstream never processed the stream (RFC 9113 section
/// 8.7): `Some((true, graceful))` for a GOAWAY from the upstream (h2 gives this error only to
/// the streams above the GOAWAY's last-stream-id, and to new ones; `graceful`: with NO_ERROR),
/// `Some((false, false))` for its RST_STREAM with REFUSED_STREAM.
fn refused_unprocessed(e: &hyper::Error) -> Option<(bool, bool)> {
    let h2 = h2_cause(e)?;
    if h2.is_go_away() && h2.is_remote() {
        return Some((true, h2.reason() == Some(h2::Reason::NO_ERROR)));
    }
    (h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM))
        .then_some((false, false))
}
