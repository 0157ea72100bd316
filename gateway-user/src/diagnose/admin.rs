//! Cluster targets: the endpoints of a cluster of a running gateway, read from its admin API
//! (`GET /status` on `--admin ADDR`). The gateway's admin listener serves `/status` only once
//! the admin API exists; until then the lookup fails with an error that says so.
//!
//! `/status` is read tolerantly: `clusters` is a list of objects with a `name`, or an object
//! keyed by name; a cluster's `endpoints` are `ip:port` strings or objects with one in
//! `address`, `addr` or `endpoint`.

use std::{net::SocketAddr, time::Duration};

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

/// The endpoints of `cluster` according to the gateway at `admin`.
pub async fn cluster_endpoints(
    admin: SocketAddr,
    cluster: &str,
) -> Result<Vec<SocketAddr>, AdminError> {
    let body = tokio::time::timeout(ADMIN_TIMEOUT, get_status(admin))
        .await
        .map_err(|_| AdminError::Timeout {
            admin,
            timeout: ADMIN_TIMEOUT,
        })??;
    let status: Value =
        serde_json::from_slice(&body).map_err(|source| AdminError::NotJson { admin, source })?;
    endpoints_in(&status, cluster).map_err(|known| match known {
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
fn endpoints_in(status: &Value, cluster: &str) -> Result<Vec<SocketAddr>, Option<String>> {
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
    let addrs: Vec<SocketAddr> = found["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let text = match e {
                Value::String(s) => Some(s.as_str()),
                Value::Object(_) => ["address", "addr", "endpoint"]
                    .iter()
                    .find_map(|k| e[*k].as_str()),
                _ => None,
            }?;
            text.parse().ok()
        })
        .collect();
    if addrs.is_empty() {
        Err(None)
    } else {
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .block_on(cluster_endpoints(admin, "api"))
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
