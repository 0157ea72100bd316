//! Respond: the upstream's response on its way to the client (or, for a `101`, the tunnel
//! that takes the connection over), or the gateway's own error response, which explains
//! itself — as much as `expose_upstream_errors` lets it:
//!
//! | mode | HTTP error | gRPC call (HTTP 200, trailers-only) |
//! |---|---|---|
//! | `full` | `x-gateway-error` (the reason), `-endpoint`, `-attempts`, `-evidence` (the kernel's, `key=value`); the sentence with the evidence and the attempts in the body | the same headers; `grpc-message`: the reason and the sentence |
//! | `reason` | `x-gateway-error`, `-attempts`; the status and the reason in the body | `grpc-message`: the reason |
//! | `none` | a bare status | `grpc-status` alone |
//!
//! Whatever the mode, the access log's `detail` and `/status` keep the whole sentence. Every
//! answer carries the request ID and the route's response header rules.

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Response, StatusCode, Version,
    header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, LOCATION, RETRY_AFTER},
};
use hyper::upgrade::OnUpgrade;

use super::{Client, GRPC_STATUS, Upstream, redirect::Redirect};
use crate::{
    config::ExposeErrors,
    decide::grpc::{self, GrpcCode},
    proxy::{
        error::{ProxyError, RESPONSE_HEAD_MAX_BYTES},
        exchange::Exchange,
        headers,
        response_body::ResponseBody,
        router::apply_rules,
        tunnel::{self, Tunnel},
    },
};

/// Response headers that explain a gateway error.
pub const X_GATEWAY_ERROR: &str = "x-gateway-error";
pub const X_GATEWAY_ENDPOINT: &str = "x-gateway-endpoint";
pub const X_GATEWAY_ATTEMPTS: &str = "x-gateway-attempts";
/// The kernel evidence behind an error, `key=value` pairs (see `ProxyError::evidence_header`).
pub const X_GATEWAY_EVIDENCE: &str = "x-gateway-evidence";

static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The upstream's response, streamed to the client; a `101` starts the tunnel.
pub(super) fn respond(
    up: Upstream,
    mut ex: Box<Exchange>,
    upgrade: Option<OnUpgrade>,
    client: &Client,
) -> Response<ResponseBody> {
    ex.record.upstream_status = Some(up.response.status().as_u16());
    if up.response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return switch(up, ex, upgrade, client);
    }
    let (mut parts, body) = up.response.into_parts();
    let stripped = headers::to_downstream(&mut parts.headers, parts.version);
    if let Some(what) = refused(parts.status, &stripped, &parts.headers) {
        let endpoint = up.lease.endpoint.addr;
        // The connection goes with `up`: not reused after a response it could not frame.
        return refused_answer(ProxyError::UpstreamResponseRefused { endpoint, what }, ex);
    }
    // RFC 9110 section 8.6: none on a 204 (HTTP/2 clients reset the stream of one that has
    // it; hyper handles 1xx itself). A gRPC response's length goes too (and its body's size
    // hint says none, `ResponseBody`): when its body breaks off, the gateway ends the call with
    // trailers of its own, which a length not reached makes a protocol violation, and the
    // client never sees the status.
    if parts.status == StatusCode::NO_CONTENT || ex.grpc {
        parts.headers.remove(CONTENT_LENGTH);
    } else {
        one_length(&mut parts.headers);
    }
    parts.version = Version::default();
    ours(&mut parts.headers, &ex);
    ex.record.status = parts.status.as_u16();
    if ex.grpc {
        ex.record.grpc_status = parts
            .headers
            .get(GRPC_STATUS)
            .and_then(|v| GrpcCode::parse(v.as_bytes()))
            .map(|c| c.0);
    }
    keepalive_off(&ex, &mut parts);
    let mut lease = up.lease;
    // The upstream's own idle limit for the connection, read as the header was stripped.
    lease.conn.keep_alive = stripped
        .keep_alive
        .as_ref()
        .and_then(headers::keep_alive_value_timeout);
    ex.lease = Some(lease);
    let body = ResponseBody::upstream(body, up.stall, up.call_deadline, ex);
    Response::from_parts(parts, body)
}

/// One `Content-Length` line with one value. An upstream may repeat it (`5` twice, or `5, 5`),
/// which hyper takes when the values agree (RFC 9112 section 6.3); passed on as it came, it
/// made HTTP/2 clients reset the stream (curl failed with 92) while the access log said 200.
fn one_length(h: &mut HeaderMap) {
    let mut all = h.get_all(CONTENT_LENGTH).iter();
    let Some(first) = all.next() else { return };
    if all.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    let one = first
        .as_bytes()
        .split(|b| *b == b',')
        .next()
        .and_then(|v| HeaderValue::from_bytes(v.trim_ascii()).ok());
    match one {
        Some(v) => {
            h.insert(CONTENT_LENGTH, v);
        }
        None => {
            h.remove(CONTENT_LENGTH);
        }
    }
}

/// Why a response hyper parsed is not passed on: a status outside 100 to 599 (RFC 9110
/// section 15), a transfer coding besides `chunked`, which hyper took off while the others
/// stayed on the body (`gzip, chunked` reached the client as gzip bytes under no
/// `Content-Encoding`; nginx refuses it too), or a head past [`RESPONSE_HEAD_MAX_BYTES`].
fn refused(
    status: StatusCode,
    stripped: &headers::Stripped,
    h: &HeaderMap,
) -> Option<&'static str> {
    if status.as_u16() > 599 {
        return Some("a status code past 599");
    }
    if stripped.other_coding {
        return Some("a transfer coding other than chunked");
    }
    // Each line as sent: name, `: `, value, CRLF.
    let head: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    (head > RESPONSE_HEAD_MAX_BYTES).then_some(
        "a response head past 60 KiB, more than clients take (curl fails; nghttp2 ends the whole connection)",
    )
}

/// The request ID and the route's response header rules, on every answer.
fn ours(h: &mut HeaderMap, ex: &Exchange) {
    if let (Some(name), Some(id)) = (&ex.request_id_header, &ex.record.request_id) {
        h.insert(name, id.clone());
    }
    if let Some(route) = &ex.route {
        apply_rules(&route.response_headers, h);
    }
}

/// A `101 Switching Protocols`: the client gets it, and a tunnel copies bytes both ways.
fn switch(
    mut up: Upstream,
    mut ex: Box<Exchange>,
    client_side: Option<OnUpgrade>,
    client: &Client,
) -> Response<ResponseBody> {
    let endpoint = up.lease.endpoint.addr;
    let upstream_side = hyper::upgrade::on(&mut up.response);
    let (mut parts, _) = up.response.into_parts();
    let value = headers::to_downstream(&mut parts.headers, parts.version).upgrade;
    let (Some(client_side), Some(value)) = (client_side, value) else {
        let what = "the request was no upgrade, or the 101 named no protocol in `Upgrade`";
        return refused_answer(ProxyError::UpgradeFailed { endpoint, what }, ex);
    };
    headers::restore_upgrade(&mut parts.headers, value);
    parts.version = Version::HTTP_11;
    ours(&mut parts.headers, &ex);
    ex.record.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
    ex.upgrade();
    let policy = ex.route.as_ref().map(|r| r.policy);
    tunnel::spawn(Tunnel {
        client: client_side,
        upstream: upstream_side,
        lease: up.lease,
        exchange: ex,
        idle: policy.map_or(tunnel::FALLBACK_IDLE, |p| p.upgrade_idle_timeout),
        max: policy.map_or(tunnel::FALLBACK_MAX, |p| p.upgrade_max_duration),
        drain: client.drain.clone(),
    });
    Response::from_parts(parts, ResponseBody::empty())
}

/// The error for an attempt's answer the gateway would not pass on, which the attempt's own
/// entry names too (`attempt_errors` said `-`, an answer taken, beside the request's error).
fn refused_answer(e: ProxyError, mut ex: Box<Exchange>) -> Response<ResponseBody> {
    if let Some(a) = ex.record.attempts.last_mut() {
        a.error = Some(e.kind());
    }
    error_response(e, ex)
}

/// The gateway's answer to a request that failed.
pub(super) fn error_response(e: ProxyError, mut ex: Box<Exchange>) -> Response<ResponseBody> {
    let kind = e.kind();
    let status = kind.status();
    let rec = &mut ex.record;
    if status.is_server_error() || ex.grpc || kind == super::ErrorKind::ClientBodyTimeout {
        rec.error_detail = Some(e.to_string());
    }
    rec.error = Some(kind);
    if ex.grpc {
        return grpc_error(&e, ex);
    }
    let text = match ex.expose {
        ExposeErrors::Full => full_text(&e, &ex),
        ExposeErrors::Reason => format!(
            "{} {}: {kind}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ),
        ExposeErrors::None => String::new(),
    };
    ex.record.status = status.as_u16();
    let mut h = HeaderMap::new();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    explain(&mut h, &e, &ex);
    if let ProxyError::RateLimited { retry_after } = &e {
        // Whole seconds (RFC 9110 section 10.2.3), rounded up: never 0, which invites an
        // immediate retry that would be limited again.
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        h.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    closing(&mut h, &ex, status == StatusCode::BAD_REQUEST);
    ours(&mut h, &ex);
    let mut resp = Response::new(ResponseBody::full(Bytes::from(text), Some(ex)));
    *resp.status_mut() = status;
    *resp.headers_mut() = h;
    resp
}

/// A request on plain HTTP that its route sends to HTTPS (`redirect`): the status and
/// `Location`, no body, and what every answer of the gateway carries. A body the client is
/// still sending is not read: its connection closes, as after an error.
pub(super) fn redirect(to: Redirect, mut ex: Box<Exchange>) -> Response<ResponseBody> {
    ex.record.status = to.status.as_u16();
    let mut h = HeaderMap::new();
    h.insert(LOCATION, to.location);
    closing(&mut h, &ex, false);
    ours(&mut h, &ex);
    let mut resp = Response::new(ResponseBody::full(Bytes::new(), Some(ex)));
    *resp.status_mut() = to.status;
    *resp.headers_mut() = h;
    resp
}

/// `full`: the sentence, with the kernel's evidence, and each attempt.
fn full_text(e: &ProxyError, ex: &Exchange) -> String {
    let rec = &ex.record;
    let status = e.kind().status();
    let mut text = format!(
        "{} {}: {e}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let attempts = rec.attempts.len();
    if attempts > 0 {
        let tried: Vec<String> = rec
            .attempts
            .iter()
            .map(|a| match a.error {
                Some(k) => format!("{} ({k})", a.endpoint),
                None => a.endpoint.to_string(),
            })
            .collect();
        text.push_str(&format!(
            "cluster `{}`, {attempts} attempt(s): {}\n",
            rec.cluster.as_deref().unwrap_or("-"),
            tried.join(", ")
        ));
    }
    text
}

/// The `x-gateway-*` headers the mode allows.
fn explain(h: &mut HeaderMap, e: &ProxyError, ex: &Exchange) {
    if ex.expose == ExposeErrors::None {
        return;
    }
    let rec = &ex.record;
    h.insert(X_GATEWAY_ERROR, HeaderValue::from_static(e.kind().reason()));
    h.insert(X_GATEWAY_ATTEMPTS, HeaderValue::from(rec.attempts.len()));
    if ex.expose != ExposeErrors::Full {
        return;
    }
    if let Some(v) = e
        .evidence_header()
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        h.insert(X_GATEWAY_EVIDENCE, v);
    }
    let endpoint = e
        .endpoint()
        .or_else(|| rec.attempts.last().map(|a| a.endpoint));
    if let Some(ep) = endpoint
        && let Ok(v) = HeaderValue::try_from(ep.to_string())
    {
        h.insert(X_GATEWAY_ENDPOINT, v);
    }
}

/// A gRPC call the gateway failed: HTTP 200, a trailers-only response with `grpc-status` and
/// (unless `none`) `grpc-message`, so that gRPC clients show the reason.
fn grpc_error(e: &ProxyError, mut ex: Box<Exchange>) -> Response<ResponseBody> {
    let kind = e.kind();
    let code = kind.grpc_status();
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, HeaderValue::from_static(code.as_str()));
    let message = match ex.expose {
        ExposeErrors::Full => Some(format!("{kind}: {e}")),
        ExposeErrors::Reason => Some(format!("gateway: {kind}")),
        ExposeErrors::None => None,
    };
    if let Some(v) = message.and_then(|m| HeaderValue::try_from(grpc::encode_message(&m)).ok()) {
        h.insert(&GRPC_MESSAGE, v);
    }
    explain(&mut h, e, &ex);
    closing(&mut h, &ex, false);
    ours(&mut h, &ex);
    ex.record.status = StatusCode::OK.as_u16();
    ex.record.grpc_status = Some(code.0);
    let mut resp = Response::new(ResponseBody::headers_only(ex));
    *resp.headers_mut() = h;
    resp
}

/// `Connection: close` on an answer of the gateway's own that ends its HTTP/1 connection:
/// keep-alive is over ([`keepalive_over`]), `also`, or the answer comes before the client's
/// body was read to its end (the rest of the body is still coming), said so that the client
/// does not send its next request on a connection that is closing. A gRPC error over HTTP/1
/// too: it did not say so.
fn closing(h: &mut HeaderMap, ex: &Exchange, also: bool) {
    let unread = ex.record.version < Version::HTTP_2 && ex.body_unread();
    if keepalive_over(ex) || also || unread {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// While keep-alive is over (draining, or handing over to a new binary), an HTTP/1 response
/// says `Connection: close`: the client reconnects, through its load balancer, elsewhere.
/// HTTP/2 connections get GOAWAY instead (`server`). A `101` never does: the connection is
/// the tunnel's.
fn keepalive_off(ex: &Exchange, parts: &mut http::response::Parts) {
    let close_delimited = close_delimited(ex, &parts.headers);
    if close_delimited {
        // To an HTTP/1.0 client, hyper adds `keep-alive` to a response of version 1.1 without
        // it, whatever the body's length; of version 1.0, it closes.
        parts.version = Version::HTTP_10;
    }
    if keepalive_over(ex) || close_delimited {
        parts
            .headers
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// An HTTP/1.0 client's response with a body and no length, which only the connection's close
/// can end (HTTP/1.0 has no chunked coding). hyper closes the connection after it but, when the
/// client asked for keep-alive, still said `Connection: keep-alive`: a client that believes it
/// waits for a next response on a connection about to close.
fn close_delimited(ex: &Exchange, h: &http::HeaderMap) -> bool {
    ex.record.version == Version::HTTP_10
        && ex.record.method != http::Method::HEAD
        && !matches!(ex.record.status, 100..=199 | 204 | 304)
        && !h.contains_key(CONTENT_LENGTH)
}

fn keepalive_over(ex: &Exchange) -> bool {
    ex.record.version < Version::HTTP_2
        && ex
            .shared
            .keepalive_off
            .load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use crate::{decide::grpc::GrpcCode, proxy::error::ErrorKind};
    use http::StatusCode;

    #[test]
    fn statuses_follow_the_table() {
        assert_eq!(ErrorKind::ConnectRefused.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(ErrorKind::ClientNotAllowed.status(), StatusCode::FORBIDDEN);
        assert_eq!(ErrorKind::UpstreamReset.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            ErrorKind::InvalidUpstreamResponse.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ErrorKind::NoHealthyUpstream.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ErrorKind::Overloaded.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ErrorKind::ConnectTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ErrorKind::ResponseTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ErrorKind::UpstreamRefusedStream.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn grpc_statuses_follow_the_issue() {
        // UNAVAILABLE for connect failures and ejected clusters, DEADLINE_EXCEEDED for
        // timeouts.
        for k in [
            ErrorKind::ConnectRefused,
            ErrorKind::ConnectTimeout,
            ErrorKind::ConnectUnreachable,
            ErrorKind::NoHealthyUpstream,
            ErrorKind::UpstreamRefusedStream,
        ] {
            assert_eq!(k.grpc_status(), GrpcCode::UNAVAILABLE, "{k}");
        }
        for k in [ErrorKind::ResponseTimeout, ErrorKind::RequestTimeout] {
            assert_eq!(k.grpc_status(), GrpcCode::DEADLINE_EXCEEDED, "{k}");
        }
        assert_eq!(ErrorKind::NoRoute.grpc_status(), GrpcCode::UNIMPLEMENTED);
        assert_eq!(
            ErrorKind::ClientNotAllowed.grpc_status(),
            GrpcCode::PERMISSION_DENIED
        );
    }
}
