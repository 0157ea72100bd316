//! Respond: the upstream's response on its way to the client, or the gateway's own error
//! response, which explains itself — the reason in `x-gateway-error`, the endpoint and the
//! attempts, the kernel evidence in `x-gateway-evidence`, and the same as a sentence in the
//! body and the access log.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, Version, header::CONTENT_TYPE};

use super::Upstream;
use crate::proxy::{error::ProxyError, exchange::Exchange, headers, response_body::ResponseBody};

/// Response headers that explain a gateway error.
pub const X_GATEWAY_ERROR: &str = "x-gateway-error";
pub const X_GATEWAY_ENDPOINT: &str = "x-gateway-endpoint";
pub const X_GATEWAY_ATTEMPTS: &str = "x-gateway-attempts";
/// The kernel evidence behind an error, `key=value` pairs (see `ProxyError::evidence_header`).
pub const X_GATEWAY_EVIDENCE: &str = "x-gateway-evidence";

/// The upstream's response, streamed to the client.
pub(super) fn respond(up: Upstream, mut ex: Box<Exchange>) -> Response<ResponseBody> {
    let (mut parts, body) = up.response.into_parts();
    headers::to_downstream(&mut parts.headers, parts.version);
    parts.version = Version::default();
    ex.record.status = parts.status.as_u16();
    keepalive_off(&ex, &mut parts.headers);
    ex.lease = Some(up.lease);
    Response::from_parts(parts, ResponseBody::upstream(body, up.stall, ex))
}

/// The gateway's answer to a request that failed.
pub(super) fn error_response(e: ProxyError, mut ex: Box<Exchange>) -> Response<ResponseBody> {
    let rec = &mut ex.record;
    let kind = e.kind();
    let status = kind.status();
    let attempts = rec.attempts.len();
    let endpoint = e
        .endpoint()
        .or_else(|| rec.attempts.last().map(|a| a.endpoint));
    let mut text = format!(
        "{} {}: {e}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if status.is_server_error() {
        rec.error_detail = Some(e.to_string());
    }
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
    rec.status = status.as_u16();
    rec.error = Some(kind);
    let close = keepalive_over(&ex);
    let mut resp = Response::new(ResponseBody::full(Bytes::from(text), Some(ex)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(X_GATEWAY_ERROR, HeaderValue::from_static(kind.reason()));
    if let Some(v) = e
        .evidence_header()
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        h.insert(X_GATEWAY_EVIDENCE, v);
    }
    if let Some(ep) = endpoint
        && let Ok(v) = HeaderValue::try_from(ep.to_string())
    {
        h.insert(X_GATEWAY_ENDPOINT, v);
    }
    h.insert(X_GATEWAY_ATTEMPTS, HeaderValue::from(attempts));
    if close || status == StatusCode::BAD_REQUEST {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// While keep-alive is over (draining, or handing over to a new binary), an HTTP/1 response
/// says `Connection: close`: the client reconnects, through its load balancer, elsewhere.
/// HTTP/2 connections get GOAWAY instead (`server`).
fn keepalive_off(ex: &Exchange, h: &mut http::HeaderMap) {
    if keepalive_over(ex) {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
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
    use crate::proxy::error::ErrorKind;
    use http::StatusCode;

    #[test]
    fn statuses_follow_the_table() {
        assert_eq!(ErrorKind::ConnectRefused.status(), StatusCode::BAD_GATEWAY);
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
    }
}
