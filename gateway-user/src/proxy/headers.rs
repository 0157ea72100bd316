//! Header rewriting between client and upstream (RFC 9110 section 7.6): hop-by-hop headers are
//! dropped in both directions, including those the `Connection` header names; the request
//! gains `X-Forwarded-For`, `X-Forwarded-Proto` and `Via`, the response gains `Via`.

use std::net::IpAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue, Version,
    header::{self, HOST, VIA},
};

/// Headers that describe one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What a client connection speaks, for `X-Forwarded-Proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    /// TLS (the HTTPS listener), then HTTP.
    Https,
}

impl Scheme {
    fn forwarded_proto(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

/// The pseudonym in `Via`.
const VIA_NAME: &str = "gateway";

/// Removes hop-by-hop headers, and `Upgrade` (upgrades are not proxied).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) names finds which are there; most messages carry none but
    // `Connection`, and removing by name hashes each name, so only what is there is removed.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        } else if name == header::UPGRADE {
            present |= 1 << HOP_BY_HOP.len();
        }
    }
    if present == 0 {
        return;
    }
    // Headers listed in `Connection` are hop-by-hop too. The usual values ("keep-alive",
    // "close") name nothing else, so the common case allocates nothing.
    if present & 1 != 0 {
        let mut listed: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim) {
                if token.is_empty()
                    || token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("close")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    listed.push(name);
                }
            }
        }
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if present & (1 << HOP_BY_HOP.len()) != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// The client address as an `X-Forwarded-For` value; computed once per client connection.
pub(crate) fn client_value(client: IpAddr) -> HeaderValue {
    HeaderValue::try_from(client.to_canonical().to_string())
        .expect("an IP address is a valid header value")
}

fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 gateway",
        Version::HTTP_10 => "1.0 gateway",
        Version::HTTP_2 => "2 gateway",
        Version::HTTP_3 => "3 gateway",
        _ => "1.1 gateway",
    })
}

/// Appends this hop to `Via`, received over `version`.
fn append_via(headers: &mut HeaderMap, version: Version) {
    debug_assert!(via_value(version).to_str().unwrap().ends_with(VIA_NAME));
    headers.append(VIA, via_value(version));
}

/// Rewrites a client's request headers for the upstream. `host` is the request's authority
/// (from `Host`, or from the URI for HTTP/2), set as `Host` if the client sent none; `scheme`
/// what the client's connection speaks (`X-Forwarded-Proto`, replacing the client's own).
pub(crate) fn to_upstream(
    headers: &mut HeaderMap,
    version: Version,
    client: &HeaderValue,
    host: Option<&HeaderValue>,
    scheme: Scheme,
) {
    strip_hop_by_hop(headers);
    // Room for what is added below, at once rather than growing the map step by step.
    headers.reserve(4);
    if !headers.contains_key(HOST)
        && let Some(h) = host
    {
        headers.insert(HOST, h.clone());
    }
    // X-Forwarded-For: the existing list (all header lines) plus this client.
    let mut prior = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    let xff = if prior.peek().is_none() {
        Ok(client.clone())
    } else {
        let mut v: Vec<u8> = Vec::new();
        for p in prior {
            v.extend_from_slice(p.as_bytes());
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(client.as_bytes());
        HeaderValue::from_bytes(&v)
    };
    if let Ok(xff) = xff {
        headers.insert(&X_FORWARDED_FOR, xff);
    }
    headers.insert(&X_FORWARDED_PROTO, scheme.forwarded_proto());
    append_via(headers, version);
}

/// The upstream's `Keep-Alive: timeout=N` (RFC 9112 appendix C.2.2 lists the header; Apache
/// and nginx send it): how long it keeps an idle connection open. `None` when absent or
/// unreadable.
pub(crate) fn keep_alive_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get("keep-alive")?.to_str().ok()?;
    v.split(',').find_map(|p| {
        let (k, n) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("timeout")
            .then(|| n.trim().parse::<u64>().ok())
            .flatten()
            .filter(|n| *n > 0)
            .map(std::time::Duration::from_secs)
    })
}

/// Rewrites an upstream's response headers for the client.
pub(crate) fn to_downstream(headers: &mut HeaderMap, upstream_version: Version) {
    strip_hop_by_hop(headers);
    strip_gateway_headers(headers);
    append_via(headers, upstream_version);
}

/// The prefix of the headers only the gateway writes (`x-gateway-error`, `-evidence`,
/// `-endpoint`, `-attempts`).
const GATEWAY_PREFIX: &str = "x-gateway-";

/// Removes `x-gateway-*` headers an upstream sent: a client must be able to trust that they
/// are the gateway's own evidence, never an upstream's forgery (SECURITY.md).
pub(crate) fn strip_gateway_headers(headers: &mut HeaderMap) {
    if !headers
        .keys()
        .any(|n| n.as_str().starts_with(GATEWAY_PREFIX))
    {
        return;
    }
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with(GATEWAY_PREFIX))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_timeout_is_read_from_the_upstreams_header() {
        let mut h = HeaderMap::new();
        assert_eq!(keep_alive_timeout(&h), None);
        h.insert("keep-alive", HeaderValue::from_static("timeout=5, max=100"));
        assert_eq!(
            keep_alive_timeout(&h),
            Some(std::time::Duration::from_secs(5))
        );
        h.insert(
            "keep-alive",
            HeaderValue::from_static("max=100, Timeout = 2"),
        );
        assert_eq!(
            keep_alive_timeout(&h),
            Some(std::time::Duration::from_secs(2))
        );
        for junk in ["timeout=", "timeout=x", "timeout=0", "max=3"] {
            h.insert("keep-alive", HeaderValue::from_static(junk));
            assert_eq!(keep_alive_timeout(&h), None, "{junk}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn an_upstreams_gateway_headers_are_removed() {
        let mut h = map(&[
            ("x-gateway-error", "upstream_host_died"),
            ("x-gateway-evidence", "syns=9"),
            ("x-gateways", "kept"),
            ("x-keep", "yes"),
        ]);
        to_downstream(&mut h, Version::HTTP_11);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["via", "x-gateways", "x-keep"]);
    }

    #[test]
    fn forwarded_headers_are_appended() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("via", "1.0 edge"),
        ]);
        to_upstream(
            &mut h,
            Version::HTTP_11,
            &client_value("10.0.0.9".parse().unwrap()),
            None,
            Scheme::Http,
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        let via: Vec<_> = h.get_all(VIA).iter().collect();
        assert_eq!(via, vec!["1.0 edge", "1.1 gateway"]);
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut h = HeaderMap::new();
        let authority = HeaderValue::from_static("api.example.com");
        to_upstream(
            &mut h,
            Version::HTTP_2,
            &client_value("::ffff:127.0.0.1".parse().unwrap()),
            Some(&authority),
            Scheme::Https,
        );
        assert_eq!(h[HOST], "api.example.com");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h[VIA], "2 gateway");
    }
}
