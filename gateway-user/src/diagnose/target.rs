//! Targets as the user writes them (`host:port`, `[v6]:port`, or a cluster name of a running
//! gateway) and their resolution into addresses, timed: a name that fails to resolve, or takes
//! longer than [`super::classify::SLOW_RESOLUTION`], is itself a finding (`dns_failure`).
//!
//! Names go through `getaddrinfo(3)`, like most clients, so /etc/hosts and nsswitch.conf apply.
//! It runs on its own thread, which is abandoned after [`RESOLVE_TIMEOUT`] (glibc's resolver
//! cannot be cancelled).

use std::{
    ffi::{CStr, CString},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use thiserror::Error;

use super::measure::{Resolution, ResolutionMethod};

/// How long a name may take to resolve before `diagnose` stops waiting for it.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `host:port` or `[v6]:port`.
    Endpoint { host: Host, port: u16 },
    /// A bare name: a cluster of a running gateway, looked up through `--admin`.
    Cluster(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Endpoint { host, port } => write!(f, "{host}:{port}"),
            Target::Cluster(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid target `{input}`: {reason}; write host:port, [ipv6]:port, or a cluster name \
     together with --admin ADDR"
)]
pub struct TargetError {
    pub input: String,
    pub reason: String,
}

/// Parses one TARGET argument.
pub fn parse_target(input: &str) -> Result<Target, TargetError> {
    let fail = |reason: &str| TargetError {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(fail("it is empty"));
    }
    // A URL pasted from an error message or a browser: its host and port (the scheme's
    // default when none is written). It read as an IPv6 address without brackets.
    if let Some((scheme, rest)) = s.split_once("://") {
        let default = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => {
                return Err(fail(&format!(
                    "`{scheme}://` is not an http:// or https:// URL"
                )));
            }
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:{default}")
        } else {
            authority.to_owned()
        };
        return parse_target(&with_port).map_err(|e| fail(&e.reason));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| fail("an IPv6 address opened with `[` is never closed with `]`"))?;
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| fail(&format!("`{inside}` is not an IPv6 address")))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| fail("the port is missing after `]` (e.g. [::1]:8080)"))?;
        return Ok(Target::Endpoint {
            host: Host::Ip(IpAddr::V6(ip)),
            port: parse_port(port).map_err(|r| fail(&r))?,
        });
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        if s.parse::<IpAddr>().is_ok() {
            return Err(fail("the port is missing (e.g. 10.0.0.5:8080)"));
        }
        if is_cluster_name(s) {
            return Ok(Target::Cluster(s.to_owned()));
        }
        return Err(fail("it is neither host:port nor a cluster name"));
    };
    if host.contains(':') {
        return Err(fail(
            "an IPv6 address needs brackets around it when a port follows (e.g. [fd00::5]:8080)",
        ));
    }
    if host.is_empty() {
        return Err(fail("the host is missing before `:`"));
    }
    let port = parse_port(port).map_err(|r| fail(&r))?;
    let host = match host.parse::<Ipv4Addr>() {
        Ok(v4) => Host::Ip(IpAddr::V4(v4)),
        // Four numbers are meant as an address, and no DNS name either (RFC 1123 2.1).
        Err(_) if host.split('.').count() == 4 && host.split('.').all(is_number) => {
            return Err(fail(&format!(
                "`{host}` is not an IPv4 address (each of its four numbers is 0–255)"
            )));
        }
        Err(_) => {
            check_hostname(host).map_err(fail)?;
            Host::Name(host.to_owned())
        }
    };
    Ok(Target::Endpoint { host, port })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be connected to".to_owned()),
        Ok(p) => Ok(p),
        Err(_) if s.is_empty() => Err("the port is missing after `:`".to_owned()),
        Err(_) => Err(format!("port `{s}` is not a number in 1–65535")),
    }
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Cluster names as the config defines them: letters, digits, `-`, `_`, `.`.
fn is_cluster_name(s: &str) -> bool {
    s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_hostname(host: &str) -> Result<(), &'static str> {
    if host.len() > 253 {
        return Err("the host name is longer than 253 characters");
    }
    for label in host.trim_end_matches('.').split('.') {
        if label.is_empty() {
            return Err("the host name has an empty label (`..`)");
        }
        if label.len() > 63 {
            return Err("a label of the host name is longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label of the host name starts or ends with `-`");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("a host name has only letters, digits, `-`, `_` and `.`");
        }
    }
    Ok(())
}

/// Resolves `host`, timing it. IP literals resolve to themselves at once.
pub async fn resolve(host: &Host) -> Resolution {
    let name = match host {
        Host::Ip(ip) => {
            return Resolution {
                host: ip.to_string(),
                method: ResolutionMethod::Literal,
                elapsed_us: 0,
                addresses: vec![*ip],
                error: None,
            };
        }
        Host::Name(name) => name.clone(),
    };
    let start = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let lookup = name.clone();
    let spawned = std::thread::Builder::new()
        .name("diagnose-resolve".into())
        .spawn(move || {
            let _ = tx.send(getaddrinfo(&lookup));
        });
    let result = match spawned {
        Err(e) => Err(format!("could not start the resolver thread: {e}")),
        Ok(_) => match tokio::time::timeout(RESOLVE_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the resolver thread died".to_owned()),
            Err(_) => Err(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs())),
        },
    };
    let elapsed_us = start.elapsed().as_micros() as u64;
    match result {
        Ok(addresses) if addresses.is_empty() => Resolution {
            host: name,
            method: ResolutionMethod::Dns,
            elapsed_us,
            addresses,
            error: Some("the name has no IPv4 or IPv6 address".to_owned()),
        },
        Ok(addresses) => Resolution {
            host: name,
            method: ResolutionMethod::Dns,
            elapsed_us,
            addresses,
            error: None,
        },
        Err(error) => Resolution {
            host: name,
            method: ResolutionMethod::Dns,
            elapsed_us,
            addresses: Vec::new(),
            error: Some(error),
        },
    }
}

fn eai_name(rc: i32) -> &'static str {
    match rc {
        libc::EAI_NONAME => "EAI_NONAME",
        libc::EAI_AGAIN => "EAI_AGAIN",
        libc::EAI_FAIL => "EAI_FAIL",
        libc::EAI_NODATA => "EAI_NODATA",
        libc::EAI_FAMILY => "EAI_FAMILY",
        libc::EAI_MEMORY => "EAI_MEMORY",
        libc::EAI_SERVICE => "EAI_SERVICE",
        libc::EAI_SYSTEM => "EAI_SYSTEM",
        _ => "EAI_?",
    }
}

/// `getaddrinfo(name, NULL, {AF_UNSPEC, SOCK_STREAM})`, addresses in the resolver's order,
/// without duplicates.
fn getaddrinfo(name: &str) -> Result<Vec<IpAddr>, String> {
    let c_name = CString::new(name).map_err(|_| "the name contains a NUL byte".to_owned())?;
    // SAFETY: an all-zero addrinfo is the documented "no hints" value; we then set two fields.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid NUL-terminated name, valid hints, res is an out-parameter.
    let rc = unsafe { libc::getaddrinfo(c_name.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 {
        let errno = std::io::Error::last_os_error();
        // SAFETY: gai_strerror returns a static NUL-terminated string for any code.
        let text = unsafe { CStr::from_ptr(libc::gai_strerror(rc)) }.to_string_lossy();
        return Err(if rc == libc::EAI_SYSTEM {
            format!("EAI_SYSTEM ({text}: {errno})")
        } else {
            format!("{} ({text})", eai_name(rc))
        });
    }
    let mut out = Vec::new();
    let mut cur = res;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getaddrinfo returned, not yet freed.
        let ai = unsafe { &*cur };
        let ip = match ai.ai_family {
            libc::AF_INET if !ai.ai_addr.is_null() => {
                // SAFETY: for AF_INET, ai_addr points to a sockaddr_in.
                let sin = unsafe { &*ai.ai_addr.cast::<libc::sockaddr_in>() };
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 if !ai.ai_addr.is_null() => {
                // SAFETY: for AF_INET6, ai_addr points to a sockaddr_in6.
                let sin6 = unsafe { &*ai.ai_addr.cast::<libc::sockaddr_in6>() };
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        };
        if let Some(ip) = ip
            && !out.contains(&ip)
        {
            out.push(ip);
        }
        cur = ai.ai_next;
    }
    // SAFETY: res came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    Ok(out)
}

/// The socket addresses of a resolved target.
pub fn socket_addrs(addresses: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Target {
        parse_target(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        parse_target(s)
            .expect_err(&format!("{s} should not parse"))
            .to_string()
    }

    #[test]
    fn endpoints_and_clusters() {
        assert_eq!(
            ok("10.0.0.5:8080"),
            Target::Endpoint {
                host: Host::Ip("10.0.0.5".parse().unwrap()),
                port: 8080
            }
        );
        assert_eq!(
            ok("[fd77:0:1::2]:80").to_string(),
            "[fd77:0:1::2]:80",
            "IPv6 prints with brackets"
        );
        assert_eq!(
            ok("api.internal:443"),
            Target::Endpoint {
                host: Host::Name("api.internal".into()),
                port: 443
            }
        );
        assert_eq!(ok("payments"), Target::Cluster("payments".into()));
    }

    /// A URL pasted as the target (an audit's `http://10.201.0.2:8081/` was refused as "an
    /// IPv6 address needs brackets").
    #[test]
    fn a_url_is_its_host_and_port() {
        for (url, want) in [
            ("http://10.0.0.5:8081/", "10.0.0.5:8081"),
            ("http://10.0.0.5/health?x=1", "10.0.0.5:80"),
            ("HTTPS://api.internal/v1", "api.internal:443"),
            ("https://user@api.internal:8443#top", "api.internal:8443"),
            ("http://[fd00::5]/", "[fd00::5]:80"),
            ("http://[fd00::5]:8080/x", "[fd00::5]:8080"),
        ] {
            assert_eq!(ok(url).to_string(), want, "{url}");
        }
        assert!(err("ftp://10.0.0.5/").contains("not an http:// or https:// URL"));
        assert!(err("http://:80/").contains("host is missing"));
        assert!(err("http://10.0.0.5:0/").contains("port 0"));
    }

    #[test]
    fn four_numbers_out_of_range_are_no_address_and_no_name() {
        assert!(err("256.1.1.1:80").contains("`256.1.1.1` is not an IPv4 address"));
        assert!(err("http://10.0.0.300/").contains("is not an IPv4 address"));
        assert_eq!(ok("1.2.3.example:80").to_string(), "1.2.3.example:80");
    }

    #[test]
    fn bad_syntax_says_what_is_wrong() {
        assert!(err("").contains("it is empty"));
        assert!(err("10.0.0.5").contains("the port is missing"));
        assert!(err("host:").contains("the port is missing after `:`"));
        assert!(err("host:http").contains("port `http` is not a number in 1–65535"));
        assert!(err("host:70000").contains("not a number in 1–65535"));
        assert!(err("host:0").contains("port 0"));
        assert!(err("fd00::5:80").contains("needs brackets"));
        assert!(err("[fd00::5:80").contains("never closed"));
        assert!(err("[fd00::5]").contains("port is missing after `]`"));
        assert!(err("[10.0.0.5]:80").contains("is not an IPv6 address"));
        assert!(err(":80").contains("host is missing"));
        assert!(err("bad host:80").contains("only letters, digits"));
        assert!(err("a..b:80").contains("empty label"));
        assert!(err("what?").contains("neither host:port nor a cluster name"));
        let e = err("::");
        assert!(e.starts_with("invalid target `::`: "), "{e}");
        assert!(e.contains("write host:port, [ipv6]:port"), "{e}");
    }

    #[test]
    fn ip_literals_resolve_without_a_lookup() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(resolve(&Host::Ip("10.0.0.5".parse().unwrap())));
        assert_eq!(r.method, ResolutionMethod::Literal);
        assert_eq!(r.addresses, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        // /etc/hosts only: never a DNS query from a unit test.
        let r = rt.block_on(resolve(&Host::Name("localhost".into())));
        assert_eq!(r.method, ResolutionMethod::Dns);
        assert!(r.addresses.contains(&"127.0.0.1".parse().unwrap()), "{r:?}");
    }
}
