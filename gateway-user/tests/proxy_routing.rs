//! Routing by host and path prefix, header rewriting, HTTP/2 clients, and the access log line.
//! The gateway runs in-process in front of loopback upstreams.

use gateway_testkit::{
    config::base_config,
    http::{client, empty, get, get_host, h2_client, send},
    inprocess::{InProcess, gateway, log_lines},
    upstream::Upstream,
};
use http::{Request, StatusCode};

async fn three_clusters() -> (Upstream, Upstream, Upstream, InProcess) {
    let api = Upstream::start("api").await;
    let web = Upstream::start("web").await;
    let admin = Upstream::start("admin").await;
    let gw = gateway(
        "routing",
        &format!(
            r#"
[[routes]]
path_prefix = "/"
cluster = "web"

[[routes]]
name = "api"
path_prefix = "/api/"
cluster = "api"

[[routes]]
host = "admin.example.com"
cluster = "admin"

[[routes]]
host = "*.shop.example.com"
path_prefix = "/api/"
cluster = "admin"

[clusters.api]
endpoints = ["{}"]
[clusters.web]
endpoints = ["{}"]
[clusters.admin]
endpoints = ["{}"]
"#,
            api.addr, web.addr, admin.addr
        ),
    )
    .await;
    (api, web, admin, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_longest_path_prefix() {
    let (_api, _web, _admin, gw) = three_clusters().await;
    let c = client();
    let cases = [
        ("test.local", "/api/users", "api"),
        ("test.local", "/apix", "web"),
        ("test.local", "/", "web"),
        ("admin.example.com", "/api/users", "admin"),
        ("ADMIN.example.com:8080", "/x", "admin"),
        ("a.shop.example.com", "/api/cart", "admin"),
        ("a.shop.example.com", "/cart", "web"),
    ];
    for (host, path, want) in cases {
        let got = get_host(&c, gw.addr, host, path).await;
        assert_eq!(got.status, StatusCode::OK, "{host}{path}: {}", got.body);
        assert_eq!(got.body, want, "{host}{path}");
        assert_eq!(got.header("x-upstream"), want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_request_is_404_with_reason() {
    let api = Upstream::start("api").await;
    let gw = gateway(
        "noroute",
        &format!(
            "[[routes]]\npath_prefix = \"/api\"\ncluster = \"api\"\n[clusters.api]\nendpoints = [\"{}\"]\n",
            api.addr
        ),
    )
    .await;
    let got = get(&client(), gw.addr, "/other").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.header("x-gateway-error"), "no_route");
    assert!(
        got.body
            .contains("no route for host \"test.local\", path \"/other\""),
        "{}",
        got.body
    );
    assert_eq!(api.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_added_and_hop_by_hop_removed() {
    let (_api, _web, _admin, gw) = three_clusters().await;
    let req = Request::get(format!("http://{}/headers", gw.addr))
        .header("host", "test.local")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "must not pass")
        .header("x-end-to-end", "passes")
        .body(empty())
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = got.body.clone();
    assert!(seen.contains("host: test.local\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("via: 1.1 gateway\n"), "{seen}");
    assert!(seen.contains("x-end-to-end: passes\n"), "{seen}");
    assert!(!seen.contains("x-client-hop"), "{seen}");
    // The upstream's own hop-by-hop header (named in its Connection header) is removed too.
    assert_eq!(got.headers.get("x-hop"), None);
    assert_eq!(got.header("via"), "1.1 gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_proxied_to_http1_upstreams() {
    let (_api, _web, _admin, gw) = three_clusters().await;
    let c = h2_client();
    let req = Request::get(format!("http://{}/headers", gw.addr))
        .body(empty())
        .unwrap();
    let got = send(&c, req).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.header("x-upstream"), "web");
    // HTTP/2 has no Host header; the upstream gets one from :authority.
    assert!(
        got.body.contains(&format!("host: {}\n", gw.addr)),
        "{}",
        got.body
    );
    assert!(got.body.contains("via: 2 gateway\n"), "{}", got.body);

    let got = get(&c, gw.addr, "/api/v1").await;
    assert_eq!(got.body, "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_line_names_route_cluster_endpoint_and_timings() {
    let (api, _web, _admin, gw) = three_clusters().await;
    let got = get(&client(), gw.addr, "/api/x?q=1").await;
    assert_eq!(got.status, StatusCode::OK);
    let lines = log_lines(&gw.log, 1);
    let l = &lines[0];
    assert_eq!(l["method"], "GET");
    assert_eq!(l["path"], "/api/x?q=1");
    assert_eq!(l["status"], 200);
    assert_eq!(l["route"], "api");
    assert_eq!(l["cluster"], "api");
    assert_eq!(l["endpoints"][0], api.addr.to_string());
    assert_eq!(l["attempts"], 1);
    assert_eq!(l["retries"], 0);
    assert!(l["connect_ms"].is_number(), "{l}");
    assert!(l["first_byte_ms"].is_number(), "{l}");
    assert!(l["total_ms"].is_number(), "{l}");
    assert!(l["cookies"][0].as_u64().unwrap() > 0, "{l}");
    assert_eq!(l["error"], serde_json::Value::Null);
    assert_eq!(l["bytes"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_endpoints_are_resolved() {
    let up = Upstream::start("named").await;
    let gw = gateway(
        "dns",
        &format!(
            "[router.upstream]\nendpoints = [\"localhost:{}\"]\ndns_refresh_ms = 200\n",
            up.addr.port()
        ),
    )
    .await;
    let c = client();
    // `localhost` may also resolve to ::1, where nothing listens: that attempt is refused and
    // retried on 127.0.0.1, so every request still succeeds.
    for _ in 0..4 {
        let got = get(&c, gw.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert_eq!(got.body, "named");
    }
    // Still served through a few re-resolutions (every 200 ms): ask throughout three periods
    // rather than once after them, and at least ten times (a loaded machine may take longer
    // over each request than the periods last).
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(3 * 200);
    let mut asked = 0;
    while tokio::time::Instant::now() < until || asked < 10 {
        let got = get(&c, gw.addr, "/").await;
        assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "named"));
        asked += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_healthz_reports_serving_and_the_signal_mode() {
    let (_api, _web, _admin, gw) = three_clusters().await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    assert!(admin.ip().is_loopback());
    let got = get(&client(), admin, "/healthz").await;
    assert_eq!(got.status, StatusCode::OK);
    // The mode, with the reason the signal source gives (the real fallback's reason is checked
    // end to end in admin_metrics_privileged.rs).
    assert!(
        got.body.starts_with("ok\nsignals: userspace-only (") && got.body.ends_with(")\n"),
        "{}",
        got.body
    );
    let got = get(&client(), admin, "/other").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
}

/// `[router.forwarded]` trusting `trusted`, a route `/` to the cluster of `web`, and the route
/// `second` (its keys) to the cluster of `other`; each cluster named as its upstream.
fn forwarded_config(trusted: &str, second: &str, web: &Upstream, other: &Upstream) -> String {
    format!(
        "[router.forwarded]\ntrusted_proxies = {trusted}\n\n\
         [[routes]]\npath_prefix = \"/\"\ncluster = \"{w}\"\n\n\
         [[routes]]\n{second}\ncluster = \"{o}\"\n\n\
         [clusters.{w}]\nendpoints = [\"{}\"]\n[clusters.{o}]\nendpoints = [\"{}\"]\n",
        web.addr,
        other.addr,
        w = web.name,
        o = other.name,
    )
}

/// curl GET `/headers` through `gw` with a spoofing client's forwarding headers; the answer
/// with its headers (`-i`). Over HTTP/2 (prior knowledge) when `h2`.
fn curl_spoofing(gw: std::net::SocketAddr, h2: bool) -> String {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-s", "-i", "-H", "Host: test.local"]);
    for h in [
        "X-Forwarded-For: 203.0.113.9",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: admin.example.com",
        "X-Real-IP: 203.0.113.9",
        // Read as X-Real-IP and X-Forwarded-For by CGI-style servers.
        "X-Real_IP: 203.0.113.9",
        "X_Forwarded_For: 10.6.6.6",
        "Forwarded: for=203.0.113.9;proto=https",
        "X-Forwarded-Client-Cert: By=spiffe://gw;URI=spiffe://admin",
        // A second line of a kept request ID never goes upstream.
        "X-Request-Id: first-id",
        "X-Request-Id: forged-id",
    ] {
        curl.args(["-H", h]);
    }
    if h2 {
        curl.arg("--http2-prior-knowledge");
    }
    let out = curl
        .arg(format!("http://{gw}/headers"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_trusted_proxies_forwarding_headers_are_believed() {
    let web = Upstream::start("web").await;
    let secure = Upstream::start("secure").await;
    // A route that only requests that came over HTTPS may take, by the header a proxy in
    // front of the gateway sets.
    let second =
        "path_prefix = \"/\"\nheaders = [{ name = \"x-forwarded-proto\", value = \"https\" }]";
    let config = |trusted: &str| forwarded_config(trusted, second, &web, &secure);
    // The client (127.0.0.1) is a trusted proxy: its list is appended to, its scheme and the
    // rest of its forwarding headers kept, and the log names the client it forwarded for.
    let gw = gateway("forwarded", &config(r#"["127.0.0.0/8", "10.0.0.0/8"]"#)).await;
    let seen = curl_spoofing(gw.addr, false);
    assert!(seen.contains("x-upstream: secure\r\n"), "{seen}");
    for kept in [
        "x-forwarded-for: 203.0.113.9, 127.0.0.1\n",
        "x-forwarded-proto: https\n",
        "x-forwarded-host: admin.example.com\n",
        "x-real-ip: 203.0.113.9\n",
        "x-real_ip: 203.0.113.9\n",
        "forwarded: for=203.0.113.9;proto=https\n",
        "x-forwarded-client-cert: by=spiffe://gw;uri=spiffe://admin\n",
        "x-request-id: first-id\n",
    ] {
        assert!(seen.contains(kept), "{kept:?} not in {seen}");
    }
    // The `_` spelling of a header the gateway writes itself, from any peer.
    for gone in ["x_forwarded_for", "10.6.6.6", "forged-id"] {
        assert!(!seen.contains(gone), "{gone:?} in {seen}");
    }
    let line = &log_lines(&gw.log, 1)[0];
    assert_eq!(line["forwarded_client"], "203.0.113.9", "{line}");
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));

    // After a reload that trusts only 10.0.0.0/8, the same client is anyone: what it says is
    // dropped before routing, over HTTP/1.1 and HTTP/2.
    let text = format!("{}\n{}", base_config(&gw.log), config(r#"["10.0.0.0/8"]"#));
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    for h2 in [false, true] {
        let seen = curl_spoofing(gw.addr, h2);
        assert!(seen.contains("x-upstream: web\r\n"), "h2 {h2}: {seen}");
        assert!(
            seen.contains("x-forwarded-for: 127.0.0.1\n"),
            "h2 {h2}: {seen}"
        );
        assert!(
            seen.contains("x-forwarded-proto: http\n"),
            "h2 {h2}: {seen}"
        );
        for gone in [
            "203.0.113.9",
            "10.6.6.6",
            "x-forwarded-host",
            "x-real-ip",
            "forwarded:",
            "client-cert",
            "forged-id",
        ] {
            assert!(!seen.contains(gone), "h2 {h2}: {gone:?} in {seen}");
        }
    }
    let lines = log_lines(&gw.log, 3);
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.get("forwarded_client").is_none()),
        "{lines:?}"
    );
    assert_eq!(secure.hits(), 1);
}

/// curl GET `path` through `gw` with `headers`: the status and `x-gateway-error`.
fn curl_status(gw: std::net::SocketAddr, path: &str, headers: &[&str]) -> (String, String) {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-s", "-o", "/dev/null", "-H", "Host: test.local"]);
    for h in headers {
        curl.args(["-H", h]);
    }
    let out = curl
        .args(["-w", "%{http_code} %header{x-gateway-error}"])
        .arg(format!("http://{gw}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, error) = text.split_once(' ').unwrap_or((&text, ""));
    (status.to_owned(), error.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_clients_admits_only_the_listed_clients_also_behind_a_trusted_proxy() {
    let admin = Upstream::start("admin").await;
    let web = Upstream::start("web").await;
    let second = "path_prefix = \"/admin/\"\nallow_clients = [\"10.0.0.0/8\", \"::1\"]";
    let config = |trusted: &str| forwarded_config(trusted, second, &web, &admin);
    // The peer (127.0.0.1) is not a trusted proxy: it is the client, and not allowed, whatever
    // its X-Forwarded-For says.
    let gw = gateway("allow-clients", &config("[]")).await;
    let denied = ("403".to_owned(), "client_not_allowed".to_owned());
    assert_eq!(curl_status(gw.addr, "/admin/x", &[]), denied);
    assert_eq!(
        curl_status(gw.addr, "/admin/x", &["X-Forwarded-For: 10.1.2.3"]),
        denied
    );
    assert_eq!(curl_status(gw.addr, "/public", &[]).0, "200");
    assert_eq!(admin.hits(), 0);
    let line = log_lines(&gw.log, 3)[0].clone();
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["error"], "client_not_allowed", "{line}");
    assert_eq!(line["route"], "*/admin/", "{line}");

    // Behind a trusted proxy, the client it names is checked.
    let text = format!("{}\n{}", base_config(&gw.log), config(r#"["127.0.0.0/8"]"#));
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    let allowed = curl_status(gw.addr, "/admin/x", &["X-Forwarded-For: 10.1.2.3"]);
    assert_eq!(allowed.0, "200", "{allowed:?}");
    assert_eq!(admin.hits(), 1);
    // A spoofed first entry does not help: the walk stops at the first untrusted address.
    assert_eq!(
        curl_status(
            gw.addr,
            "/admin/x",
            &["X-Forwarded-For: 10.1.2.3, 203.0.113.9"]
        ),
        denied
    );
    assert_eq!(admin.hits(), 1);
}
