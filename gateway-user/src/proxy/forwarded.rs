//! `[router.forwarded] trusted_proxies`: whose `X-Forwarded-*` headers a request keeps. A
//! proxy in front of the gateway (a load balancer that terminates TLS, a CDN) says who its
//! client was and what it spoke; any other peer could say anything. So an untrusted peer's
//! forwarding headers are removed before the request is routed (a route's header condition
//! cannot be met with them), and `headers::to_upstream` writes the gateway's own.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use ipnet::IpNet;

use super::headers::{X_FORWARDED_FOR, X_FORWARDED_PROTO};

/// Where a request came from, as far as its forwarding headers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    /// No `trusted_proxies`: every peer's `X-Forwarded-For` is appended to, and
    /// `X-Forwarded-Proto` is the gateway's own (what nginx's `$proxy_add_x_forwarded_for`
    /// and HAProxy's `option forwardfor` do).
    Unlisted,
    /// A trusted proxy: its `X-Forwarded-For` is appended to, its `X-Forwarded-Proto` kept.
    Trusted,
    /// Any other peer, with `trusted_proxies` set: its forwarding headers were removed.
    Untrusted,
}

/// The client a route's `allow_clients` and `rate_limit` go by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The peer itself: no trusted proxy in front, or one that sent no `X-Forwarded-For`
    /// (a request of its own, such as a health check).
    Peer(IpAddr),
    /// The client a trusted proxy's `X-Forwarded-For` names.
    Named(IpAddr),
    /// A trusted proxy's list that names no client: an entry that is no address where the
    /// client's should be. The proxy in front did not append the address it saw.
    Unknown,
}

impl Source {
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            Source::Peer(ip) | Source::Named(ip) => Some(ip),
            Source::Unknown => None,
        }
    }

    /// What the access log's `forwarded_client` shows.
    pub fn named(self) -> Option<IpAddr> {
        match self {
            Source::Named(ip) => Some(ip),
            _ => None,
        }
    }
}

/// What only a proxy tells the next hop about the request's client: its address, its scheme,
/// the host it asked for, and the certificate it showed (as Envoy's `X-Forwarded-Client-Cert`
/// and nginx's or HAProxy's `X-SSL-Client-*` headers pass it on). A `static`: a `const` array
/// would be built again wherever it is used.
static FORWARDING: [HeaderName; 25] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("front-end-https"),
    header::FORWARDED,
    // Client addresses that Rails (`Client-IP`), CDNs and other load balancers write.
    HeaderName::from_static("client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-original-forwarded-for"),
    // A client certificate's identity, which an upstream behind a proxy that checks it
    // trusts as checked.
    HeaderName::from_static("x-forwarded-client-cert"),
    HeaderName::from_static("x-client-cert"),
    HeaderName::from_static("x-ssl-client-cert"),
    HeaderName::from_static("x-ssl-client-verify"),
    HeaderName::from_static("x-ssl-client-s-dn"),
    HeaderName::from_static("ssl-client-cert"),
    HeaderName::from_static("ssl-client-verify"),
];

/// The forwarding headers the gateway writes itself: spelt with `_`, a CGI-style server reads
/// them as these, so from any peer they would contradict the gateway's own.
static WRITTEN: [HeaderName; 2] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
];

/// Which kind of peer `peer` is, and the client the request is from; an untrusted peer's
/// forwarding headers are removed from `headers`, under their names spelt with `_` too
/// (CGI-style servers read `X_Forwarded_For` as `X-Forwarded-For`). From any peer, the `_`
/// spellings of the ones the gateway writes itself are removed.
pub(crate) fn admit(
    trusted: Option<&[IpNet]>,
    peer: IpAddr,
    headers: &mut HeaderMap,
) -> (Peer, Source) {
    let peer_ip = peer.to_canonical();
    let untrusted = trusted.is_some_and(|nets| !within(nets, peer));
    if untrusted {
        remove_spelt_as(headers, &FORWARDING, true);
    } else {
        remove_spelt_as(headers, &WRITTEN, false);
    }
    let Some(nets) = trusted else {
        return (Peer::Unlisted, Source::Peer(peer_ip));
    };
    if untrusted {
        return (Peer::Untrusted, Source::Peer(peer_ip));
    }
    let source = if headers.contains_key(&X_FORWARDED_FOR) {
        client_named(nets, headers).map_or(Source::Unknown, Source::Named)
    } else {
        Source::Peer(peer_ip)
    };
    (Peer::Trusted, source)
}

/// With `[router.tls] forward_client_cert` on (`forward`, as the current config says), the
/// gateway alone speaks for client certificates: every request loses the
/// `X-Forwarded-Client-Cert` it carried (also spelt with `_`), whoever sent it and on whichever
/// listener, and one over a connection that showed a certificate (`cert`) gets the one this
/// hop verified. Called before routing, and again after the hop-by-hop strip when `Connection`
/// named headers, so that naming this one does not take it out. Envoy's `SANITIZE_SET` does the
/// same.
pub(crate) fn client_cert(headers: &mut HeaderMap, forward: bool, cert: Option<&HeaderValue>) {
    if !forward {
        return;
    }
    remove_spelt_as(headers, &CLIENT_CERT, true);
    if let Some(cert) = cert {
        headers.insert(crate::tls::client_cert::HEADER, cert.clone());
    }
}

static CLIENT_CERT: [HeaderName; 1] = [crate::tls::client_cert::HEADER];

/// Removes every header that is one of `names`, also spelt with `_` for `-`; with `exact`
/// false, only those `_` spellings.
fn remove_spelt_as(headers: &mut HeaderMap, names: &[HeaderName], exact: bool) {
    // One pass over the request's few names, lengths compared first: most requests have none
    // of these, and then nothing is gathered or hashed.
    let mut found: Vec<HeaderName> = Vec::new();
    for key in headers.keys() {
        let k = key.as_str().as_bytes();
        if names
            .iter()
            .any(|n| spelt_as(n.as_str().as_bytes(), k, exact))
        {
            found.push(key.clone());
        }
    }
    for name in found {
        headers.remove(name);
    }
}

/// Whether `written` is `name`, or `name` with `_` for some `-` (only that, unless `exact`).
fn spelt_as(name: &[u8], written: &[u8], exact: bool) -> bool {
    name.len() == written.len()
        && (exact || written.contains(&b'_'))
        && name
            .iter()
            .zip(written)
            .all(|(a, b)| a == b || (*a == b'-' && *b == b'_'))
}

/// The scheme a trusted proxy says its client spoke: the last entry of its
/// `X-Forwarded-Proto` (the one the nearest proxy wrote, when each appends), if it is `http`
/// or `https`. `None` for any other peer or value: the gateway's own listener's scheme goes
/// upstream instead.
pub(crate) fn proto(peer: Peer, headers: &HeaderMap) -> Option<HeaderValue> {
    if peer != Peer::Trusted {
        return None;
    }
    let last = headers.get_all(&X_FORWARDED_PROTO).iter().next_back()?;
    let entry = last.as_bytes().rsplit(|&b| b == b',').next()?.trim_ascii();
    if entry.eq_ignore_ascii_case(b"https") {
        Some(HeaderValue::from_static("https"))
    } else if entry.eq_ignore_ascii_case(b"http") {
        Some(HeaderValue::from_static("http"))
    } else {
        None
    }
}

/// Whether `ip` (IPv4-mapped IPv6 taken as IPv4) is in one of `nets`.
pub(crate) fn within(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// The client a trusted peer's `X-Forwarded-For` names: walking the list from its end (the
/// entry the nearest proxy added) past every trusted proxy, the first address that is not one
/// (nginx's `real_ip_recursive`); the list's first entry when all are. Entries are split on
/// the raw bytes, so that a client's own unreadable entry on the line its proxy appended to
/// stops nothing before it is reached. `None` when the walk meets an entry that is no address
/// (`unknown`, a name, bytes that are not text) before it finds the client.
fn client_named(nets: &[IpNet], headers: &HeaderMap) -> Option<IpAddr> {
    let mut first = None;
    for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        for entry in line.as_bytes().rsplit(|&b| b == b',') {
            let ip = address(entry.trim_ascii())?;
            if !within(nets, ip) {
                return Some(ip);
            }
            first = Some(ip);
        }
    }
    first
}

/// An `X-Forwarded-For` entry's address: `192.0.2.7`, `2001:db8::1`, or with a port as some
/// proxies write it (`192.0.2.7:5000`, `[2001:db8::1]:5000`).
fn address(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?;
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests;
