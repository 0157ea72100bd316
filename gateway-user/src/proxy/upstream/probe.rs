//! Active probes: every [`TICK`], advance each endpoint's health clock and probe the ones
//! `decide::probe::due` names (at most one probe at a time per endpoint). A probe is a TCP
//! connect within the hard cap, its handshake measured by the kernel, then the TLS handshake
//! for a TLS cluster (so that an endpoint with a bad certificate is not brought back), then,
//! when `probe_path` is set, `GET probe_path` (hyper; over HTTP/2 for `h2c` clusters and TLS
//! connections that chose `h2`, else HTTP/1.1) expecting `probe_expect_status`.
//! `decide::probe::evidence` says what the result is worth.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{Cluster, connect::connect, endpoint::Endpoint, tls};
use crate::{
    config::UpstreamProtocol,
    decide::{
        evidence::{ConnectFailure, TlsFailure},
        probe::{self, ProbeResult},
    },
    proxy::io::StallGuard,
};

/// How often the probe loop looks at the endpoints.
pub const TICK: Duration = Duration::from_millis(100);

/// Until the cluster is dropped or retired: tick each endpoint's health and start the probes
/// that are due.
pub(super) async fn run(cluster: Weak<Cluster>) {
    loop {
        tokio::time::sleep(TICK).await;
        let Some(c) = super::cluster::live(&cluster) else {
            return;
        };
        for ep in c.set.load().endpoints.iter() {
            let (t, due) = ep.health.tick(&c.spec);
            c.log_transition(ep, t, &|| "ejection ran out".to_owned());
            if due && !ep.probe_running.swap(true, Ordering::AcqRel) {
                tokio::spawn(probe(c.clone(), ep.clone()));
            }
        }
    }
}

/// One probe of `ep`, fed to its health.
async fn probe(cluster: Arc<Cluster>, ep: Arc<Endpoint>) {
    let (result, detail) = check(&cluster, &ep).await;
    match probe::evidence(result) {
        // A reload replaced the cluster meanwhile: judged by settings no longer in force.
        Some(_) if cluster.retired() => {}
        Some(ev) => cluster.report_probe(&ep, ev, &detail),
        None => {
            tracing::debug!(cluster = %cluster.name, upstream = %ep.addr, detail, "probe inconclusive (a local failure)")
        }
    }
    ep.probe_running.store(false, Ordering::Release);
}

/// Connects (and `GET`s, when configured); what happened, and the words for it.
async fn check(cluster: &Cluster, ep: &Endpoint) -> (ProbeResult, String) {
    let spec = &cluster.spec;
    let c = match connect(ep.addr, spec.timeouts.connect, &*cluster.signals).await {
        Ok(c) => c,
        Err(e) => {
            let f = e.connect_failure().unwrap_or(ConnectFailure::Other);
            return (ProbeResult::ConnectFailed(f), format!("probe: {e}"));
        }
    };
    let kernel = cluster.signals.connect_evidence(c.cookie);
    let (rtt, syn_retransmits) = match &kernel {
        Some(e) => (e.syn_rtt.unwrap_or(c.elapsed), e.syn_retransmits),
        None => (c.elapsed, 0),
    };
    ep.health.observe_rtt(rtt, syn_retransmits);
    let connected = match &kernel {
        Some(e) => format!("probe: {e}"),
        None => format!("probe: connected in {} us", c.elapsed.as_micros()),
    };
    let io = StallGuard::new(c.stream, spec.timeouts.write);
    let (io, h2): (Box<dyn Io>, bool) = match &spec.tls {
        None => (Box::new(io), spec.protocol == UpstreamProtocol::H2c),
        Some(t) => {
            let tcp = tls::Tcp {
                fd: std::os::fd::AsRawFd::as_raw_fd(io.get_ref()),
                cookie: c.cookie,
                connect: c.elapsed,
            };
            match tls::handshake(cluster, ep, t, io, tcp).await {
                Ok(s) => {
                    let h2 = tls::negotiated_h2(&s, spec.protocol);
                    (Box::new(s), h2)
                }
                Err(e) => {
                    let f = e.tls_failure().unwrap_or(TlsFailure::Io);
                    let ev = f.health_evidence(e.established_evidence());
                    return (ProbeResult::TlsFailed(ev), format!("probe: {e}"));
                }
            }
        }
    };
    let Some(path) = &spec.health.probe_path else {
        return (ProbeResult::Connected { syn_retransmits }, connected);
    };
    let expected = spec.health.probe_expect_status;
    let scheme = if spec.tls.is_some() { "https" } else { "http" };
    match tokio::time::timeout(spec.timeouts.response, get(io, h2, scheme, ep, path)).await {
        Ok(Ok(status)) => {
            let detail = if status == expected {
                format!("{connected}; GET {path}: {status}")
            } else {
                format!("{connected}; GET {path}: {status}, expected {expected}")
            };
            let result = ProbeResult::Answered {
                syn_retransmits,
                status,
                expected,
            };
            (result, detail)
        }
        Ok(Err(e)) => (
            ProbeResult::NoAnswer { syn_retransmits },
            format!("{connected}; GET {path}: {e}"),
        ),
        Err(_) => (
            ProbeResult::NoAnswer { syn_retransmits },
            format!(
                "{connected}; GET {path}: no response within {} ms",
                spec.timeouts.response.as_millis()
            ),
        ),
    }
}

/// A probe's connection: plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// `GET path` on the connection, over HTTP/2 when `h2`; the response's status code.
async fn get(
    io: Box<dyn Io>,
    h2: bool,
    scheme: &str,
    ep: &Endpoint,
    path: &str,
) -> Result<u16, ProbeError> {
    let io = TokioIo::new(io);
    if h2 {
        let req = Request::get(format!("{scheme}://{}{path}", ep.addr))
            .header(header::USER_AGENT, "gateway-probe")
            .body(Empty::<Bytes>::new())?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        return Ok(sender.send_request(req).await?.status().as_u16());
    }
    let req = Request::get(path)
        .header(header::HOST, ep.addr.to_string())
        .header(header::USER_AGENT, "gateway-probe")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?.status().as_u16())
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("not a valid request: {0}")]
    Request(#[from] http::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}
