//! WebSocket (HTTP/1.1 `Upgrade`) through the gateway, with Python's `websockets` as both the
//! server behind it and the client in front: the `101` comes back, messages go both ways
//! (text, and 1 MiB binary), the upgrade request reaches the upstream with `X-Forwarded-For`
//! and the request ID; an idle upgraded connection is closed at `upgrade_idle_timeout_ms`; an
//! open one holds the drain and is closed when the grace period runs out; the upgrade's
//! connect is an ordinary attempt (a refused endpoint is retried elsewhere, with its
//! evidence in the log); an open one keeps its place in `max_client_connections` and its
//! worker's count until it ends, and is no request in flight to its endpoint. Each counted in `gateway_upgrades_total` and the access log.
//!
//! Unprivileged: loopback only.

use std::time::{Duration, Instant};

use gateway_testkit::{
    http::{client, get, raw_exchange},
    inprocess::{InProcess, gateway, log_lines},
    peers::*,
    ports::refused_addr,
    tempdir::temp_dir,
    upstream::Upstream,
};

fn config(endpoints: &[std::net::SocketAddr], route_extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[routes]]\npath_prefix = \"/\"\ncluster = \"ws\"\n{route_extra}\n\n[clusters.ws]\nendpoints = [{}]\n",
        eps.join(", ")
    )
}

/// `name` from the admin's `/metrics` with these labels, summed (0 when absent).
async fn metric(gw: &InProcess, name: &str, labels: &[&str]) -> f64 {
    let admin = gw.handle.admin_addr().expect("admin listener");
    let got = get(&client(), admin, "/metrics").await;
    got.body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echo_goes_both_ways_through_the_gateway() {
    let server = serve_python(&temp_dir("ws-peer"), "ws_server.py", WS_ECHO_SERVER, &[]);
    let gw = gateway("ws-echo", &config(&[server.addr()], "")).await;
    let url = format!("ws://{}/chat/room1", gw.addr);
    let dir = gw.dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            &dir,
            "ws_client.py",
            WS_CLIENT,
            &["echo", &url, "200"],
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap();
    assert_eq!(out["status"], 101, "{out}");
    assert_eq!(out["echoed"], 200, "{out}");
    assert_eq!(out["big_ok"], true, "{out}");
    assert_eq!(out["headers"]["upgrade"], "websocket", "{out}");
    let request_id = out["headers"]["x-request-id"]
        .as_str()
        .expect("a request ID came back");
    let seen = &out["seen"];
    assert_eq!(seen["path"], "/chat/room1", "{out}");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{out}");
    assert_eq!(
        seen["x-request-id"], request_id,
        "the upstream saw the same ID"
    );
    assert!(
        seen["via"].as_str().unwrap_or("").contains("gateway"),
        "{out}"
    );
    // One log line, at the end, with the bytes each way and how it ended.
    let lines = log_lines(&gw.log, 1);
    let l = &lines[0];
    assert_eq!(l["status"], 101, "{l}");
    // The client started the closing handshake; the server then closes the TCP connection
    // first (RFC 6455 section 7.1.1), which is what the tunnel sees.
    assert_eq!(l["tunnel"], "upstream_closed", "{l}");
    assert_eq!(l["request_id"], request_id, "{l}");
    // 200 short messages and 1 MiB each way, with frame headers (and the client's masks).
    for key in ["request_bytes", "bytes"] {
        let n = l[key].as_u64().unwrap();
        assert!(
            (1 << 20..(1 << 20) + 64 * 1024).contains(&n),
            "{key} = {n}: {l}"
        );
    }
    assert_eq!(
        metric(&gw, "gateway_upgrades_total", &["end=\"upstream_closed\""]).await,
        1.0
    );
    assert_eq!(
        metric(&gw, "gateway_upgraded_connections", &["cluster=\"ws\""]).await,
        0.0
    );
    let up = metric(
        &gw,
        "gateway_upgrade_bytes_total",
        &["direction=\"to_upstream\""],
    )
    .await;
    assert_eq!(up, l["request_bytes"].as_f64().unwrap());
}

/// Opens a WebSocket through the gateway with the `hold` client; returns it running, once the
/// tunnel is up (the client said `open`).
fn hold(gw: &InProcess) -> std::process::Child {
    let script = gw.dir.join("ws_hold.py");
    std::fs::write(&script, WS_CLIENT).unwrap();
    let url = format!("ws://{}/hold", gw.addr);
    let err = gw.dir.join("ws_hold.err");
    let child = std::process::Command::new(python())
        .arg(&script)
        .args(["hold", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("open")
    {
        assert!(
            Instant::now() < deadline,
            "the WebSocket did not open: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn held(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_at_the_routes_idle_limit() {
    // Long enough that the gauge is read before it runs out, and that the close is told from
    // one late by a busy machine (1 s of slack below), on a loaded CI host too.
    const IDLE: Duration = Duration::from_millis(1500);
    let server = serve_python(&temp_dir("ws-peer"), "ws_server.py", WS_ECHO_SERVER, &[]);
    let route = format!(
        "[routes.timeouts]\nupgrade_idle_timeout_ms = {}",
        IDLE.as_millis()
    );
    let gw = gateway("ws-idle", &config(&[server.addr()], &route)).await;
    let child = tokio::task::block_in_place(|| hold(&gw));
    assert_eq!(
        metric(&gw, "gateway_upgraded_connections", &["cluster=\"ws\""]).await,
        1.0
    );
    let out = tokio::task::spawn_blocking(move || held(child))
        .await
        .unwrap();
    let ms = out["held_ms"].as_f64().unwrap();
    // Timed by the client from before its last message, so at least the limit; not much more.
    assert!(
        (IDLE.as_millis() as f64..IDLE.as_millis() as f64 + 1000.0).contains(&ms),
        "closed after {ms} ms, limit {IDLE:?}: {out}"
    );
    let l = &log_lines(&gw.log, 1)[0];
    assert_eq!(l["tunnel"], "idle_timeout", "{l}");
    assert_eq!(
        metric(&gw, "gateway_upgrades_total", &["end=\"idle_timeout\""]).await,
        1.0
    );
    assert_eq!(
        metric(&gw, "gateway_upgraded_connections", &["cluster=\"ws\""]).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_holds_the_drain_until_the_grace_runs_out() {
    const GRACE: Duration = Duration::from_millis(800);
    let server = serve_python(&temp_dir("ws-peer"), "ws_server.py", WS_ECHO_SERVER, &[]);
    let gw = gateway("ws-drain", &config(&[server.addr()], "")).await;
    let child = tokio::task::block_in_place(|| hold(&gw));
    let InProcess { handle, log, .. } = gw;
    let report = handle.shutdown(GRACE).await;
    assert!(report.forced, "the tunnel was still open: {report:?}");
    assert!(
        report.elapsed >= GRACE && report.elapsed < GRACE + Duration::from_millis(1500),
        "{report:?}"
    );
    let out = tokio::task::spawn_blocking(move || held(child))
        .await
        .unwrap();
    let ms = out["held_ms"].as_f64().unwrap();
    assert!(
        ms >= GRACE.as_millis() as f64 * 0.9,
        "closed after {ms} ms: {out}"
    );
    let l = &log_lines(&log, 1)[0];
    assert_eq!(l["tunnel"], "shutdown", "{l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_keeps_its_place_in_max_client_connections() {
    // Once upgraded, the client's socket belongs to the tunnel, not to hyper's connection:
    // the connection must still count in `max_client_connections` (it holds a descriptor and
    // buffers) and in its worker's count (`connection_balance`) until the tunnel ends.
    let server = serve_python(&temp_dir("ws-peer"), "ws_server.py", WS_ECHO_SERVER, &[]);
    let cfg = "[router.downstream]\nmax_client_connections = 2\n".to_string()
        + &config(&[server.addr()], "");
    let gw = gateway("ws-count", &cfg).await;
    let mut open: Vec<_> = (0..2)
        .map(|_| tokio::task::block_in_place(|| hold(&gw)))
        .collect();
    assert_eq!(
        metric(&gw, "gateway_upgraded_connections", &["cluster=\"ws\""]).await,
        2.0
    );
    assert_eq!(metric(&gw, "gateway_client_connections", &[]).await, 2.0);
    assert_eq!(
        metric(&gw, "gateway_worker_client_connections", &[]).await,
        2.0
    );
    let third = raw_exchange(
        gw.addr,
        b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        third.starts_with("HTTP/1.1 503") && third.contains("max_client_connections"),
        "two tunnels hold both places: {third}"
    );
    // A tunnel that ends gives its place back.
    let mut first = open.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&gw, "gateway_client_connections", &[]).await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the ended tunnel's place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&gw, "gateway_worker_client_connections", &[]).await,
        1.0
    );
    open.push(tokio::task::block_in_place(|| hold(&gw)));
    for mut c in open {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

/// A tunnel is no request in flight: its endpoint's `in_flight` (which `least_request` and
/// `peak_ewma` balance by) is back to 0 once the `101` is through, while the tunnel shows in
/// `gateway_upgraded_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_is_no_request_in_flight() {
    let server = serve_python(&temp_dir("ws-peer"), "ws_server.py", WS_ECHO_SERVER, &[]);
    let gw = gateway("ws-in-flight", &config(&[server.addr()], "")).await;
    let mut child = tokio::task::block_in_place(|| hold(&gw));
    assert_eq!(
        metric(&gw, "gateway_upgraded_connections", &["cluster=\"ws\""]).await,
        1.0
    );
    let admin = gw.handle.admin_addr().expect("admin listener");
    let addr = server.addr();
    let doc = tokio::task::block_in_place(|| gateway_testkit::admin::status(admin));
    let ep = gateway_testkit::admin::endpoint(&doc, "ws", addr);
    assert_eq!(ep["in_flight"], 0, "{ep}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrades_connect_is_an_attempt_like_any_other() {
    // A refused endpoint beside the server: the upgrade's connect goes through the same
    // checkout and connect as any request, so the refusal is retried on the other endpoint,
    // with its reason and cookie in the log.
    let server = serve_python(&temp_dir("ws-peer"), "ws_server.py", WS_ECHO_SERVER, &[]);
    let refused = refused_addr();
    // No measuring probe (it would find the refusal before a request does), and no ejection
    // (so that the refusal is a request's).
    let cfg = config(&[refused, server.addr()], "")
        + "[clusters.ws.timeouts]\nadaptive_connect_deadline = false\n\
           [clusters.ws.health]\nmax_ejected_percent = 0\n";
    let gw = gateway("ws-retry", &cfg).await;
    let dir = gw.dir.clone();
    let addr = gw.addr;
    let outs = tokio::task::spawn_blocking(move || {
        (0..2)
            .map(|_| {
                let url = format!("ws://{addr}/r");
                run_python(
                    &dir,
                    "ws_client.py",
                    WS_CLIENT,
                    &["echo", &url, "3"],
                    Duration::from_secs(30),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for out in &outs {
        assert_eq!(out["status"], 101, "{out}");
        assert_eq!(out["echoed"], 3, "{out}");
    }
    let lines = log_lines(&gw.log, 2);
    let retried: Vec<_> = lines
        .iter()
        .filter(|l| l["attempt_errors"][0] == "connect_refused")
        .collect();
    assert!(
        !retried.is_empty(),
        "round robin sent one of two to the refused endpoint: {lines:?}"
    );
    for l in retried {
        assert_eq!(l["endpoints"][0], refused.to_string(), "{l}");
        assert_eq!(l["endpoints"][1], server.addr().to_string(), "{l}");
        assert_eq!(l["status"], 101, "{l}");
        assert_eq!(l["retries"], 1, "{l}");
        assert!(
            l["cookies"].as_array().unwrap().len() == 2,
            "each attempt's socket: {l}"
        );
    }
}

/// A route's `upgrades` replaces its cluster's: `[]` keeps a route from ever becoming a
/// tunnel (the upgrade is dropped and the request answered as a plain one), while the
/// cluster's other routes still tunnel WebSocket. Python's `websockets` on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_upgrades_is_never_a_tunnel() {
    let server = serve_python(&temp_dir("ws-peer"), "ws_server.py", WS_ECHO_SERVER, &[]);
    let gw = gateway(
        "ws-route",
        &format!(
            "[[routes]]\npath_prefix = \"/api/\"\ncluster = \"ws\"\nupgrades = []\n\n{}",
            config(&[server.addr()], "")
        ),
    )
    .await;
    let dir = gw.dir.clone();
    let status = |path: &str| {
        let (dir, url) = (dir.clone(), format!("ws://{}{path}", gw.addr));
        tokio::task::spawn_blocking(move || {
            run_python(
                &dir,
                "ws_client.py",
                WS_CLIENT,
                &["status", &url],
                Duration::from_secs(30),
            )
        })
    };
    let plain = status("/api/x").await.unwrap();
    // The websockets server's answer to a GET that asks for no upgrade.
    assert_eq!(plain["status"], 426, "{plain}");
    let tunnel = status("/chat").await.unwrap();
    assert_eq!(tunnel["status"], 101, "{tunnel}");
    let lines = log_lines(&gw.log, 2);
    let by_path = |p: &str| lines.iter().find(|l| l["path"] == p).unwrap().clone();
    let (api, chat) = (by_path("/api/x"), by_path("/chat"));
    assert_eq!(
        (api["status"].as_u64(), api["route"].as_str()),
        (Some(426), Some("*/api/"))
    );
    assert!(
        api.get("tunnel").is_none_or(|t| t.is_null() || t == "-"),
        "{api}"
    );
    assert_eq!(chat["status"], 101, "{chat}");
    assert_eq!(
        metric(&gw, "gateway_upgrades_total", &[]).await,
        1.0,
        "only /chat became a tunnel"
    );
}

#[tokio::test]
async fn an_upgrade_to_an_http2_cluster_is_refused_with_501() {
    let up = Upstream::start("h2").await;
    let gw = gateway(
        "ws-h2",
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\nprotocol = \"h2c\"\n",
            up.addr
        ),
    )
    .await;
    let reply = raw_exchange(
        gw.addr,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
    assert!(
        reply.contains("x-gateway-error: upgrade_unsupported"),
        "{reply}"
    );
    assert!(reply.contains("RFC 8441"), "{reply}");
    assert_eq!(up.hits(), 0);
}
