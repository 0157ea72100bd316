//! The TLS handshake to an upstream, as its own phase between the TCP connect and HTTP:
//! bounded by `tls_handshake_timeout_ms`, turned into a typed error (`tls_handshake_timeout`,
//! 504; `tls_error`, 502) that says what the kernel saw of the TCP connection underneath. The
//! caller feeds it to health (a request's connect, or a probe) through
//! `decide::evidence::TlsFailure::health_evidence`, which never counts a TLS failure on a
//! healthy TCP connection as a network failure.
//!
//! The name sent as SNI and verified: the cluster's `server_name`; else the host name of the
//! `host:port` entry whose latest resolution gave the endpoint's address (the first listed,
//! when several did); else, or when the address is also written as an IP entry, its IP
//! address. (It used to be the host name only when one `host:port` entry had that port:
//! `api-1.internal:443` and `api-2.internal:443` verified each other's address as an IP, and
//! every request of the cluster failed `name_mismatch`.)
//!
//! The connection that comes out is an ordinary pooled connection: its file descriptor is the
//! TCP socket's, so the pool's idle peek and the kernel join by cookie work as for plain ones
//! (a TLS close_notify or any stray record seen while idle is "the peer spoke").

use std::{net::SocketAddr, os::fd::RawFd, time::Duration};

use rustls_pki_types::ServerName;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{Cluster, endpoint::Endpoint, resolve::NameState};
use crate::{
    config::{EndpointAddr, EndpointSpec, UpstreamProtocol},
    decide::evidence::TlsFailure,
    diagnose::tcpinfo::TcpInfo,
    proxy::{
        error::{ProxyError, TcpUnderneath},
        io::{EarlyResponse, ReadsAfterReset, StallGuard},
        telemetry::Side,
    },
    signals::EstablishedEvidence,
    tls::{self, ClientTls, failure::classify},
};

/// ALPN protocol ids (RFC 7301, RFC 9113 section 3.2).
const HTTP_11: &[u8] = b"http/1.1";
const H2: &[u8] = b"h2";

/// rustls over the socket, between the two layers that deliver an answer an upstream sent
/// before it had read the whole request and reset the rest (`io::early`).
pub(super) type Upstream = EarlyResponse<TlsStream<ReadsAfterReset<StallGuard<TcpStream>>>>;

/// What the TCP connect left for the TLS phase.
pub(super) struct Tcp {
    pub fd: RawFd,
    pub cookie: u64,
    pub connect: Duration,
}

/// The TLS handshake on a connected socket, within the cluster's `tls_handshake_timeout_ms`.
pub(super) async fn handshake(
    cluster: &Cluster,
    ep: &Endpoint,
    tls: &ClientTls,
    io: StallGuard<TcpStream>,
    tcp: Tcp,
) -> Result<Upstream, ProxyError> {
    let name = server_name(cluster, tls, ep.addr);
    let timeout = cluster.spec.timeouts.tls_handshake;
    let start = Instant::now();
    // Fallible: a failed handshake hands the socket back, so that it is still open when its
    // `TCP_INFO` is read below.
    let mut connect = TlsConnector::from(tls.config.clone())
        .connect(name, ReadsAfterReset::new(io, tcp.fd))
        .into_fallible();
    let result = tokio::time::timeout(timeout, &mut connect).await;
    let meter = &cluster.meter.tls;
    // Each failure keeps its socket open (`open`) until its `TCP_INFO` has been read.
    let (failure, detail, open): (_, _, Option<Box<dyn std::any::Any + Send>>) = match result {
        Ok(Ok(s)) => match (s.get_ref().1.alpn_protocol(), cluster.spec.protocol) {
            // No ALPN: the upstream speaks what it was asked (HTTP/1.1, or HTTP/2 for "h2").
            (None, _)
            | (Some(HTTP_11), UpstreamProtocol::Http1 | UpstreamProtocol::Auto)
            | (Some(H2), UpstreamProtocol::H2 | UpstreamProtocol::Auto) => {
                let version = tls::version_label(s.get_ref().1.protocol_version());
                meter.ok(Side::Upstream, version, start.elapsed());
                return Ok(EarlyResponse::new(s));
            }
            (Some(other), p) => {
                let other = String::from_utf8_lossy(other).into_owned();
                let detail = format!(
                    "the upstream chose ALPN {other:?}, which protocol = \"{}\" does not speak",
                    p.name()
                );
                (TlsFailure::Protocol, detail, Some(Box::new(s)))
            }
        },
        Ok(Err((e, io))) => (classify(&e), e.to_string(), Some(Box::new(io))),
        // Still inside `connect`.
        Err(_) => (TlsFailure::Timeout, String::new(), None),
    };
    let info = crate::diagnose::tcpinfo::read(tcp.fd);
    // Closed first, so that the kernel's final record of the connection exists if it has one.
    drop(open);
    drop(connect);
    meter.failed(Side::Upstream, failure.name());
    Err(failed(cluster, ep, &tcp, failure, detail, info))
}

/// The error of a failed handshake, with what the kernel saw of the TCP connection underneath:
/// the observer's record of it or, for a connection closed cleanly, of which the observer keeps
/// none (`gateway_common::ConnStats`), what `TCP_INFO` said just before the close.
fn failed(
    cluster: &Cluster,
    ep: &Endpoint,
    tcp: &Tcp,
    failure: TlsFailure,
    detail: String,
    info: Option<TcpInfo>,
) -> ProxyError {
    let signals = &*cluster.signals;
    let connected = signals.connect_evidence(tcp.cookie);
    let syn_retransmits = connected.as_ref().map_or(0, |c| c.syn_retransmits);
    let evidence = signals
        .established_evidence(tcp.cookie)
        .or_else(|| {
            signals
                .kernel()
                .then(|| EstablishedEvidence::from_tcp_info(&info?, syn_retransmits))
                .flatten()
        })
        .map(Box::new);
    let tcp_under = Box::new(TcpUnderneath {
        connect: tcp.connect,
        kernel_rtt: connected.and_then(|e| e.syn_rtt),
        // Did the upstream send anything back before the deadline?
        server_bytes: match failure {
            TlsFailure::Timeout => info.and_then(|i| i.bytes_received),
            _ => None,
        },
    });
    match failure {
        TlsFailure::Timeout => ProxyError::TlsHandshakeTimeout {
            endpoint: ep.addr,
            timeout: cluster.spec.timeouts.tls_handshake,
            cookie: tcp.cookie,
            tcp: tcp_under,
            evidence,
        },
        _ => ProxyError::TlsError {
            endpoint: ep.addr,
            failure,
            detail,
            cookie: tcp.cookie,
            tcp: tcp_under,
            evidence,
        },
    }
}

/// Whether the handshake chose HTTP/2: ALPN `h2`, or no ALPN on an `h2` cluster.
pub(super) fn negotiated_h2(s: &Upstream, protocol: UpstreamProtocol) -> bool {
    match s.get_ref().get_ref().1.alpn_protocol() {
        Some(p) => p == H2,
        None => protocol == UpstreamProtocol::H2,
    }
}

/// The name to send and verify for `addr` (see the module doc). Once per new connection.
fn server_name(cluster: &Cluster, tls: &ClientTls, addr: SocketAddr) -> ServerName<'static> {
    match &tls.server_name {
        Some(n) => n.clone(),
        None => name_of(&cluster.spec.endpoints, &cluster.names.snapshot(), addr),
    }
}

/// The name of `addr` among `endpoints`, by what each host-name entry last resolved to
/// (`names`, by entry): see the module doc.
fn name_of(
    endpoints: &[EndpointSpec],
    names: &[Option<NameState>],
    addr: SocketAddr,
) -> ServerName<'static> {
    let ip = ServerName::IpAddress(addr.ip().into());
    if endpoints
        .iter()
        .any(|e| e.address == EndpointAddr::Ip(addr))
    {
        return ip;
    }
    endpoints
        .iter()
        .zip(names)
        .find_map(|(e, name)| match (&e.address, name) {
            (EndpointAddr::Host { host, .. }, Some(n)) if n.addresses.contains(&addr) => {
                ServerName::try_from(host.clone()).ok()
            }
            _ => None,
        })
        .unwrap_or(ip)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn an_address_is_named_by_the_entry_it_resolved_from() {
        let host = |h: &str| EndpointSpec {
            address: EndpointAddr::Host {
                host: h.into(),
                port: 443,
            },
            weight: 1,
        };
        let resolved = |a: &[&str]| {
            Some(NameState {
                error: None,
                since: SystemTime::UNIX_EPOCH,
                addresses: a.iter().map(|a| a.parse().unwrap()).collect(),
            })
        };
        let (a, b, c) = ("10.0.0.1:443", "10.0.0.2:443", "10.0.0.3:443");
        let endpoints = [host("api-1.internal"), host("api-2.internal")];
        let names = [resolved(&[a]), resolved(&[b])];
        let name = |addr: &str| {
            name_of(&endpoints, &names, addr.parse().unwrap())
                .to_str()
                .into_owned()
        };
        assert_eq!(name(a), "api-1.internal");
        assert_eq!(name(b), "api-2.internal", "not the first entry's");
        assert_eq!(name(c), "10.0.0.3", "an address no entry resolved to");
        // An address also written as an IP entry is verified as one.
        let with_ip = [
            host("api-1.internal"),
            EndpointSpec {
                address: EndpointAddr::Ip(a.parse().unwrap()),
                weight: 1,
            },
        ];
        let n = name_of(&with_ip, &[resolved(&[a]), None], a.parse().unwrap());
        assert_eq!(n.to_str(), "10.0.0.1");
    }
}
