//! Per-route policy, request IDs and `expose_upstream_errors`, end to end through the gateway
//! in-process with loopback upstreams (hyper as the client):
//!
//! - routes matched on method and headers as well as path, with the path prefix rewritten;
//! - request and response header rules (set, add, remove);
//! - a route's own response timeout and retry count, beside a route on the same cluster that
//!   keeps the cluster's;
//! - request IDs: a client's kept (upstream, response, access log), one generated when the
//!   client sent none (or when `keep_incoming = false`);
//! - the three `expose_upstream_errors` modes for a refused upstream, with the access log
//!   keeping the whole sentence in every mode.
//!
//! Unprivileged: loopback only.

use std::time::{Duration, Instant};

use gateway_testkit::{
    config::base_config,
    http::{Got, client, empty, send},
    inprocess::{gateway, gateway_with, log_lines},
    peers::h2load,
    ports::refused_addr,
    upstream::Upstream,
};
use http::Request;

/// A request to the gateway at `addr` with `method`, `path` and extra headers.
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", "test.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&client(), req.body(empty()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_on_method_and_headers_and_rewrite_the_prefix() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let cfg = format!(
        r#"
[[routes]]
name = "canary-writes"
path_prefix = "/data/"
methods = ["POST"]
headers = [{{ name = "x-canary", value = "1" }}]
rewrite_prefix = "/bytes/"
cluster = "b"

[[routes]]
name = "no-debug"
path_prefix = "/data/"
headers = [{{ name = "x-debug", present = false }}]
cluster = "a"

[[routes]]
name = "rest"
path_prefix = "/"
cluster = "b"

[clusters.a]
endpoints = ["{}"]
[clusters.b]
endpoints = ["{}"]
"#,
        a.addr, b.addr
    );
    let gw = gateway("route-match", &cfg).await;
    // POST with the header: the canary route, its prefix rewritten (`/bytes/5` streams 5
    // bytes).
    let got = call(gw.addr, "POST", "/data/5", &[("x-canary", "1")]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), "b");
    assert_eq!(
        got.body.len(),
        5,
        "the upstream saw /bytes/5: {:?}",
        got.body
    );
    // GET: not the canary route (method), the next one that matches.
    let got = call(gw.addr, "GET", "/data/5", &[("x-canary", "1")]).await;
    assert_eq!(got.header("x-upstream"), "a");
    assert_eq!(got.body, "a", "no rewrite on this route");
    // POST without the header: not the canary route (header).
    let got = call(gw.addr, "POST", "/data/5", &[]).await;
    assert_eq!(got.header("x-upstream"), "a");
    // `present = false`: a request with x-debug falls through to the last route.
    let got = call(gw.addr, "GET", "/data/5", &[("x-debug", "on")]).await;
    assert_eq!(got.header("x-upstream"), "b");
    let routes: Vec<_> = log_lines(&gw.log, 4)
        .iter()
        .map(|l| l["route"].as_str().unwrap_or("-").to_owned())
        .collect();
    assert_eq!(routes, ["canary-writes", "no-debug", "no-debug", "rest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_set_add_and_remove_both_ways() {
    let up = Upstream::start("up").await;
    let cfg = format!(
        r#"
[[routes]]
path_prefix = "/"
cluster = "up"
[routes.request_headers]
set = {{ "x-env" = "prod" }}
add = {{ "x-tag" = "gw" }}
remove = ["x-internal"]
[routes.response_headers]
set = {{ "cache-control" = "no-store" }}
remove = ["x-upstream"]

[clusters.up]
endpoints = ["{}"]
"#,
        up.addr
    );
    let gw = gateway("route-headers", &cfg).await;
    let got = call(
        gw.addr,
        "GET",
        "/headers",
        &[
            ("x-env", "dev"),
            ("x-tag", "client"),
            ("x-internal", "secret"),
        ],
    )
    .await;
    assert_eq!(got.status, 200);
    let seen: Vec<&str> = got.body.lines().collect();
    assert!(seen.contains(&"x-env: prod"), "set replaces: {seen:?}");
    assert!(!seen.contains(&"x-env: dev"), "set replaces: {seen:?}");
    assert!(
        seen.contains(&"x-tag: client") && seen.contains(&"x-tag: gw"),
        "add appends: {seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("x-internal")),
        "remove: {seen:?}"
    );
    assert_eq!(got.header("cache-control"), "no-store");
    assert!(got.headers.get("x-upstream").is_none(), "{:?}", got.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_timeout_and_retries_override_its_clusters() {
    let up = Upstream::start("up").await;
    let (r1, r2) = (refused_addr(), refused_addr());
    assert_ne!(r1, r2);
    // Two clusters, each with a route that keeps its policy and one that overrides it: `up`
    // (a 5 s response timeout; the route's 300 ms) and `dead` (two refusing endpoints, kept
    // routable: 2 retries; the route's none).
    let cfg = format!(
        r#"
[[routes]]
path_prefix = "/strict/"
rewrite_prefix = "/"
cluster = "up"
[routes.timeouts]
response_timeout_ms = 300

[[routes]]
path_prefix = "/dead-strict/"
cluster = "dead"
[routes.retry]
max_retries = 0

[[routes]]
path_prefix = "/dead/"
cluster = "dead"

[[routes]]
path_prefix = "/"
cluster = "up"

[clusters.up]
endpoints = ["{}"]
[clusters.up.timeouts]
response_timeout_ms = 5000

[clusters.dead]
endpoints = ["{r1}", "{r2}"]
[clusters.dead.timeouts]
adaptive_connect_deadline = false
[clusters.dead.health]
max_ejected_percent = 0
"#,
        up.addr
    );
    let gw = gateway("route-policy", &cfg).await;
    let start = Instant::now();
    let got = call(gw.addr, "GET", "/strict/delay/3000", &[]).await;
    assert_eq!(got.status, 504, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "response_timeout");
    assert!(got.body.contains("300 ms"), "{}", got.body);
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    let got = call(gw.addr, "GET", "/delay/600", &[]).await;
    assert_eq!(got.status, 200, "the cluster's timeout on the other route");
    // The cluster's retries: both endpoints tried. The route's: one.
    let got = call(gw.addr, "GET", "/dead/x", &[]).await;
    assert_eq!(got.status, 502, "{}", got.body);
    assert_eq!(got.header("x-gateway-attempts"), "2", "{}", got.body);
    for _ in 0..3 {
        let got = call(gw.addr, "GET", "/dead-strict/x", &[]).await;
        assert_eq!(got.status, 502, "{}", got.body);
        assert_eq!(got.header("x-gateway-error"), "connect_refused");
        assert_eq!(got.header("x-gateway-attempts"), "1", "{}", got.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_or_generated_and_logged() {
    let up = Upstream::start("up").await;
    let cfg = format!(
        "[[routes]]\npath_prefix = \"/\"\ncluster = \"up\"\n[clusters.up]\nendpoints = [\"{}\"]\n",
        up.addr
    );
    let gw = gateway("request-id", &cfg).await;
    // Kept: the upstream, the response and the log all carry the client's.
    let got = call(
        gw.addr,
        "GET",
        "/headers",
        &[("x-request-id", "client-id-1")],
    )
    .await;
    assert_eq!(got.header("x-request-id"), "client-id-1");
    assert!(
        got.body.contains("x-request-id: client-id-1\n"),
        "{}",
        got.body
    );
    // Generated: a UUID, the same upstream, back and in the log.
    let got = call(gw.addr, "GET", "/headers", &[]).await;
    let id = got.header("x-request-id").to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id:?}");
    assert_eq!(id.as_bytes()[14], b'4', "version 4: {id}");
    assert!(
        got.body.contains(&format!("x-request-id: {id}\n")),
        "{}",
        got.body
    );
    // Not one that does not look like an ID (a control character, or too long).
    let long = "x".repeat(201);
    let got = call(gw.addr, "GET", "/headers", &[("x-request-id", &long)]).await;
    assert_eq!(got.header("x-request-id").len(), 36);
    let lines = log_lines(&gw.log, 3);
    assert_eq!(lines[0]["request_id"], "client-id-1");
    assert_eq!(lines[1]["request_id"], id.as_str());
    // `keep_incoming = false`: always the gateway's own.
    let cfg = format!("[router.request_id]\nkeep_incoming = false\n{cfg}");
    let gw = gateway("request-id-own", &cfg).await;
    let got = call(
        gw.addr,
        "GET",
        "/headers",
        &[("x-request-id", "client-id-2")],
    )
    .await;
    let id = got.header("x-request-id");
    assert_eq!(id.len(), 36, "{id}");
    assert!(
        got.body.contains(&format!("x-request-id: {id}\n")),
        "{}",
        got.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expose_upstream_errors_full_reason_and_none() {
    let refused = refused_addr();
    let cluster = format!(
        "[[routes]]\npath_prefix = \"/\"\ncluster = \"c\"\n[clusters.c]\nendpoints = [\"{refused}\"]\n\
         [clusters.c.retry]\nmax_retries = 0\n"
    );
    let addr = refused.to_string();
    for mode in ["full", "reason", "none"] {
        let gw = gateway_with(&format!("expose-{mode}"), |base| {
            let router = format!("[router]\nexpose_upstream_errors = \"{mode}\"\n");
            format!("{}\n{cluster}", base.replacen("[router]\n", &router, 1))
        })
        .await;
        let got = call(gw.addr, "GET", "/x", &[]).await;
        assert_eq!(got.status, 502, "{mode}");
        assert!(
            !got.header("x-request-id").is_empty(),
            "{mode}: the ID in every mode"
        );
        match mode {
            "full" => {
                assert_eq!(got.header("x-gateway-error"), "connect_refused");
                assert_eq!(got.header("x-gateway-endpoint"), addr);
                assert_eq!(got.header("x-gateway-attempts"), "1");
                assert!(got.body.contains(&addr), "{}", got.body);
            }
            "reason" => {
                assert_eq!(got.header("x-gateway-error"), "connect_refused");
                assert_eq!(got.header("x-gateway-attempts"), "1");
                assert!(got.headers.get("x-gateway-endpoint").is_none());
                assert!(got.headers.get("x-gateway-evidence").is_none());
                assert!(
                    !got.body.contains(&addr),
                    "no internal address: {}",
                    got.body
                );
                assert!(got.body.contains("connect_refused"), "{}", got.body);
            }
            _ => {
                assert!(
                    !got.headers
                        .keys()
                        .any(|k| k.as_str().starts_with("x-gateway-")),
                    "{:?}",
                    got.headers
                );
                assert!(got.body.is_empty(), "{:?}", got.body);
            }
        }
        // The access log keeps the whole sentence, whatever the client was told.
        let l = &log_lines(&gw.log, 1)[0];
        assert_eq!(l["error"], "connect_refused", "{mode}: {l}");
        assert!(
            l["detail"].as_str().unwrap_or("").contains(&addr),
            "{mode}: {l}"
        );
    }
}

/// curl: `n` GETs of `path` on one connection through the gateway at `addr`, with `headers`;
/// each one's status and `Retry-After`.
fn curl_burst(addr: std::net::SocketAddr, path: &str, n: usize, headers: &[&str]) -> Vec<String> {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-s", "-H", "Host: test.local"]);
    for h in headers {
        curl.args(["-H", h]);
    }
    for _ in 0..n {
        curl.args(["-o", "/dev/null"])
            .arg(format!("http://{addr}{path}"));
    }
    let out = curl
        .args(["-w", "%{http_code}/%header{retry-after} "])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A route's `rate_limit`: a burst passes, then `429` with `Retry-After` and nothing upstream;
/// each client (behind a trusted proxy, the one it names) has its own bucket, `by = "route"`
/// one for all; a reload that keeps the limit keeps the buckets; h2load over HTTP/2 meets
/// the same limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_answers_429_past_the_burst_per_client_or_per_route() {
    let up = Upstream::start("limited").await;
    let config = |per_client: &str| {
        format!(
            r#"
[router.forwarded]
trusted_proxies = ["127.0.0.0/8"]

[[routes]]
path_prefix = "/client/"
cluster = "up"
[routes.rate_limit]
{per_client}

[[routes]]
path_prefix = "/route/"
cluster = "up"
[routes.rate_limit]
requests_per_second = 0.2
burst = 1
by = "route"

[clusters.up]
endpoints = ["{}"]
"#,
            up.addr
        )
    };
    let slow = "requests_per_second = 0.05\nburst = 3";
    let gw = gateway("rate-limit", &config(slow)).await;
    let addr = gw.addr;
    let burst = move |path: &'static str, n, client: &'static str| async move {
        let xff = format!("X-Forwarded-For: {client}");
        tokio::task::spawn_blocking(move || curl_burst(addr, path, n, &[&xff]))
            .await
            .unwrap()
    };
    // One every 20 s, 3 at once: the fourth and fifth wait about 20 s (long enough for the
    // reload below to find the bucket still full on a loaded machine).
    let got = burst("/client/a", 5, "192.0.2.1").await;
    assert_eq!(got[..3], ["200/", "200/", "200/"], "{got:?}");
    for limited in &got[3..] {
        let (status, retry) = limited.split_once('/').unwrap();
        assert_eq!(status, "429", "{got:?}");
        let secs: u64 = retry
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After: {got:?}"));
        assert!((1..=20).contains(&secs), "{got:?}");
    }
    assert_eq!(up.hits(), 3, "nothing past the limit went upstream");
    // Another client behind the same proxy has its own bucket.
    assert_eq!(burst("/client/a", 1, "192.0.2.2").await, ["200/"]);
    // By route: one bucket, whoever asks.
    assert_eq!(burst("/route/x", 1, "192.0.2.1").await, ["200/"]);
    assert_eq!(
        burst("/route/x", 1, "192.0.2.3").await[0].split('/').next(),
        Some("429")
    );
    let line = log_lines(&gw.log, 8)
        .into_iter()
        .find(|l| l["status"] == 429)
        .unwrap();
    assert_eq!(line["error"], "rate_limited", "{line}");
    assert_eq!(line["forwarded_client"], "192.0.2.1", "{line}");

    // A reload that keeps the limit keeps what its buckets hold; one that changes it starts
    // afresh.
    let reload = |per_client: &str| {
        let text = format!("{}\n{}", base_config(&gw.log), config(per_client));
        gateway::config::load_str(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .settings
    };
    let report = gw.handle.reload(reload(slow)).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert_eq!(
        burst("/client/a", 1, "192.0.2.1").await[0]
            .split('/')
            .next(),
        Some("429")
    );
    gw.handle
        .reload(reload("requests_per_second = 50\nburst = 10"))
        .await;
    assert_eq!(burst("/client/a", 1, "192.0.2.1").await, ["200/"]);

    // h2load, over HTTP/2 on one connection: 200 requests at once against 50 a second with a
    // burst of 10: the 10 pass, and as many more as the rate refills while the run lasts
    // (timed from before h2load starts, so never less than the run); all the rest are 429.
    let url = format!("http://{addr}/client/h2");
    let started = std::time::Instant::now();
    let run = tokio::task::spawn_blocking(move || {
        h2load(
            &url,
            &[
                "-n",
                "200",
                "-c",
                "1",
                "-m",
                "10",
                "-H",
                "x-forwarded-for: 192.0.2.9",
            ],
        )
    })
    .await
    .unwrap();
    let refilled = (50.0 * started.elapsed().as_secs_f64()).ceil() as u64;
    assert_eq!(run.status_2xx + run.status_4xx, 200, "{}", run.text);
    assert!(
        (10..=10 + refilled).contains(&run.status_2xx),
        "passed {} of 200, with {refilled} refilled over the run: {}",
        run.status_2xx,
        run.text
    );
}
