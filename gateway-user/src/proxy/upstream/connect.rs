//! New upstream connections: a TCP connect on a socket the gateway creates itself, whose
//! `SO_COOKIE` it reads before `connect()`, bounded by the endpoint's connect deadline; then,
//! for a TLS cluster, the TLS handshake as its own phase (`tls`); then the HTTP/1.1 handshake,
//! or HTTP/2's (`h2c` clusters, or ALPN `h2`), whose connection joins the endpoint's shared
//! ones (`multiplex`).
//!
//! The cookie is the join key with the kernel observer's per-connect record (see `signals`):
//! the kernel assigns it when the socket is created (`sock_gen_cookie()` in
//! net/core/sock_diag.c), so reading it before `connect()` guarantees the record of this very
//! attempt can be found, including for a connect that never completes.
//!
//! With no SYN-ACK by the deadline the endpoint is reported (no SYN-ACK, no RST, no ICMP) and,
//! when `hedge` allows, a connect to another endpoint races this one. Every finished connect
//! feeds the endpoint's health and SYN-RTT window, and the metrics.

use std::{future::Future, io, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpStream, sync::OwnedSemaphorePermit, time::Instant};
use tracing::debug;

use super::{
    Cluster,
    checkout::Want,
    endpoint::Endpoint,
    gate::{SendGate, drive},
    hedge,
    multiplex::{PeerSettings, SettingsTap},
    pool::UpstreamConn,
    tls,
};
use crate::{
    config::UpstreamProtocol,
    decide::{deadline::gives_up_at_deadline, evidence::ConnectFailure, health::Evidence},
    proxy::{
        error::ProxyError,
        io::{EarlyResponse, ReadsAfterReset, StallGuard},
    },
    signals::SignalSource,
};

/// A connected upstream socket and what the gateway knows about the connect.
pub(crate) struct Connected {
    pub stream: TcpStream,
    pub cookie: u64,
    pub elapsed: Duration,
    /// SYNs retransmitted before the handshake (kernel), for the clean-connect evidence a TLS
    /// cluster reports once its TLS handshake is done too.
    pub syn_retransmits: u32,
}

/// A connect in progress. Dropping it closes the socket, which the kernel records as
/// `aborted` with the SYNs sent so far. Boxed, so that dropping it really closes the socket (a
/// stack pin would only drop a reference) and so that a hedge can take it over.
pub(super) struct Pending {
    pub info: Started,
    pub fut: Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>,
}

/// Which socket a connect is on, and when it started.
#[derive(Clone, Copy, Debug)]
pub(super) struct Started {
    pub cookie: u64,
    pub start: Instant,
}

/// Creates the socket and reads its cookie.
fn socket_for(addr: SocketAddr) -> io::Result<(Socket, u64)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let cookie = socket.cookie()?;
    Ok((socket, cookie))
}

impl Pending {
    /// Starts a connect to `endpoint` (no timer: the caller owns the deadline).
    pub fn start(endpoint: SocketAddr) -> Result<Pending, ProxyError> {
        let (socket, cookie) =
            socket_for(endpoint).map_err(|source| ProxyError::ConnectFailed {
                endpoint,
                source,
                cookie: None,
            })?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        Ok(Pending {
            info: Started {
                cookie,
                start: Instant::now(),
            },
            fut: Box::pin(socket.connect(endpoint)),
        })
    }

    /// The typed error of this connect, given up at its `deadline` (the socket must already
    /// be closed, so that the kernel's record of it exists).
    pub fn timed_out(
        endpoint: SocketAddr,
        cookie: u64,
        deadline: Duration,
        signals: &dyn SignalSource,
    ) -> ProxyError {
        ProxyError::ConnectTimeout {
            endpoint,
            timeout: deadline,
            cookie,
            evidence: signals.connect_evidence(cookie),
        }
    }
}

/// Connects to `endpoint` within `timeout` (probes: no health feeding, no hedge).
pub(crate) async fn connect(
    endpoint: SocketAddr,
    timeout: Duration,
    signals: &dyn SignalSource,
) -> Result<Connected, ProxyError> {
    let mut p = Pending::start(endpoint)?;
    let Started { cookie, start } = p.info;
    match tokio::time::timeout(timeout, &mut p.fut).await {
        Ok(Ok(stream)) => Ok(Connected {
            stream,
            cookie,
            elapsed: start.elapsed(),
            syn_retransmits: 0,
        }),
        Ok(Err(source)) => Err(failed(endpoint, source, cookie, start.elapsed(), signals)),
        Err(_) => {
            drop(p);
            Err(Pending::timed_out(endpoint, cookie, timeout, signals))
        }
    }
}

/// Maps a failed `connect()` to its typed error, with the kernel's record of it.
pub(crate) fn failed(
    endpoint: SocketAddr,
    source: io::Error,
    cookie: u64,
    elapsed: Duration,
    signals: &dyn SignalSource,
) -> ProxyError {
    let evidence = signals.connect_evidence(cookie);
    let errno = source.raw_os_error();
    let failure = match errno.map_or(ConnectFailure::Other, ConnectFailure::from_errno) {
        // An ICMP error the errno table does not name, which the kernel saw end the connect
        // after its SYN: administratively prohibited (EACCES: firewalld's IPv6 reject) or
        // protocol unreachable (ENOPROTOOPT). Not a local EPERM (a filter on this host).
        ConnectFailure::Other
            if errno != Some(libc::EPERM)
                && evidence
                    .as_ref()
                    .is_some_and(|e| e.outcome == gateway_common::Outcome::Unreachable) =>
        {
            ConnectFailure::Unreachable
        }
        f => f,
    };
    match failure {
        ConnectFailure::Refused => ProxyError::ConnectRefused {
            endpoint,
            elapsed,
            cookie,
            evidence,
        },
        ConnectFailure::Unreachable => ProxyError::ConnectUnreachable {
            endpoint,
            source,
            cookie,
            evidence,
        },
        // The kernel's own SYN retries ran out before our timer (tcp_syn_retries).
        ConnectFailure::Unanswered => ProxyError::ConnectTimeout {
            endpoint,
            timeout: elapsed,
            cookie,
            evidence,
        },
        ConnectFailure::AddrUnavailable | ConnectFailure::Other => ProxyError::ConnectFailed {
            endpoint,
            source,
            cookie: Some(cookie),
        },
    }
}

/// A new connection to `ep` within its connect deadline (adaptive, capped by
/// `connect_timeout_ms`), racing a hedge when the deadline passes and `hedge` allows one. The
/// connection may be to another endpoint when the hedge won. With no hedge and nowhere else
/// for the request to go, the connect runs on to the cap, unless other requests wait on it
/// (`awaited`: an HTTP/2 connection being made; `decide::deadline::gives_up_at_deadline`).
pub(super) async fn new_connection(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    slot: OwnedSemaphorePermit,
    want: &Want<'_>,
    awaited: bool,
) -> Result<(Arc<Endpoint>, UpstreamConn), ProxyError> {
    let deadline = ep.health.deadline(&cluster.spec).value;
    ep.meter.deadline(deadline);
    let mut first = Pending::start(ep.addr)?;
    if let Ok(r) = tokio::time::timeout(deadline, &mut first.fut).await {
        return established(cluster, ep, first.info, r, slot).await;
    }
    cluster.report(ep, Evidence::SynUnanswered, &|| {
        format!(
            "no SYN-ACK, no RST, no ICMP within the {} ms connect deadline",
            deadline.as_millis()
        )
    });
    if let Some(h) = hedge::plan(cluster, ep, deadline, want.tried, want.hedging) {
        debug!(cluster = %cluster.name, upstream = %ep.addr, hedge = %h.endpoint.addr, deadline_ms = deadline.as_millis() as u64, "no SYN-ACK by the deadline; racing another endpoint");
        return hedge::race_connects(cluster, ep, first, slot, h).await;
    }
    let mut timeout = deadline;
    let cap = cluster.spec.timeouts.connect;
    if !gives_up_at_deadline(deadline, cap, awaited, want.elsewhere) {
        debug!(cluster = %cluster.name, upstream = %ep.addr, deadline_ms = deadline.as_millis() as u64, "no SYN-ACK by the deadline and nowhere else to go; the connect runs on to connect_timeout_ms");
        if let Ok(r) = tokio::time::timeout_at(first.info.start + cap, &mut first.fut).await {
            return established(cluster, ep, first.info, r, slot).await;
        }
        timeout = cap;
    }
    let cookie = first.info.cookie;
    // Close the socket first, so that the kernel's record (aborted, SYNs sent) exists.
    drop(first);
    let e = Pending::timed_out(ep.addr, cookie, timeout, &*cluster.signals);
    if let ProxyError::ConnectTimeout { evidence, .. } = &e {
        ep.meter.connect_abandoned(evidence.as_ref(), true);
    }
    Err(e)
}

/// A connect to `ep` that finished by its deadline: classified ([`finish`]), then, when it
/// established, its handshake.
async fn established(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    p: Started,
    r: io::Result<TcpStream>,
    slot: OwnedSemaphorePermit,
) -> Result<(Arc<Endpoint>, UpstreamConn), ProxyError> {
    let c = finish(cluster, ep, p, r)?;
    Ok((ep.clone(), handshake(cluster, ep, c, slot).await?))
}

/// Classifies a finished connect and feeds health, the SYN-RTT window and the metrics.
pub(super) fn finish(
    cluster: &Cluster,
    ep: &Endpoint,
    p: Started,
    r: io::Result<TcpStream>,
) -> Result<Connected, ProxyError> {
    let elapsed = p.start.elapsed();
    let signals = &*cluster.signals;
    match r {
        Ok(stream) => {
            let _ = stream.set_nodelay(true);
            let ev = signals.connect_evidence(p.cookie);
            let (rtt, retx) = match &ev {
                Some(e) => (e.syn_rtt.unwrap_or(elapsed), e.syn_retransmits),
                None => (elapsed, 0),
            };
            ep.health.observe_rtt(rtt, retx);
            // A handshake bounds a request's latency from below (`decide::latency`).
            ep.latency.lower_bound(
                rtt,
                crate::decide::latency::Source::Handshakes,
                &cluster.spec.latency,
            );
            ep.meter.connected(ev.as_ref());
            let detail = || match &ev {
                Some(e) => e.to_string(),
                None => format!("connected in {} us", elapsed.as_micros()),
            };
            // A TLS cluster's connection is clean once its TLS handshake is done too: reported
            // then (`handshake`), so that the TCP handshake under every TLS attempt does not
            // bring back an endpoint suspected of failing TLS (it would flap suspect, healthy,
            // suspect with each request).
            if cluster.spec.tls.is_none() {
                let ok = Evidence::ConnectOk {
                    syn_retransmits: retx,
                };
                cluster.report(ep, ok, &detail);
            }
            Ok(Connected {
                stream,
                cookie: p.cookie,
                elapsed,
                syn_retransmits: retx,
            })
        }
        Err(source) => {
            let e = failed(ep.addr, source, p.cookie, elapsed, signals);
            ep.meter.connect_failed(&e);
            if let Some(ev) = e
                .connect_failure()
                .and_then(ConnectFailure::health_evidence)
            {
                cluster.report(ep, ev, &|| e.to_string());
            }
            Err(e)
        }
    }
}

/// The TLS handshake (for a TLS cluster), then HTTP/1.1's or HTTP/2's, on a new connection.
pub(super) async fn handshake(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    c: Connected,
    slot: OwnedSemaphorePermit,
) -> Result<UpstreamConn, ProxyError> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&c.stream);
    let io = StallGuard::new(c.stream, cluster.spec.timeouts.write);
    let made = Made {
        cookie: c.cookie,
        fd,
        elapsed: c.elapsed,
        slot,
    };
    match &cluster.spec.tls {
        None if cluster.spec.protocol == UpstreamProtocol::H2c => {
            http2(cluster, ep, made, io).await
        }
        // An answer before the end of the request is read after the write failed (under TLS,
        // `tls::handshake` puts the same layer under rustls).
        None => {
            let io = EarlyResponse::new(ReadsAfterReset::new(io, fd));
            http1(cluster, ep, made, io).await
        }
        Some(t) => {
            let tcp = tls::Tcp {
                fd,
                cookie: c.cookie,
                connect: c.elapsed,
            };
            let s = tls::handshake(cluster, ep, t, io, tcp)
                .await
                .inspect_err(|e| {
                    if let Some(f) = e.tls_failure() {
                        let health = f.health_evidence(e.established_evidence());
                        cluster.report(ep, health, &|| e.to_string());
                    }
                })?;
            let ok = Evidence::ConnectOk {
                syn_retransmits: c.syn_retransmits,
            };
            cluster.report(ep, ok, &|| {
                format!(
                    "connected in {} us, TLS handshake done",
                    c.elapsed.as_micros()
                )
            });
            if tls::negotiated_h2(&s, cluster.spec.protocol) {
                http2(cluster, ep, made, s).await
            } else {
                http1(cluster, ep, made, s).await
            }
        }
    }
}

/// A new connection, before HTTP.
struct Made {
    cookie: u64,
    fd: std::os::fd::RawFd,
    elapsed: Duration,
    slot: OwnedSemaphorePermit,
}

/// The HTTP/1.1 handshake. The connection's task counts, when it ends, the RTOs in the
/// kernel's final record of it; it hands the socket over when the request upgrades it.
async fn http1<I>(
    cluster: &Cluster,
    ep: &Endpoint,
    m: Made,
    io: I,
) -> Result<UpstreamConn, ProxyError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = cluster
        .client
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| handshake_failed(ep, m.cookie, e))?;
    let conn = conn.with_upgrades();
    spawn_drive(conn, cluster, ep, m.cookie, None);
    Ok(UpstreamConn::new(sender, m.cookie, m.fd, m.elapsed, m.slot))
}

/// The HTTP/2 handshake; the connection joins the endpoint's shared ones, with this request's
/// stream taken.
async fn http2<I>(
    cluster: &Cluster,
    ep: &Endpoint,
    m: Made,
    io: I,
) -> Result<UpstreamConn, ProxyError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let settings = Arc::new(PeerSettings::for_endpoint(ep.mux.freed.clone()));
    let io = SettingsTap::new(io, settings.clone());
    let (sender, conn) = cluster
        .h2
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| handshake_failed(ep, m.cookie, e))?;
    let gate = Arc::new(SendGate::default());
    spawn_drive(conn, cluster, ep, m.cookie, Some(gate.clone()));
    Ok(ep
        .mux
        .register(sender, m.cookie, m.fd, m.slot, m.elapsed, (gate, settings)))
}

fn handshake_failed(ep: &Endpoint, cookie: u64, e: hyper::Error) -> ProxyError {
    ProxyError::ConnectFailed {
        endpoint: ep.addr,
        source: io::Error::other(e),
        cookie: Some(cookie),
    }
}

/// [`drive`] for a connection of `ep`, as a task of its own.
fn spawn_drive<F>(
    conn: F,
    cluster: &Cluster,
    ep: &Endpoint,
    cookie: u64,
    gate: Option<Arc<SendGate>>,
) where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    let (signals, rtos) = (cluster.signals.clone(), ep.meter.rtos.clone());
    tokio::spawn(drive(conn, ep.addr, signals, rtos, cookie, gate));
}

#[cfg(test)]
mod tests;
