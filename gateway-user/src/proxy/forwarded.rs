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

/// What only a proxy tells the next hop about the request's client. A `static`: a `const`
/// array would be built again wherever it is used.
static FORWARDING: [HeaderName; 6] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
    header::FORWARDED,
];

/// Which kind of peer `peer` is; an untrusted one's forwarding headers are removed from
/// `headers`. For a trusted peer, also the client its proxies name ([`client_named`]).
pub(crate) fn admit(
    trusted: Option<&[IpNet]>,
    peer: IpAddr,
    headers: &mut HeaderMap,
) -> (Peer, Option<IpAddr>) {
    let Some(nets) = trusted else {
        return (Peer::Unlisted, None);
    };
    if !within(nets, peer) {
        for name in &FORWARDING {
            headers.remove(name);
        }
        return (Peer::Untrusted, None);
    }
    (Peer::Trusted, client_named(nets, headers))
}

/// Whether a trusted peer's `X-Forwarded-Proto` goes upstream as it came: it says `http` or
/// `https`. Anything else is replaced by what the gateway's own listener speaks.
pub(crate) fn keeps_proto(peer: Peer, headers: &HeaderMap) -> bool {
    peer == Peer::Trusted && headers.get(&X_FORWARDED_PROTO).is_some_and(is_scheme)
}

/// Whether a trusted proxy says its client spoke HTTPS to it (`https_redirect` leaves such a
/// request alone).
pub(crate) fn says_https(peer: Peer, headers: &HeaderMap) -> bool {
    peer == Peer::Trusted
        && headers
            .get(&X_FORWARDED_PROTO)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn is_scheme(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    b.eq_ignore_ascii_case(b"https") || b.eq_ignore_ascii_case(b"http")
}

/// Whether `ip` (IPv4-mapped IPv6 taken as IPv4) is in one of `nets`.
pub(crate) fn within(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// The client a trusted peer's `X-Forwarded-For` names: walking the list from its end (the
/// entry the nearest proxy added) past every trusted proxy, the first address that is not one
/// (nginx's `real_ip_recursive`); the list's first entry when all are. `None` without a list,
/// or when the walk meets an entry that is no address (`unknown`, a name): from there on, the
/// list is what some untrusted hop wrote.
fn client_named(nets: &[IpNet], headers: &HeaderMap) -> Option<IpAddr> {
    let mut first = None;
    for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        for entry in line.to_str().ok()?.rsplit(',') {
            let ip = address(entry.trim())?;
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
fn address(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests;
