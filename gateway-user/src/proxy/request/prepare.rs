//! Route: everything before the first attempt. The client-side limits (head size, body size),
//! the authority, the route and its cluster, and the request rewritten for its upstream
//! (hop-by-hop headers out, `X-Forwarded-*` and `Via` in, origin-form URI, HTTP/1.1).

use std::sync::Arc;

use http::{
    HeaderValue, Method, Request, Uri, Version,
    header::{CONTENT_LENGTH, HOST},
    uri::PathAndQuery,
};
use hyper::body::Incoming;
use tokio::{sync::oneshot, time::Instant};

use super::Client;
use crate::proxy::{
    error::ProxyError, exchange::Exchange, headers, request_body::RequestBody, shared::Runtime,
    upstream::Cluster,
};

/// A request checked, routed and rewritten for its upstream.
pub(super) struct Prepared {
    pub cluster: Arc<Cluster>,
    pub req: Request<RequestBody>,
    /// Told when the client's body has been read to the end; `None` for an empty body.
    pub done: Option<oneshot::Receiver<()>>,
    /// The request timeout, from its arrival.
    pub deadline: Instant,
}

pub(super) fn prepare(
    rt: &Runtime,
    req: Request<Incoming>,
    client: &Client,
    ex: &mut Exchange,
) -> Result<Prepared, ProxyError> {
    let ds = &rt.settings.downstream;
    let size = head_size(&req);
    if size > ds.max_request_header_bytes {
        return Err(ProxyError::RequestHeadersTooLarge {
            size,
            limit: ds.max_request_header_bytes,
        });
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest {
            what: "CONNECT is not supported",
        });
    }
    let authority = authority(&req)?;
    if let Some(limit) = ds.max_request_body_bytes
        && content_length(&req).is_some_and(|n| n > limit)
    {
        return Err(ProxyError::RequestBodyTooLarge { limit });
    }
    let host = authority
        .as_ref()
        .and_then(|a| a.to_str().ok())
        .map_or("", host_without_port);
    // `[router] gateway_host`: requests for another host are not this gateway's.
    let route = rt
        .settings
        .gateway_host
        .as_ref()
        .is_none_or(|h| h.matches(host))
        .then_some(())
        .and_then(|()| rt.router.route(host, req.uri().path()))
        .ok_or_else(|| ProxyError::NoRoute {
            host: host.to_owned(),
            path: req.uri().path().to_owned(),
        })?;
    let cluster = rt.clusters[route.cluster].clone();
    let meter = rt.route_meters.get(route.index).cloned();
    ex.routed(route.name.clone(), &cluster, meter);
    let deadline = ex.record.start + cluster.spec.timeouts.request;

    let (mut parts, body) = req.into_parts();
    headers::to_upstream(
        &mut parts.headers,
        parts.version,
        &client.ip,
        authority.as_ref(),
        client.scheme,
    );
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    let (body, done) = RequestBody::new(body, ds.max_request_body_bytes);
    Ok(Prepared {
        cluster,
        req: Request::from_parts(parts, body),
        done,
        deadline,
    })
}

/// Request line plus headers, as sent on the wire (close enough for a limit).
fn head_size(req: &Request<Incoming>) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// The request's authority: the URI's (HTTP/2, absolute-form) or the `Host` header.
fn authority(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    if let Some(a) = req.uri().authority() {
        return Ok(HeaderValue::from_str(a.as_str()).ok());
    }
    match req.headers().get(HOST) {
        Some(h) => Ok(Some(h.clone())),
        None if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest {
            what: "HTTP/1.1 request without a Host header",
        }),
        None => Ok(None),
    }
}

fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_is_stripped() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }
}
