//! Shared by the `admin_*` tests: reading the admin API of a running gateway (in-process or the
//! built binary) and picking values out of its OpenMetrics text. Loopback only.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// How long a test waits for a value that the gateway updates asynchronously.
pub const SETTLE: Duration = Duration::from_secs(10);

/// One admin response.
#[derive(Debug)]
pub struct AdminReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `METHOD path` on the admin listener, with a blocking socket and `Connection: close` (no
/// client pool in the way), within 5 s.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str) -> AdminReply {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to the admin listener {admin}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("reading {path} from {admin}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    AdminReply {
        status,
        content_type,
        body,
    }
}

pub fn admin_get(admin: SocketAddr, path: &str) -> AdminReply {
    admin_request(admin, "GET", path)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `/status` as JSON.
pub fn status(admin: SocketAddr) -> serde_json::Value {
    let r = admin_get(admin, "/status");
    assert_eq!(r.status, 200, "/status: {}", r.body);
    assert_eq!(r.content_type, "application/json");
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", r.body))
}

/// The endpoint object of `addr` in cluster `cluster` of a `/status` document.
pub fn endpoint<'a>(
    status: &'a serde_json::Value,
    cluster: &str,
    addr: SocketAddr,
) -> &'a serde_json::Value {
    let c = status["clusters"]
        .as_array()
        .expect("clusters is a list")
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {status:#}"));
    c["endpoints"]
        .as_array()
        .expect("endpoints is a list")
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("no endpoint {addr} in cluster {cluster}: {c:#}"))
}

/// `/metrics` text.
pub fn metrics(admin: SocketAddr) -> String {
    let r = admin_get(admin, "/metrics");
    assert_eq!(r.status, 200, "/metrics: {}", r.body);
    assert!(
        r.content_type.starts_with("application/openmetrics-text"),
        "{}",
        r.content_type
    );
    assert!(r.body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    r.body
}

/// The value of the sample `name{labels…}` (every given label must match, others may be
/// there too); `None` when there is no such sample.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return false;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// [`sample`], 0 when absent (a counter that never moved has no sample yet).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` and the last `/metrics`
/// or `/status` text `last` returned.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last seen:\n{last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Whether this process runs as root (privileged tests say so, and fail without it).
pub fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} is a privileged test: it runs `gateway run` with the eBPF observer attached, \
         which needs root (run the suite with ./dev test)"
    );
}
