//! Endpoint addresses and route hosts, from the strings the operator wrote: what each may look
//! like, and why one is refused (the reason goes into [`super::Invalid`]).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::super::settings::{EndpointAddr, HostMatch};

/// `"10.0.0.5:8080"`, `"[::1]:8080"` or `"api.internal:8080"`.
pub(crate) fn parse_endpoint(s: &str) -> Result<EndpointAddr, &'static str> {
    if s.contains("://") {
        return Err(
            "no scheme: an endpoint is an address and a port (a cluster's `tls` table makes it HTTPS)",
        );
    }
    if s.starts_with('[') && s.ends_with(']') {
        return Err("no port");
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("port 0");
        }
        return Ok(EndpointAddr::Ip(addr));
    }
    let (host, port) = s.rsplit_once(':').ok_or("no port")?;
    let port: u16 = port
        .parse()
        .map_err(|_| "port is not a number in 1..=65535")?;
    if port == 0 {
        return Err("port 0");
    }
    if host.is_empty() {
        return Err("no host");
    }
    if host.contains(':') || host.starts_with('[') {
        return Err("IPv6 addresses need brackets, e.g. [::1]:8080");
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("not an IPv4 address (four numbers of 0 to 255) nor a host name");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("a hostname has only letters, digits, '-', '_' and '.'");
    }
    Ok(EndpointAddr::Host {
        host: host.to_ascii_lowercase(),
        port,
    })
}

pub(super) fn parse_host(s: &str) -> Result<HostMatch, &'static str> {
    // A fully qualified name's trailing dot: requests are matched without it.
    let lower = s.to_ascii_lowercase();
    let lower = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
    let (suffix, name) = match lower.strip_prefix('*') {
        Some(rest) if rest.starts_with('.') => (true, rest),
        Some(_) => return Err("a wildcard is only allowed as a leading \"*.\""),
        None => (false, lower.as_str()),
    };
    if name.trim_start_matches('.').is_empty() {
        return Err("empty host");
    }
    if name.contains("://") || name.contains('/') {
        return Err("a host name alone, without a scheme or a path");
    }
    if name.contains(':') {
        return Err("no port: routes match the host whatever the port");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("a host has only letters, digits, '-', '_' and '.'");
    }
    Ok(if suffix {
        HostMatch::Suffix(name.to_owned())
    } else {
        HostMatch::Exact(name.to_owned())
    })
}

/// A trusted proxy or an allowed client: `"10.0.0.0/8"`, `"2001:db8::/32"`, or one address
/// (`"192.0.2.7"`, a /32 or /128). A block's host bits are cleared: `"10.1.2.3/8"` is
/// `10.0.0.0/8`.
pub(super) fn parse_block(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip.to_canonical()));
    }
    let net = s.parse::<IpNet>().ok()?.trunc();
    // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block it maps: peers are
    // matched as IPv4.
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .ok()
            .map(IpNet::V4);
    }
    Some(net)
}
