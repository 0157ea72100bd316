//! Route: everything before the first attempt. The client-side limits (head size, body size),
//! the authority, the request ID, the route and its cluster, a gRPC call's deadline, and the
//! request rewritten for its upstream (hop-by-hop headers out — but a listed upgrade's and
//! `TE: trailers` kept —, `X-Forwarded-*` and `Via` in, the route's path rewrite and header rules,
//! origin-form URI, HTTP/1.1).

use std::sync::Arc;

use http::{
    HeaderName, HeaderValue, Method, Request, Uri, Version,
    header::{CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, USER_AGENT},
    request::Parts,
    uri::PathAndQuery,
};
use hyper::{body::Incoming, upgrade::OnUpgrade};

use super::{
    Client,
    deadline::{Deadline, deadline},
    gate,
    redirect::Instead,
    target::{self, host_without_port},
};
use crate::{
    config::{ExposeErrors, UpstreamProtocol},
    decide::grpc,
    proxy::{
        error::ProxyError,
        exchange::Exchange,
        forwarded::{self, Peer},
        headers,
        request_body::{Progress, RequestBody},
        request_id,
        router::{CompiledRoute, apply_rules},
        shared::Runtime,
        upstream::Cluster,
    },
};

/// A request checked, routed and rewritten for its upstream.
pub(super) struct Prepared {
    pub cluster: Arc<Cluster>,
    pub route: Arc<CompiledRoute>,
    pub req: Request<RequestBody>,
    /// Told when the client's body has been read to the end; `None` for an empty body.
    pub done: Option<Arc<Progress>>,
    pub deadline: Deadline,
    /// The client's side of an HTTP/1.1 `Upgrade` (WebSocket).
    pub upgrade: Option<OnUpgrade>,
    /// The hash of the `hash_on` key, for a `consistent_hash` cluster: read as the client
    /// sent it, before the route's header rules.
    pub affinity: Option<u64>,
}

pub(super) fn prepare(
    rt: &Runtime,
    req: Request<Incoming>,
    client: &Client,
    ex: &mut Exchange,
) -> Result<Prepared, Instead> {
    ex.expose = rt
        .settings
        .expose_errors
        .unwrap_or(if client.loopback_listener {
            ExposeErrors::Full
        } else {
            ExposeErrors::Reason
        });
    ex.record.tls = client.tls;
    let (mut parts, body, authority) = admit(rt, req, ex)?;
    let (peer, source) = forwarded::admit(
        rt.settings.trusted_proxies.as_deref(),
        client.addr.ip(),
        &mut parts.headers,
    );
    ex.record.forwarded_client = source.named();
    // With `forward_client_cert` the gateway alone speaks for client certificates, to its
    // routes too (a forged header met a route's condition over plain HTTP).
    let forward = rt.settings.forwards_client_cert();
    forwarded::client_cert(&mut parts.headers, forward, client.client_cert.as_ref());
    let route = find_route(rt, authority.as_ref(), &parts)?;
    let cluster = rt.clusters[route.cluster].clone();
    let meter = rt.route_meters.get(route.index).cloned();
    ex.routed(route, &cluster, meter);
    gate::check(
        route,
        (client, peer, source),
        &parts,
        authority.as_ref(),
        ex,
    )?;
    // The route's limit, else the router's: checked against a declared length before anything
    // is read or sent, and against the bytes as they arrive (`RequestBody`).
    let body_limit = route
        .policy
        .max_request_body_bytes
        .or(rt.settings.downstream.max_request_body_bytes);
    if let Some(limit) = body_limit
        && content_length(&parts).is_some_and(|n| n > limit)
    {
        return Err(ProxyError::RequestBodyTooLarge { limit }.into());
    }
    let deadline = deadline(ex, route, &parts);
    deadline.passed(ex.record.start)?;
    if deadline.grpc {
        ex.call_deadline = Some(deadline.at);
    }
    let id = ex
        .request_id_header
        .as_ref()
        .zip(ex.record.request_id.as_ref());
    let affinity = super::affinity::key(&cluster, &parts.headers, ex.record.client_ip());
    let upgrade = for_upstream(
        &mut parts,
        (route, &cluster),
        (client, peer, forward),
        authority.as_ref(),
        id,
    )?;
    let (body, done) = RequestBody::new(body, body_limit);
    Ok(Prepared {
        cluster,
        route: route.clone(),
        req: Request::from_parts(parts, body),
        done,
        deadline,
        upgrade,
        affinity,
    })
}

/// The client-side checks before routing (head size, `CONNECT`, dot-segments, authority), the
/// request ID, and what the access log and a gRPC answer need to know of the request.
fn admit(
    rt: &Runtime,
    req: Request<Incoming>,
    ex: &mut Exchange,
) -> Result<(Parts, Incoming, Option<HeaderValue>), ProxyError> {
    let ds = &rt.settings.downstream;
    let size = head_size(&req);
    if size > ds.max_request_header_bytes {
        return Err(ProxyError::RequestHeadersTooLarge {
            size,
            limit: ds.max_request_header_bytes,
        });
    }
    if req.headers().len() > MAX_REQUEST_HEADERS {
        too_many_fields(&req)?;
    }
    // RFC 9113 section 8.2.1: malformed, and not to be forwarded. HTTP/1's parser takes such
    // whitespace off as the field's OWS; h2 (the crate) lets it through.
    if req.version() == Version::HTTP_2 && req.headers().values().any(padded) {
        return Err(ProxyError::BadRequest {
            what: "an HTTP/2 header value that starts or ends with a space or a tab",
        });
    }
    let (mut parts, body) = req.into_parts();
    if let Some(cfg) = &rt.settings.request_id {
        ex.record.request_id = Some(request_id::assign(cfg, &mut parts.headers));
        ex.request_id_header = Some(cfg.header.clone());
    }
    if ex.shared.log.is_on() {
        // Only the access log shows it.
        ex.record.user_agent = parts.headers.get(USER_AGENT).cloned();
    }
    ex.grpc = parts.method == Method::POST
        && parts
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| grpc::is_grpc(v.as_bytes()));
    if parts.method == Method::CONNECT {
        return Err(ProxyError::BadRequest {
            what: "CONNECT is not supported",
        });
    }
    if target::has_dot_segment(parts.uri.path()) {
        return Err(ProxyError::BadRequest {
            what: "a `.` or `..` segment in the path (dot-segments are resolved by the client, never sent)",
        });
    }
    let authority = authority(&parts)?;
    ex.record.host = authority.clone();
    Ok((parts, body, authority))
}

/// The route for the request's host, path, method and headers; none for a host other than
/// `[router] gateway_host`, which is not this gateway's.
fn find_route<'a>(
    rt: &'a Runtime,
    authority: Option<&HeaderValue>,
    parts: &Parts,
) -> Result<&'a Arc<CompiledRoute>, ProxyError> {
    let host = authority
        .and_then(|a| a.to_str().ok())
        .map_or("", host_without_port);
    let path = parts.uri.path();
    let route = |path: &str| {
        rt.settings
            .gateway_host
            .as_ref()
            .is_none_or(|h| h.matches(host))
            .then_some(())
            .and_then(|()| rt.router.route(host, path, &parts.method, &parts.headers))
    };
    let chosen = route(path);
    // Another route's path once spelt plainly: the upstream may read it so (`target`).
    if let Some(read) = target::as_upstreams_read(path)
        && !same_route(chosen, route(&read))
    {
        return Err(ProxyError::BadRequest {
            what: "a path that reads as another route's once its percent-encoding, `//`, `\\` or \
                   `;` parameters are read as an upstream may read them",
        });
    }
    chosen.ok_or_else(|| ProxyError::NoRoute {
        host: host.to_owned(),
        path: path.to_owned(),
    })
}

fn same_route(a: Option<&Arc<CompiledRoute>>, b: Option<&Arc<CompiledRoute>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// The request rewritten for its upstream: hop-by-hop headers out (an upgrade the route lists
/// kept, and taken from the client's connection; any other dropped), forwarding headers in, the
/// route's path rewrite and header rules, HTTP/1.1. A listed upgrade to a cluster that does not
/// speak HTTP/1.1 is refused.
/// `request_id`: the request ID's header and value, when request IDs are on.
fn for_upstream(
    parts: &mut Parts,
    (route, cluster): (&CompiledRoute, &Cluster),
    (client, peer, forward): (&Client, Peer, bool),
    authority: Option<&HeaderValue>,
    request_id: Option<(&HeaderName, &HeaderValue)>,
) -> Result<Option<OnUpgrade>, ProxyError> {
    // HTTP/2 carries the host as `:authority`, which must be a valid authority: without one the
    // request cannot be sent (h2 refuses it), and the refusal would read as the upstream's
    // fault and cost the shared connection.
    if cluster.spec.protocol != UpstreamProtocol::Http1
        && !authority.is_some_and(plausible_authority)
    {
        return Err(ProxyError::BadRequest {
            what: "a request to an HTTP/2 upstream needs a valid Host",
        });
    }
    // An absolute-form target (or HTTP/2's `:authority`) is the request's host, whatever its
    // `Host` header says (RFC 9112 section 3.2.2): the upstream is sent the host the request
    // was routed on.
    if parts.uri.authority().is_some()
        && let Some(a) = authority
    {
        parts.headers.insert(HOST, a.clone());
    }
    if parts.version == Version::HTTP_2 && cluster.spec.protocol == UpstreamProtocol::Http1 {
        headers::join_cookies(&mut parts.headers);
    }
    let proto = forwarded::proto(peer, &parts.headers);
    let stripped = headers::to_upstream(
        &mut parts.headers,
        parts.version,
        &client.ip,
        authority,
        (client.scheme, proto),
    );
    // hyper takes `chunked` off and leaves the others on the body, which would reach the
    // upstream coded with nothing saying so.
    if stripped.other_coding {
        return Err(ProxyError::BadRequest {
            what: "a transfer coding other than chunked",
        });
    }
    // A client's `Connection` may name the request ID's header, or the client certificate's,
    // which the strip then took out: the gateway's own go upstream all the same.
    if stripped.listed {
        forwarded::client_cert(&mut parts.headers, forward, client.client_cert.as_ref());
        if let Some((name, id)) = request_id {
            parts.headers.insert(name, id.clone());
        }
    }
    let upgrade = match stripped.upgrade {
        Some(value)
            if parts.version == Version::HTTP_11 && headers::tunnels(&value, &route.upgrades) =>
        {
            if cluster.spec.protocol != UpstreamProtocol::Http1 {
                return Err(ProxyError::UpgradeUnsupported {
                    cluster: cluster.spec.name.clone(),
                    protocol: cluster.spec.protocol.name(),
                });
            }
            headers::restore_upgrade(&mut parts.headers, value);
            parts.extensions.remove::<OnUpgrade>()
        }
        _ => None,
    };
    parts.uri = upstream_uri(route, &parts.uri);
    // `rewrite_prefix` may make one of what was none: `/static../admin` under prefix
    // `/static` and rewrite `/v1/` goes up as `/v1/../admin`.
    if route.rewrite.is_some() && target::has_dot_segment(parts.uri.path()) {
        return Err(ProxyError::BadRequest {
            what: "a `.` or `..` segment in the path once the route's rewrite_prefix replaced its prefix",
        });
    }
    parts.version = Version::HTTP_11;
    apply_rules(&route.request_headers, &mut parts.headers);
    Ok(upgrade)
}

/// Origin-form, with the route's prefix rewritten.
fn upstream_uri(route: &CompiledRoute, uri: &Uri) -> Uri {
    let path = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    if let Some(p) = route
        .rewritten(path)
        .and_then(|p| PathAndQuery::try_from(p).ok())
    {
        return Uri::from(p);
    }
    Uri::from(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    )
}

/// The most header fields a request may carry: hyper's HTTP/1 parser stops at 100 (a bare 431
/// before the gateway sees the request), and Envoy's default is the same. HTTP/2 had no limit
/// but the header list's size, in which HPACK makes a repeated field cost a byte on the wire:
/// 3,000 `x: y` per request held 543 MB of the gateway for 7.2 MB sent.
pub(crate) const MAX_REQUEST_HEADERS: usize = 100;

/// The most `cookie` fields a request may carry: HTTP/2 clients send one per cookie, and
/// browsers keep up to 180 per domain.
pub(crate) const MAX_COOKIE_FIELDS: usize = 256;

/// A request with more than [`MAX_REQUEST_HEADERS`] fields: an error unless its `cookie`
/// fields, counted as the one line they would be in HTTP/1, bring it within the limit (and
/// they are at most [`MAX_COOKIE_FIELDS`]).
fn too_many_fields(req: &Request<Incoming>) -> Result<(), ProxyError> {
    let cookies = req.headers().get_all(COOKIE).iter().count();
    let fields = req.headers().len() - cookies.saturating_sub(1);
    if fields > MAX_REQUEST_HEADERS {
        return Err(ProxyError::TooManyRequestHeaders {
            fields,
            what: "header fields",
            limit: MAX_REQUEST_HEADERS,
        });
    }
    if cookies > MAX_COOKIE_FIELDS {
        return Err(ProxyError::TooManyRequestHeaders {
            fields: cookies,
            what: "cookie fields",
            limit: MAX_COOKIE_FIELDS,
        });
    }
    Ok(())
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

/// The request's authority: the URI's (HTTP/2, absolute-form) or the `Host` header. More
/// than one `Host` line is a 400 (RFC 9112 section 3.2), as is a `Host` with a byte no host
/// and port has (whitespace, a control or non-ASCII byte, `/`, `?`, `#`, `@`, `\`: the same
/// section's "invalid field value"; an empty one is allowed there) and userinfo in the target's
/// authority (RFC 9110 section 4.2.4).
fn authority(req: &Parts) -> Result<Option<HeaderValue>, ProxyError> {
    let mut hosts = req.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest {
            what: "more than one Host header",
        });
    }
    if let Some(a) = req.uri.authority() {
        if a.as_str().contains('@') {
            return Err(ProxyError::BadRequest {
                what: "userinfo in the request target",
            });
        }
        return Ok(HeaderValue::from_str(a.as_str()).ok());
    }
    match host {
        Some(h) if !h.is_empty() && !plausible_authority(h) => Err(ProxyError::BadRequest {
            what: "a Host header with a byte no host[:port] has",
        }),
        Some(h) => Ok(Some(h.clone())),
        None if req.version == Version::HTTP_11 => Err(ProxyError::BadRequest {
            what: "HTTP/1.1 request without a Host header",
        }),
        // It would go upstream as HTTP/1.1 without `Host`, which the upstream refuses: its
        // 400 would read as the upstream's answer (RFC 9113 section 8.3.1).
        None if req.version == Version::HTTP_2 => Err(ProxyError::BadRequest {
            what: "HTTP/2 request without :authority or Host",
        }),
        None => Ok(None),
    }
}

/// Whether `a` can be an HTTP/2 `:authority` (what `http::uri::Authority` would refuse,
/// checked without the copy that parsing makes): not empty, no whitespace, control bytes,
/// path, query, fragment or userinfo delimiters, and a port of digits only.
fn plausible_authority(a: &HeaderValue) -> bool {
    let b = a.as_bytes();
    if b.is_empty()
        || !b
            .iter()
            .all(|&c| c.is_ascii_graphic() && !matches!(c, b'/' | b'?' | b'#' | b'@' | b'\\'))
    {
        return false;
    }
    // The port, if any: digits, after the one `:` outside brackets. Routes take the host up to
    // the last `:` and nginx up to the first, so `admin.example.com:80:90` or `…:abc` missed
    // the host's route here and reached its vhost there.
    let port = match (b[0], b.iter().rposition(|&c| c == b']')) {
        (b'[', Some(end)) => &b[end + 1..],
        (_, Some(_)) | (b'[', None) => return false,
        _ => b
            .iter()
            .position(|&c| c == b':')
            .map_or(&[][..], |i| &b[i..]),
    };
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// A field value with a space or tab at either end.
fn padded(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
}

fn content_length(req: &Parts) -> Option<u64> {
    req.headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
