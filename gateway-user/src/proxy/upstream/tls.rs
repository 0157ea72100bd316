//! The TLS handshake to an upstream, as its own phase between the TCP connect and HTTP:
//! bounded by `tls_handshake_timeout_ms`, turned into a typed error (`tls_handshake_timeout`,
//! 504; `tls_error`, 502) that says what the kernel saw of the TCP connection underneath. The
//! caller feeds it to health (a request's connect, or a probe) through
//! `decide::evidence::TlsFailure::health_evidence`, which never counts a TLS failure on a
//! healthy TCP connection as a network failure.
//!
//! The name sent as SNI and verified: the cluster's `server_name`; else the endpoint's host
//! name when its address came from one `host:port` entry on that port; else its IP address.
//!
//! The connection that comes out is an ordinary pooled connection: its file descriptor is the
//! TCP socket's, so the pool's idle peek and the kernel join by cookie work as for plain ones
//! (a TLS close_notify or any stray record seen while idle is "the peer spoke").

use std::{net::SocketAddr, os::fd::RawFd, time::Duration};

use rustls_pki_types::ServerName;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{Cluster, endpoint::Endpoint};
use crate::{
    config::{ClusterSpec, EndpointAddr},
    decide::evidence::TlsFailure,
    proxy::{
        error::{ProxyError, TcpUnderneath},
        io::StallGuard,
        telemetry::Side,
    },
    tls::{self, ClientTls, failure::classify},
};

/// The only protocol spoken to upstreams until HTTP/2 upstreams exist.
const HTTP_11: &[u8] = b"http/1.1";

pub(super) type Upstream = TlsStream<StallGuard<TcpStream>>;

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
    let name = server_name(&cluster.spec, tls, ep.addr);
    let timeout = cluster.spec.timeouts.tls_handshake;
    let start = Instant::now();
    let mut connect = TlsConnector::from(tls.config.clone()).connect(name, io);
    let result = tokio::time::timeout(timeout, &mut connect).await;
    let meter = &cluster.meter.tls;
    let (failure, detail, server_bytes) = match result {
        Ok(Ok(s)) => match s.get_ref().1.alpn_protocol() {
            None | Some(HTTP_11) => {
                let version = tls::version_label(s.get_ref().1.protocol_version());
                meter.ok(Side::Upstream, version, start.elapsed());
                return Ok(s);
            }
            Some(other) => {
                let other = String::from_utf8_lossy(other).into_owned();
                let detail = format!("the upstream chose ALPN {other:?}; only http/1.1 is spoken");
                (TlsFailure::Protocol, detail, None)
            }
        },
        Ok(Err(e)) => (classify(&e), e.to_string(), None),
        Err(_) => {
            // Read while the socket is still open: did the upstream send anything back?
            let info = crate::diagnose::tcpinfo::read(tcp.fd);
            (
                TlsFailure::Timeout,
                String::new(),
                info.and_then(|i| i.bytes_received),
            )
        }
    };
    // Closed first, so that the kernel's final record of the connection exists.
    drop(connect);
    meter.failed(Side::Upstream, failure.name());
    let signals = &*cluster.signals;
    let evidence = signals.established_evidence(tcp.cookie).map(Box::new);
    let kernel_rtt = signals.connect_evidence(tcp.cookie).and_then(|e| e.syn_rtt);
    let under = Box::new(TcpUnderneath {
        connect: tcp.connect,
        kernel_rtt,
        server_bytes,
    });
    let e = match failure {
        TlsFailure::Timeout => ProxyError::TlsHandshakeTimeout {
            endpoint: ep.addr,
            timeout,
            cookie: tcp.cookie,
            tcp: under,
            evidence,
        },
        _ => ProxyError::TlsError {
            endpoint: ep.addr,
            failure,
            detail,
            cookie: tcp.cookie,
            tcp: under,
            evidence,
        },
    };
    Err(e)
}

/// The name to send and verify for `addr` (see the module doc).
fn server_name(spec: &ClusterSpec, tls: &ClientTls, addr: SocketAddr) -> ServerName<'static> {
    if let Some(n) = &tls.server_name {
        return n.clone();
    }
    let mut hosts = spec.endpoints.iter().filter_map(|e| match &e.address {
        EndpointAddr::Host { host, port } if *port == addr.port() => Some(host.as_str()),
        _ => None,
    });
    let written_as_ip = spec
        .endpoints
        .iter()
        .any(|e| e.address == EndpointAddr::Ip(addr));
    match (hosts.next(), hosts.next(), written_as_ip) {
        (Some(h), None, false) => ServerName::try_from(h.to_owned())
            .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into())),
        _ => ServerName::IpAddress(addr.ip().into()),
    }
}
