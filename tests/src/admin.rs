//! The admin API of a running gateway (in-process or a child), read back: `/status` as JSON
//! and its endpoints, `/metrics` samples checked against the metric catalogue (so that a
//! renamed metric or label fails a test instead of reading as 0), and polling for a value the
//! gateway updates asynchronously. Requests are blocking, one per connection, within 5 s.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::http::{BlockingReply, request_once};

/// How long a test waits for a value that the gateway updates asynchronously.
pub const SETTLE: Duration = Duration::from_secs(10);

/// `METHOD path` on the admin listener (see [`request_once`]); panics when there is no HTTP
/// answer within 5 s.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str) -> BlockingReply {
    request_once(admin, method, path, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{method} {path} on the admin listener {admin}: {e}"))
}

pub fn admin_get(admin: SocketAddr, path: &str) -> BlockingReply {
    admin_request(admin, "GET", path)
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

/// The catalogue entry (`gateway::metrics::CATALOGUE`, the source of METRICS.md) of the
/// family that sample name `name` belongs to: counters are exposed as `NAME_total`, histograms
/// as `NAME_count`, `NAME_sum` and `NAME_bucket`.
pub fn catalogued(name: &str) -> Option<&'static gateway::metrics::MetricDoc> {
    gateway::metrics::CATALOGUE.iter().find(|d| {
        name == d.name
            || (d.kind == "counter" && name.strip_suffix("_total") == Some(d.name))
            || (d.kind == "histogram"
                && ["_count", "_sum", "_bucket"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(d.name)))
    })
}

/// [`sample`], 0 when a counter or histogram has no such sample yet (a family whose labels
/// never took these values has none). What a test asks for must exist, though: the family in
/// the catalogue, with every label the test names, and a gauge's sample itself. So a renamed
/// metric or label fails the test instead of reading as 0.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let doc = catalogued(name)
        .unwrap_or_else(|| panic!("{name} is not a metric of gateway run (METRICS.md)"));
    for (k, _) in labels {
        assert!(
            doc.labels.contains(k),
            "{} has no label {k} (it has {:?})",
            doc.name,
            doc.labels
        );
    }
    match sample(text, name, labels) {
        Some(v) => v,
        None if doc.kind == "gauge" => {
            panic!("no sample {name} {labels:?} of the gauge in /metrics:\n{text}")
        }
        None => 0.0,
    }
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

/// Waits until `/status` shows exactly one request in flight to `endpoint` of `cluster` (the
/// request a test holds at a slow upstream), within [`SETTLE`].
pub fn wait_in_flight(admin: SocketAddr, cluster: &str, endpoint_addr: SocketAddr) {
    wait_for(
        &format!("one request in flight to {endpoint_addr} in /status"),
        || {
            let s = status(admin);
            if endpoint(&s, cluster, endpoint_addr)["in_flight"] == 1 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );
}
