//! Cluster targets: the endpoints of a cluster of a running gateway, and what that gateway has
//! seen of them, read from its admin API (`GET /status` on `--admin ADDR`; the shape is
//! documented in the gateway's `proxy/admin/status.rs`). The gateway's view (each endpoint's
//! health state, its reason and the recent failures and ejections with their kernel evidence)
//! goes into the report as evidence lines and as `measurements.gateway` ([`GatewayView`]).
//!
//! `/status` is read tolerantly, so that an older or newer gateway still resolves: `clusters` is
//! a list of objects with a `name`, or an object keyed by name; a cluster's `endpoints` are
//! `ip:port` strings or objects with one in `address`, `addr` or `endpoint`; every other field
//! is optional.

use std::{net::SocketAddr, time::Duration};

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Connect plus answer, for the admin request.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest `/status` body read.
const MAX_STATUS_BYTES: u64 = 16 << 20;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("asking the gateway admin API at {admin} for /status failed: {source}")]
    Io {
        admin: SocketAddr,
        source: std::io::Error,
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
    #[error("the gateway admin API at {admin} returned /status that is not JSON: {source}")]
    NotJson {
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
    /// The gateway's own signals: `kernel` or `userspace`, when `/status` says.
    pub observer: Option<String>,
    /// When `/status` was read (the gateway's clock), Unix ms.
    pub now_unix_ms: Option<u64>,
    pub endpoints: Vec<GatewayEndpoint>,
}

/// One endpoint as the gateway sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayEndpoint {
    pub address: SocketAddr,
    /// `healthy`, `suspect`, `ejected`, `probing`.
    pub state: Option<String>,
    /// Why it is not healthy (`refused`, `syn_unanswered`, ...).
    pub reason: Option<String>,
    pub connect_deadline_ms: Option<f64>,
    pub syn_rtt_p50_us: Option<u64>,
    pub syn_rtt_p99_us: Option<u64>,
    /// The gateway's latest events for it, newest first, at most five.
    pub recent: Vec<GatewayEvent>,
}

/// A failure, ejection or recovery the gateway recorded, with its evidence in words.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayEvent {
    pub at_unix_ms: Option<u64>,
    pub event: String,
    pub reason: Option<String>,
    pub detail: String,
}

impl GatewayView {
    /// The endpoint addresses, in the gateway's order.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.endpoints.iter().map(|e| e.address).collect()
    }

    /// Evidence lines for the report, one per endpoint: its state and reason, and the latest
    /// thing the gateway recorded about it, with the gateway's kernel evidence.
    pub fn evidence(&self) -> Vec<String> {
        let signals = match self.observer.as_deref() {
            Some("kernel") => " (kernel signals)",
            Some(_) => " (userspace timing)",
            None => "",
        };
        self.endpoints
            .iter()
            .map(|e| {
                let mut line = format!(
                    "the gateway at {}{signals} has {} {}",
                    self.admin,
                    e.address,
                    e.state.as_deref().unwrap_or("in an unknown state")
                );
                if let Some(r) = &e.reason {
                    line.push_str(&format!(" ({r})"));
                }
                if let (Some(p50), Some(p99)) = (e.syn_rtt_p50_us, e.syn_rtt_p99_us) {
                    line.push_str(&format!(", handshakes p50 {p50} us / p99 {p99} us"));
                }
                if let Some(ev) = e.recent.first() {
                    let ago = match (self.now_unix_ms, ev.at_unix_ms) {
                        (Some(now), Some(at)) => {
                            format!(" {:.1} s ago", now.saturating_sub(at) as f64 / 1e3)
                        }
                        _ => String::new(),
                    };
                    line.push_str(&format!("; latest{ago}: {}", ev.event));
                    if let Some(r) = &ev.reason {
                        line.push_str(&format!(" ({r})"));
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
    let raw = tokio::time::timeout(ADMIN_TIMEOUT, get_status(admin))
        .await
        .map_err(|_| AdminError::Timeout {
            admin,
            timeout: ADMIN_TIMEOUT,
        })??;
    view_from_response(admin, &raw, cluster)
}

/// The gateway's view of `cluster` from the raw bytes of its answer to `GET /status` (status
/// line, headers, body: plain, close-delimited or chunked). Pure, so that it can be fuzzed:
/// any bytes give a view or an error, never a panic.
pub fn view_from_response(
    admin: SocketAddr,
    raw: &[u8],
    cluster: &str,
) -> Result<GatewayView, AdminError> {
    let body = status_body(admin, raw)?;
    let status: Value =
        serde_json::from_slice(&body).map_err(|source| AdminError::NotJson { admin, source })?;
    view_of(admin, &status, cluster).map_err(|known| match known {
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

async fn get_status(admin: SocketAddr) -> Result<Vec<u8>, AdminError> {
    let io = |source| AdminError::Io { admin, source };
    let mut stream = tokio::net::TcpStream::connect(admin).await.map_err(io)?;
    stream
        .write_all(
            format!(
                "GET /status HTTP/1.1\r\nHost: {admin}\r\nAccept: application/json\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_STATUS_BYTES)
        .read_to_end(&mut raw)
        .await
        .map_err(io)?;
    Ok(raw)
}

/// The body of a 200 answer, de-chunked when it says so.
fn status_body(admin: SocketAddr, raw: &[u8]) -> Result<Vec<u8>, AdminError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status_line = head.lines().next().unwrap_or("").to_owned();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(AdminError::NoStatus { admin, status_line });
    }
    let body = raw.get(split + 4..).unwrap_or_default().to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(&body));
    }
    Ok(body)
}

/// Decodes a chunked body (trailers ignored).
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        body = &body[eol + 2..];
        if size == 0 || body.len() < size {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
    out
}

/// `Err(Some(known clusters))` when the cluster is missing, `Err(None)` when it has no
/// endpoints.
fn view_of(
    admin: SocketAddr,
    status: &Value,
    cluster: &str,
) -> Result<GatewayView, Option<String>> {
    let clusters = &status["clusters"];
    let (found, known): (Option<&Value>, Vec<String>) = match clusters {
        Value::Array(list) => (
            list.iter().find(|c| c["name"] == cluster),
            list.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect(),
        ),
        Value::Object(map) => (map.get(cluster), map.keys().cloned().collect()),
        _ => (None, Vec::new()),
    };
    let Some(found) = found else {
        return Err(Some(if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }));
    };
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let endpoints: Vec<GatewayEndpoint> = found["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let address = match e {
                Value::String(s) => Some(s.as_str()),
                Value::Object(_) => ["address", "addr", "endpoint"]
                    .iter()
                    .find_map(|k| e[*k].as_str()),
                _ => None,
            }?
            .parse()
            .ok()?;
            let mut recent: Vec<GatewayEvent> = e["recent"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|ev| GatewayEvent {
                    at_unix_ms: ev["at_unix_ms"].as_u64(),
                    event: text(&ev["event"]).unwrap_or_else(|| "event".to_owned()),
                    reason: text(&ev["reason"]),
                    detail: text(&ev["detail"]).unwrap_or_default(),
                })
                .collect();
            // The gateway lists them oldest first.
            recent.reverse();
            recent.truncate(RECENT_SHOWN);
            Some(GatewayEndpoint {
                address,
                state: text(&e["state"]),
                reason: text(&e["reason"]),
                connect_deadline_ms: e["connect_deadline_ms"].as_f64(),
                syn_rtt_p50_us: e["syn_rtt"]["p50_us"].as_u64(),
                syn_rtt_p99_us: e["syn_rtt"]["p99_us"].as_u64(),
                recent,
            })
        })
        .collect();
    if endpoints.is_empty() {
        return Err(None);
    }
    Ok(GatewayView {
        admin,
        cluster: cluster.to_owned(),
        observer: text(&status["observer"]["mode"]),
        now_unix_ms: status["now_unix_ms"].as_u64(),
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints_in(status: &Value, cluster: &str) -> Result<Vec<SocketAddr>, Option<String>> {
        view_of("127.0.0.1:9901".parse().unwrap(), status, cluster).map(|v| v.addresses())
    }

    #[test]
    fn the_gateways_view_becomes_evidence() {
        let status = serde_json::json!({
            "now_unix_ms": 10_000,
            "observer": {"mode": "kernel"},
            "clusters": [{"name": "api", "endpoints": [
                {"address": "10.0.0.5:8080", "state": "ejected", "reason": "refused",
                 "syn_rtt": {"p50_us": null, "p99_us": null, "samples": 0},
                 "recent": [
                    {"at_unix_ms": 7_000, "event": "failure", "reason": null, "detail": "older"},
                    {"at_unix_ms": 7_500, "event": "ejected", "reason": "refused",
                     "detail": "kernel: refused, 1 SYN sent, RST received, ECONNREFUSED"}]},
                {"address": "10.0.0.6:8080", "state": "healthy", "reason": null,
                 "syn_rtt": {"p50_us": 61, "p99_us": 140, "samples": 24}, "recent": []}
            ]}]
        });
        let v = view_of("127.0.0.1:9901".parse().unwrap(), &status, "api").unwrap();
        assert_eq!(v.endpoints[0].recent[0].event, "ejected", "newest first");
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
    fn clusters_as_a_list_or_a_map() {
        let list = serde_json::json!({"clusters": [
            {"name": "api", "endpoints": [{"address": "10.0.0.5:8080", "state": "healthy"}, "10.0.0.6:8080"]},
            {"name": "web", "endpoints": []}
        ]});
        assert_eq!(
            endpoints_in(&list, "api").unwrap(),
            vec![
                "10.0.0.5:8080".parse::<SocketAddr>().unwrap(),
                "10.0.0.6:8080".parse().unwrap()
            ]
        );
        assert_eq!(endpoints_in(&list, "web"), Err(None));
        assert_eq!(endpoints_in(&list, "db"), Err(Some("api, web".into())));
        let map =
            serde_json::json!({"clusters": {"api": {"endpoints": [{"endpoint": "[fd00::1]:80"}]}}});
        assert_eq!(
            endpoints_in(&map, "api").unwrap(),
            vec!["[fd00::1]:80".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }

    #[test]
    fn a_gateway_without_status_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
        });
        let err = rt
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
}
