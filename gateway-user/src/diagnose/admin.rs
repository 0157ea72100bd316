//! Cluster targets: the endpoints of a cluster of a running gateway, and what that gateway has
//! seen of them, read from its admin API: `GET /status` on `--admin ADDR`, fetched with hyper
//! and read into the very structs that write it (`crate::proxy::admin::status`, where the
//! shape is documented). The gateway's view (each endpoint's health state, its reason and the
//! recent failures and ejections with their kernel evidence) goes into the report as evidence
//! lines and as `measurements.gateway` ([`GatewayView`]).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{
    Request, StatusCode,
    header::{ACCEPT, HOST},
};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use thiserror::Error;

use crate::{
    decide::health::{Reason, State},
    proxy::admin::status::{HealthEvent, SignalOrigin, Status},
};

/// Connect plus answer, for the admin request.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest `/status` body read.
const MAX_STATUS_BYTES: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("asking the gateway admin API at {admin} for /status failed: {source}")]
    Io {
        admin: SocketAddr,
        source: std::io::Error,
    },
    #[error("asking the gateway admin API at {admin} for /status failed: {source}")]
    Http {
        admin: SocketAddr,
        source: hyper::Error,
    },
    #[error("reading /status from the gateway admin API at {admin} failed: {source}")]
    Body {
        admin: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the gateway admin API at {admin} did not answer /status within {timeout:?}")]
    Timeout {
        admin: SocketAddr,
        timeout: Duration,
    },
    #[error(
        "cluster lookup needs the gateway admin API's /status endpoint, and the gateway at \
         {admin} answered `{status_line}` to GET /status; probe the cluster's endpoints as \
         host:port instead"
    )]
    NoStatus {
        admin: SocketAddr,
        status_line: String,
    },
    #[error(
        "the gateway admin API at {admin} returned a /status that this gateway cannot read \
         (another version?): {source}"
    )]
    NotStatus {
        admin: SocketAddr,
        source: serde_json::Error,
    },
    #[error("no cluster `{cluster}` in /status of the gateway at {admin}; its clusters: {known}")]
    UnknownCluster {
        admin: SocketAddr,
        cluster: String,
        known: String,
    },
    #[error("cluster `{cluster}` in /status of the gateway at {admin} lists no ip:port endpoints")]
    NoEndpoints { admin: SocketAddr, cluster: String },
}

/// Recent gateway events kept per endpoint in the view.
const RECENT_SHOWN: usize = 5;

/// What a running gateway says about one of its clusters: the `measurements.gateway` object
/// of `--json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayView {
    /// The admin address asked.
    pub admin: SocketAddr,
    pub cluster: String,
    /// The gateway's own signals: `kernel` or `userspace`.
    pub observer: SignalOrigin,
    /// When `/status` was read (the gateway's clock), Unix ms.
    pub now_unix_ms: u64,
    pub endpoints: Vec<GatewayEndpoint>,
}

/// One endpoint as the gateway sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayEndpoint {
    pub address: SocketAddr,
    pub state: State,
    /// Why it is not healthy.
    pub reason: Option<Reason>,
    pub connect_deadline_ms: f64,
    pub syn_rtt_p50_us: Option<u64>,
    pub syn_rtt_p99_us: Option<u64>,
    /// The gateway's latest events for it, newest first, at most five.
    pub recent: Vec<HealthEvent>,
}

impl GatewayView {
    /// The endpoint addresses, in the gateway's order.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.endpoints.iter().map(|e| e.address).collect()
    }

    /// Evidence lines for the report, one per endpoint: its state and reason, and the latest
    /// thing the gateway recorded about it, with the gateway's kernel evidence.
    pub fn evidence(&self) -> Vec<String> {
        let signals = match self.observer {
            SignalOrigin::Kernel => " (kernel signals)",
            SignalOrigin::Userspace => " (userspace timing)",
        };
        self.endpoints
            .iter()
            .map(|e| {
                let mut line = format!(
                    "the gateway at {}{signals} has {} {}",
                    self.admin,
                    e.address,
                    e.state.name()
                );
                if let Some(r) = e.reason {
                    line.push_str(&format!(" ({})", r.name()));
                }
                if let (Some(p50), Some(p99)) = (e.syn_rtt_p50_us, e.syn_rtt_p99_us) {
                    line.push_str(&format!(", handshakes p50 {p50} us / p99 {p99} us"));
                }
                if let Some(ev) = e.recent.first() {
                    let ago = self.now_unix_ms.saturating_sub(ev.at_unix_ms) as f64 / 1e3;
                    line.push_str(&format!("; latest {ago:.1} s ago: {}", ev.event.name()));
                    if let Some(r) = ev.reason {
                        line.push_str(&format!(" ({})", r.name()));
                    }
                    if !ev.detail.is_empty() {
                        line.push_str(&format!(": {}", ev.detail));
                    }
                }
                line.push_str(" [gateway]");
                line
            })
            .collect()
    }
}

/// The endpoints of `cluster` and the gateway's view of them, from the gateway at `admin`.
pub async fn cluster_view(admin: SocketAddr, cluster: &str) -> Result<GatewayView, AdminError> {
    let status = tokio::time::timeout(ADMIN_TIMEOUT, get_status(admin))
        .await
        .map_err(|_| AdminError::Timeout {
            admin,
            timeout: ADMIN_TIMEOUT,
        })??;
    view_from_status(admin, &status, cluster)
}

/// The gateway's view of `cluster` from the body of a `GET /status` answer. Pure, so that it
/// can be fuzzed (the HTTP framing around it is hyper's): any bytes give a view or an error
/// that names the admin address, never a panic.
pub fn view_from_body(
    admin: SocketAddr,
    body: &[u8],
    cluster: &str,
) -> Result<GatewayView, AdminError> {
    let status: Status =
        serde_json::from_slice(body).map_err(|source| AdminError::NotStatus { admin, source })?;
    view_from_status(admin, &status, cluster)
}

fn view_from_status(
    admin: SocketAddr,
    status: &Status,
    cluster: &str,
) -> Result<GatewayView, AdminError> {
    view_of(admin, status, cluster).map_err(|known| match known {
        Some(known) => AdminError::UnknownCluster {
            admin,
            cluster: cluster.to_owned(),
            known,
        },
        None => AdminError::NoEndpoints {
            admin,
            cluster: cluster.to_owned(),
        },
    })
}

/// `GET /status` over one HTTP/1.1 connection.
async fn get_status(admin: SocketAddr) -> Result<Status, AdminError> {
    let http = |source| AdminError::Http { admin, source };
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|source| AdminError::Io { admin, source })?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    // Drives the connection; it ends once the answer is read and `sender` is gone.
    tokio::spawn(conn);
    let req = Request::get("/status")
        .header(HOST, admin.to_string())
        .header(ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .expect("a static request");
    let resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(AdminError::NoStatus {
            admin,
            status_line: format!("{:?} {}", resp.version(), resp.status()),
        });
    }
    let body = Limited::new(resp.into_body(), MAX_STATUS_BYTES)
        .collect()
        .await
        .map_err(|source| AdminError::Body { admin, source })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|source| AdminError::NotStatus { admin, source })
}

/// `Err(Some(known clusters))` when the cluster is missing, `Err(None)` when it has no
/// endpoints.
fn view_of(
    admin: SocketAddr,
    status: &Status,
    cluster: &str,
) -> Result<GatewayView, Option<String>> {
    let Some(found) = status.clusters.iter().find(|c| c.name == cluster) else {
        let known: Vec<&str> = status.clusters.iter().map(|c| c.name.as_str()).collect();
        return Err(Some(if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }));
    };
    if found.endpoints.is_empty() {
        return Err(None);
    }
    let endpoints = found
        .endpoints
        .iter()
        .map(|e| GatewayEndpoint {
            address: e.address,
            state: e.state,
            reason: e.reason,
            connect_deadline_ms: e.connect_deadline_ms,
            syn_rtt_p50_us: e.syn_rtt.p50_us,
            syn_rtt_p99_us: e.syn_rtt.p99_us,
            // The gateway lists them oldest first.
            recent: e.recent.iter().rev().take(RECENT_SHOWN).cloned().collect(),
        })
        .collect();
    Ok(GatewayView {
        admin,
        cluster: cluster.to_owned(),
        observer: status.observer.mode,
        now_unix_ms: status.now_unix_ms,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::admin::status::HealthEventKind;

    /// A `/status` as the gateway writes it, with the clusters given.
    fn status(clusters: serde_json::Value) -> Status {
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "uptime_s": 10.0, "started_unix_ms": 0, "now_unix_ms": 10_000,
            "draining": false, "ready": true, "not_ready": [],
            "observer": {"mode": "kernel", "kernel_signals": true, "reason": null,
                         "cgroup": "/sys/fs/cgroup/gateway-1", "events_lost": 0},
            "clusters": clusters,
        }))
        .expect("a /status as the gateway writes it")
    }

    fn endpoint(address: &str, state: &str, reason: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "address": address, "weight": 1, "state": state, "reason": reason,
            "since_unix_ms": 0, "ejected_until_unix_ms": null, "connect_deadline_ms": 250.0,
            "connect_deadline_source": "configured",
            "syn_rtt": {"p50_us": null, "p99_us": null, "samples": 0},
            "in_flight": 0, "recent": [],
        })
    }

    fn endpoints_in(status: &Status, cluster: &str) -> Result<Vec<SocketAddr>, Option<String>> {
        view_of("127.0.0.1:9901".parse().unwrap(), status, cluster).map(|v| v.addresses())
    }

    #[test]
    fn the_gateways_view_becomes_evidence() {
        let mut bad = endpoint("10.0.0.5:8080", "ejected", "refused".into());
        bad["recent"] = serde_json::json!([
            {"at_unix_ms": 7_000, "event": "failure", "reason": null, "detail": "older"},
            {"at_unix_ms": 7_500, "event": "ejected", "reason": "refused",
             "detail": "kernel: refused, 1 SYN sent, RST received, ECONNREFUSED"}]);
        let mut ok = endpoint("10.0.0.6:8080", "healthy", serde_json::Value::Null);
        ok["syn_rtt"] = serde_json::json!({"p50_us": 61, "p99_us": 140, "samples": 24});
        let status = status(serde_json::json!([
            {"name": "api", "lb_policy": "round_robin", "routable": 1, "endpoints": [bad, ok]}
        ]));
        let v = view_of("127.0.0.1:9901".parse().unwrap(), &status, "api").unwrap();
        assert_eq!(
            v.endpoints[0].recent[0].event,
            HealthEventKind::Ejected,
            "newest first"
        );
        assert_eq!(
            v.evidence(),
            vec![
                "the gateway at 127.0.0.1:9901 (kernel signals) has 10.0.0.5:8080 ejected \
                 (refused); latest 2.5 s ago: ejected (refused): kernel: refused, 1 SYN sent, \
                 RST received, ECONNREFUSED [gateway]"
                    .to_owned(),
                "the gateway at 127.0.0.1:9901 (kernel signals) has 10.0.0.6:8080 healthy, \
                 handshakes p50 61 us / p99 140 us [gateway]"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn unknown_and_empty_clusters() {
        let status = status(serde_json::json!([
            {"name": "api", "lb_policy": "round_robin", "routable": 2, "endpoints": [
                endpoint("10.0.0.5:8080", "healthy", serde_json::Value::Null),
                endpoint("[fd00::1]:80", "suspect", "overloaded".into())]},
            {"name": "web", "lb_policy": "least_request", "routable": 0, "endpoints": []}
        ]));
        assert_eq!(
            endpoints_in(&status, "api").unwrap(),
            vec![
                "10.0.0.5:8080".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:80".parse().unwrap()
            ]
        );
        assert_eq!(endpoints_in(&status, "web"), Err(None));
        assert_eq!(endpoints_in(&status, "db"), Err(Some("api, web".into())));
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Answers one request on a loopback port with `response`, verbatim.
    fn serve_once(response: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(&response).unwrap();
        });
        (admin, server)
    }

    #[test]
    fn a_chunked_status_is_read_into_the_structs_that_wrote_it() {
        let status = status(serde_json::json!([
            {"name": "api", "lb_policy": "round_robin", "routable": 1, "endpoints": [
                endpoint("10.0.0.5:8080", "healthy", serde_json::Value::Null)]}
        ]));
        let json = serde_json::to_string_pretty(&status).unwrap();
        let (a, b) = json.split_at(json.len() / 2);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\
             connection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        let (admin, server) = serve_once(response.into_bytes());
        let v = runtime().block_on(cluster_view(admin, "api")).unwrap();
        server.join().unwrap();
        assert_eq!(v.addresses(), vec!["10.0.0.5:8080".parse().unwrap()]);
        assert_eq!(v.observer, SignalOrigin::Kernel);
        assert_eq!(v.now_unix_ms, 10_000);
    }

    #[test]
    fn a_gateway_without_status_is_a_clear_error() {
        let (admin, server) = serve_once(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        );
        let err = runtime()
            .block_on(cluster_view(admin, "api"))
            .unwrap_err()
            .to_string();
        server.join().unwrap();
        assert!(
            err.contains("cluster lookup needs the gateway admin API's /status endpoint")
                && err.contains("HTTP/1.1 404 Not Found"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_gateway_that_never_answers_times_out() {
        // Accepted by the kernel (backlog), never answered.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = listener.local_addr().unwrap();
        let start = tokio::time::Instant::now();
        let err = cluster_view(admin, "api").await.unwrap_err();
        assert!(
            matches!(err, AdminError::Timeout { timeout, .. } if timeout == ADMIN_TIMEOUT),
            "{err}"
        );
        assert_eq!(start.elapsed(), ADMIN_TIMEOUT);
        drop(listener);
    }
}
