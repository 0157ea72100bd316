//! Header rewriting between client and upstream (RFC 9110 section 7.6): hop-by-hop headers are
//! dropped in both directions, including those the `Connection` header names; the request
//! gains `X-Forwarded-For`, `X-Forwarded-Proto` and `Via`, the response gains `Via`.
//!
//! Two exceptions carry a hop's meaning end to end: a request's `TE: trailers` (gRPC needs it,
//! RFC 9113 section 8.2.2 allows it over HTTP/2) is kept, and an `Upgrade` that `Connection`
//! names is handed back to the caller ([`Stripped::upgrade`]), which proxies the upgrade and
//! writes both headers again.

use std::net::IpAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue, Version,
    header::{self, Entry, HOST, VIA},
};

/// How many [`HOP_BY_HOP`] names there are.
const HOP_COUNT: usize = 8;

/// `Keep-Alive` (RFC 9112 appendix C.2.2), which the `http` crate does not name.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers that describe one connection, never forwarded. A `static`, not a `const`: a
/// `const` array is built (and dropped) again wherever it is used.
static HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    KEEP_ALIVE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    // The settings of an h2c upgrade (RFC 7540 section 3.2.1: connection-specific), which the
    // gateway never tunnels (`tunnels`).
    HeaderName::from_static("http2-settings"),
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

/// What [`strip_hop_by_hop`] took out that the caller may want back.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Stripped {
    /// The `Upgrade` header, when `Connection` named `upgrade` (an upgrade request, or a
    /// `101`'s answer).
    pub upgrade: Option<HeaderValue>,
    /// `TE` included `trailers`.
    pub te_trailers: bool,
    /// The `Keep-Alive` value: a response's says how long the upstream keeps the connection
    /// open while idle ([`keep_alive_value_timeout`]).
    pub keep_alive: Option<HeaderValue>,
    /// `Connection` named other headers, which were removed as hop-by-hop too.
    pub listed: bool,
    /// `Transfer-Encoding` named a coding besides `chunked` (which hyper decodes; the others
    /// stay on the body).
    pub other_coding: bool,
}

/// Bit of `Upgrade` in [`strip_hop_by_hop`]'s mask (after those of [`HOP_BY_HOP`]).
const UPGRADE_BIT: u16 = 1 << HOP_COUNT;
/// Bit of `TE` (index 5 of [`HOP_BY_HOP`]).
const TE_BIT: u16 = 1 << 5;
/// Bit of `Keep-Alive` (index 1 of [`HOP_BY_HOP`]).
const KEEP_ALIVE_BIT: u16 = 1 << 1;
/// Bit of `Transfer-Encoding` (index 6 of [`HOP_BY_HOP`]).
const TRANSFER_ENCODING_BIT: u16 = 1 << 6;

/// Removes hop-by-hop headers, including `Upgrade` and `TE`; says whether an upgrade and
/// `TE: trailers` were among them, and hands back the `Keep-Alive` value. A message that came
/// with `Transfer-Encoding` also loses its `Content-Length`: hyper framed it by the encoding,
/// which overrides the length, and an intermediary must remove the length before forwarding
/// (RFC 9112 section 6.3). Forwarded, it announced a length the body did not have: an upstream
/// answering `Content-Length: 100` and a chunked `ok` gave its client a truncated response.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) -> Stripped {
    // One pass over the (few) headers finds which are there, and whether `Connection` says
    // more than the usual "keep-alive" or "close"; most messages carry none but `Connection`,
    // and removing (or looking up) by name hashes each name, so only what is there is touched.
    let mut present = 0u16;
    let mut connection_names_more = false;
    for (name, value) in headers.iter() {
        let bit = hop_bit(name);
        present |= bit;
        connection_names_more |= bit == 1 && !names_nothing_else(value);
    }
    if present == 0 {
        return Stripped::default();
    }
    // Before `Connection` takes it out: a client that sends `TE` lists it there (RFC 9110
    // section 10.1.4 asks it to).
    let te_trailers = present & TE_BIT != 0 && te_trailers(headers);
    let other_coding = present & TRANSFER_ENCODING_BIT != 0 && other_coding(headers);
    // Headers listed in `Connection` are hop-by-hop too. The usual values name nothing else,
    // so the common case allocates nothing.
    let mut upgrade = false;
    if connection_names_more {
        let mut listed: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            if names_nothing_else(v) {
                continue;
            }
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim) {
                if token.is_empty()
                    || token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("close")
                {
                    continue;
                }
                if token.eq_ignore_ascii_case("upgrade") {
                    upgrade = true;
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
    // The set bits of `present` below `Upgrade`'s, lowest first.
    let mut hop = present & (UPGRADE_BIT - 1);
    let mut keep_alive = None;
    while hop != 0 {
        let i = hop.trailing_zeros();
        let removed = headers.remove(&HOP_BY_HOP[i as usize]);
        if 1 << i == KEEP_ALIVE_BIT {
            keep_alive = removed;
        }
        hop &= hop - 1;
    }
    if present & TRANSFER_ENCODING_BIT != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
    let upgrade_value = if present & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    Stripped {
        upgrade: upgrade_value.filter(|_| upgrade),
        te_trailers,
        keep_alive,
        listed: connection_names_more,
        other_coding,
    }
}

/// `Transfer-Encoding` names a coding besides `chunked` (or is no text).
fn other_coding(headers: &HeaderMap) -> bool {
    headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',')
                .map(str::trim)
                .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked"))
        })
    })
}

/// Whether `TE` lists `trailers`.
fn te_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                let coding = t.split(';').next().unwrap_or("");
                coding.trim().eq_ignore_ascii_case("trailers")
            })
        })
    })
}

/// A `Connection` value that is what almost every message says ("keep-alive" or "close"),
/// and names no other header.
fn names_nothing_else(v: &HeaderValue) -> bool {
    let v = v.as_bytes();
    v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
}

/// The bit of `name` in [`strip_hop_by_hop`]'s mask: of its index in [`HOP_BY_HOP`], of
/// `Upgrade`, or none. By length first: most names a message carries (`Host`, `Date`,
/// `Content-Type`, ...) have none of these lengths, and are not compared with any.
fn hop_bit(name: &HeaderName) -> u16 {
    let s = name.as_str();
    if !matches!(s.len(), 2 | 7 | 10 | 14 | 16..=19) {
        return 0;
    }
    match HOP_BY_HOP.iter().position(|h| h.as_str() == s) {
        Some(i) => 1 << i,
        None if s == header::UPGRADE.as_str() => UPGRADE_BIT,
        None => 0,
    }
}

/// Whether an `Upgrade` a client asked for is tunnelled to the upstream: when the cluster's
/// `upgrades` (lowercase; WebSocket by default) holds its whole value. Any other is dropped with
/// the other hop-by-hop headers and the request goes on as a plain one, which RFC 9110 section
/// 7.8 lets a server do. Above all `h2c`, which `upgrades` never holds: tunnelled, it would let
/// a client speak HTTP/2 straight to the upstream behind one routed request, past every route,
/// rule and log line of the gateway ("h2c smuggling"); `curl --http2` sends it with every
/// `http://` request.
pub(crate) fn tunnels(upgrade: &HeaderValue, allowed: &[String]) -> bool {
    let value = upgrade.as_bytes().trim_ascii();
    allowed
        .iter()
        .any(|p| value.eq_ignore_ascii_case(p.as_bytes()))
}

/// Writes an upgrade's hop-by-hop pair again: `Connection: upgrade`, `Upgrade: value`.
pub(crate) fn restore_upgrade(headers: &mut HeaderMap, value: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, value);
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
/// what the client's connection speaks (`X-Forwarded-Proto`, replacing the client's own),
/// unless `proto`: the scheme a trusted proxy said (`forwarded::proto`). `TE: trailers` is kept; an
/// upgrade's `Upgrade` value is returned (not written back), and what else the strip found.
pub(crate) fn to_upstream(
    headers: &mut HeaderMap,
    version: Version,
    client: &HeaderValue,
    host: Option<&HeaderValue>,
    (scheme, proto): (Scheme, Option<HeaderValue>),
) -> Stripped {
    let stripped = strip_hop_by_hop(headers);
    if stripped.te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // Room for what is added below, at once rather than growing the map step by step.
    headers.reserve(4);
    if !headers.contains_key(HOST)
        && let Some(h) = host
    {
        headers.insert(HOST, h.clone());
    }
    // X-Forwarded-For: the existing list (all header lines) plus this client. One lookup
    // reads and writes it (hashing the name is most of either).
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            e.insert(client.clone());
        }
        Entry::Occupied(mut e) => {
            let v = joined(e.iter().chain(std::iter::once(client)), b", ");
            // Replaces all the lines; an unusable list is left as it was.
            if let Ok(xff) = HeaderValue::from_bytes(&v) {
                e.insert(xff);
            }
        }
    }
    let proto = proto.unwrap_or_else(|| scheme.forwarded_proto());
    headers.insert(&X_FORWARDED_PROTO, proto);
    append_via(headers, version);
    stripped
}

/// Joins a request's `cookie` fields into one, with "; " (RFC 9113 section 8.2.3), for an
/// HTTP/1.1 upstream: HTTP/2 clients send each cookie as a field of its own (browsers do, so
/// that each compresses on its own), and HTTP/1.1 allows one `Cookie` line (RFC 6265 section
/// 5.4), which is all many servers read.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let Entry::Occupied(mut e) = headers.entry(header::COOKIE) else {
        return;
    };
    if e.iter().nth(1).is_none() {
        return;
    }
    if let Ok(one) = HeaderValue::from_bytes(&joined(e.iter(), b"; ")) {
        e.insert(one);
    }
}

/// Header values as one, `sep` between them.
fn joined<'a>(values: impl Iterator<Item = &'a HeaderValue>, sep: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::new();
    for (i, p) in values.enumerate() {
        if i > 0 {
            v.extend_from_slice(sep);
        }
        v.extend_from_slice(p.as_bytes());
    }
    v
}

/// The upstream's `Keep-Alive: timeout=N` (RFC 9112 appendix C.2.2 lists the header; Apache
/// and nginx send it): how long it keeps an idle connection open. `None` when absent or
/// unreadable.
pub(crate) fn keep_alive_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    // By its `HeaderName`: a `&str` key is parsed into one at every lookup.
    keep_alive_value_timeout(headers.get(KEEP_ALIVE)?)
}

/// [`keep_alive_timeout`] from the header's value (as [`to_downstream`] hands it back).
pub(crate) fn keep_alive_value_timeout(v: &HeaderValue) -> Option<std::time::Duration> {
    let v = v.to_str().ok()?;
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

/// Rewrites an upstream's response headers for the client; returns what was stripped, with
/// the `Upgrade` value of a `101`'s answer (not written back) and the `Keep-Alive` value.
pub(crate) fn to_downstream(headers: &mut HeaderMap, upstream_version: Version) -> Stripped {
    let stripped = strip_hop_by_hop(headers);
    strip_gateway_headers(headers);
    append_via(headers, upstream_version);
    stripped
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
mod tests;
