//! gRPC through the gateway, with `grpcio` (Python) as the server behind it (an h2c cluster)
//! and as the client in front (HTTP/2 with prior knowledge), stubs generated at test time by
//! `grpcio-tools`: unary, server-streaming, client-streaming and bidirectional calls with the
//! server's trailers; an error status from the upstream reaching the client; `grpc-timeout` as
//! the call's deadline, capped by the route's, and sent on upstream (curl sends the call, so
//! that no client-side deadline races the gateway's); a status the route retries; and a
//! gateway-made UNAVAILABLE for a refused upstream whose `grpc-message` carries the reason and
//! the kernel's evidence (privileged: the built binary with the kernel observer).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use gateway_testkit::{
    config::write_config,
    http::get,
    inprocess::{gateway, log_lines},
    peers::*,
    ports::refused_addr,
    process::GatewayProcess,
    tempdir::temp_dir,
};

/// The grpcio server, with its stubs, in its own directory.
fn grpc_server(label: &str) -> (Peer, PathBuf) {
    let dir = temp_dir(label);
    grpc_stubs(&dir);
    let server = serve_python(&dir, "grpc_server.py", GRPC_SERVER, &[]);
    (server, dir)
}

fn config(upstream: std::net::SocketAddr, route: &str) -> String {
    format!(
        "[[routes]]\npath_prefix = \"/\"\ncluster = \"grpc\"\n{route}\n\n\
         [clusters.grpc]\nendpoints = [\"{upstream}\"]\nprotocol = \"h2c\"\n"
    )
}

fn client(dir: &Path, args: &[&str]) -> serde_json::Value {
    run_python(
        dir,
        "grpc_client.py",
        GRPC_CLIENT,
        args,
        Duration::from_secs(60),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_streaming_and_bidi_calls_and_an_error_status_pass_through() {
    let (server, dir) = grpc_server("grpc-calls");
    let gw = gateway("grpc-calls", &config(server.addr(), "")).await;
    let target = gw.addr.to_string();
    let out = tokio::task::spawn_blocking(move || client(&dir, &["calls", &target]))
        .await
        .unwrap();
    assert_eq!(out["unary"], "echo a", "{out}");
    assert_eq!(
        out["trailer"], "t-a",
        "the server's trailers reached the client: {out}"
    );
    let stream = out["server_stream"].as_array().unwrap();
    assert_eq!(stream.len(), 50, "{out}");
    assert_eq!(stream[49], "item 49");
    assert_eq!(out["client_stream"], 40, "{out}");
    let bidi = out["bidi"].as_array().unwrap();
    assert_eq!(bidi.len(), 30, "{out}");
    assert_eq!(bidi[0], "re 0");
    assert_eq!(out["fail"]["code"], "NOT_FOUND", "{out}");
    assert_eq!(out["fail"]["details"], "no such thing: x", "{out}");
    // Every call went up as HTTP/2 to the h2c cluster and was logged with its status.
    let lines = log_lines(&gw.log, 5);
    for l in &lines {
        assert_eq!(l["version"], "HTTP/2", "{l}");
        assert_eq!(l["upstream_status"], 200, "{l}");
    }
    let statuses: Vec<_> = lines.iter().map(|l| l["grpc_status"].clone()).collect();
    assert!(
        statuses.contains(&serde_json::json!(5)),
        "NOT_FOUND logged: {statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == serde_json::json!(0))
            .count(),
        4,
        "{statuses:?}"
    );
}

/// An upstream that allows one stream per connection (grpcio with `grpc.max_concurrent_streams
/// = 1`, which it says in its SETTINGS): four calls at once each get a connection of their
/// own, and all four are answered within their deadline. Before, they shared one connection,
/// where h2 queued the three above the limit unseen: answered one after another, the last two
/// ran out of their deadline (`DEADLINE_EXCEEDED`), and the endpoint was called slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_allows_one_stream_per_connection_gets_a_connection_per_call() {
    let dir = temp_dir("grpc-one-stream");
    grpc_stubs(&dir);
    let server = serve_python(&dir, "grpc_server.py", GRPC_SERVER, &["1"]);
    let gw = gateway("grpc-one-stream", &config(server.addr(), "")).await;
    let target = gw.addr.to_string();
    let start = Instant::now();
    let out =
        tokio::task::spawn_blocking(move || client(&dir, &["slow", &target, "4", "700", "2.0"]))
            .await
            .unwrap();
    let took = start.elapsed();
    for r in out["results"].as_array().unwrap() {
        assert_eq!(r["ok"], "slept", "{out} after {took:?}");
    }
    let lines = log_lines(&gw.log, 4);
    for l in &lines {
        assert_eq!(l["grpc_status"], 0, "{l}");
        assert_eq!(l["retries"], 0, "{l}");
    }
}

/// One gRPC call with curl over HTTP/2 with prior knowledge: `Slow(n ms)` with the given
/// `grpc-timeout`; the response head and trailers as text, and how long it took.
fn curl_slow(
    addr: std::net::SocketAddr,
    dir: &Path,
    slow_ms: u32,
    grpc_timeout: &str,
) -> (String, Duration) {
    // gRPC framing: uncompressed flag, 4-byte length, then `Count { n = slow_ms }` (field 1,
    // varint).
    let mut msg = vec![0x08];
    let mut n = slow_ms;
    while n >= 0x80 {
        msg.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    msg.push(n as u8);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let body = dir.join("slow.bin");
    std::fs::write(&body, frame).unwrap();
    curl_slow_call(addr, grpc_timeout, Some(&body))
}

/// A call to `Slow` with curl over HTTP/2 with prior knowledge, with the given `grpc-timeout`
/// and the message in `body` (none: a POST without a body); the response head and trailers as
/// text, and how long it took.
fn curl_slow_call(
    addr: std::net::SocketAddr,
    grpc_timeout: &str,
    body: Option<&Path>,
) -> (String, Duration) {
    let start = Instant::now();
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-D",
        "-",
    ])
    .args(["--max-time", "20", "-X", "POST"])
    .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
    .args(["-H", &format!("grpc-timeout: {grpc_timeout}")]);
    if let Some(body) = body {
        curl.arg("--data-binary")
            .arg(format!("@{}", body.display()));
    }
    let out = curl
        .arg(format!("http://{addr}/gwtest.Echo/Slow"))
        .output()
        .expect("curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        start.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_the_calls_deadline_capped_by_the_routes() {
    let (server, dir) = grpc_server("grpc-deadline");
    let route = "[routes.timeouts]\nrequest_timeout_ms = 1200";
    let gw = gateway("grpc-deadline", &config(server.addr(), route)).await;
    let addr = gw.addr;
    // The call's own 300 ms, shorter than the route's 1200 ms: DEADLINE_EXCEEDED from the
    // gateway at 300 ms, saying so.
    let d = dir.clone();
    let (head, took) = tokio::task::spawn_blocking(move || curl_slow(addr, &d, 3000, "300m"))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(head.contains("grpc-status: 4"), "{head}");
    assert!(
        head.contains("grpc-timeout"),
        "the message names the call's deadline: {head}"
    );
    // Under the route's 1200 ms, which would be the answer had the call's own deadline been
    // ignored; the rest is room for a curl process on a loaded machine.
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1100),
        "{took:?}"
    );
    // 10 s asked, the route allows 1200 ms: capped.
    let d = dir.clone();
    let (head, took) = tokio::task::spawn_blocking(move || curl_slow(addr, &d, 3000, "10S"))
        .await
        .unwrap();
    assert!(head.contains("grpc-status: 4"), "{head}");
    assert!(head.contains("request timeout of 1200 ms"), "{head}");
    // Well under the upstream's 3 s, which would be the answer had nothing capped it.
    assert!(
        took >= Duration::from_millis(1150) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // The upstream is told the client's own deadline, what is left of its 10 s: the route's
    // 1200 ms is the gateway's, from the end of the client's stream (a client stream may end
    // long after it began), which the gateway enforces itself, cancelling the upstream's
    // stream.
    let (target, d) = (addr.to_string(), dir.clone());
    let out =
        tokio::task::spawn_blocking(move || client(&d, &["one", &target, "Remaining", "x", "10"]))
            .await
            .unwrap();
    // With the gateway's 50 ms margin.
    let left: u64 = out["ok"].as_str().unwrap().parse().unwrap();
    assert!(
        (9000..=10_050).contains(&left),
        "the upstream had {left} ms left: {out}"
    );
    // A value that is no deadline goes nowhere: the upstream is told none, not the route's
    // timeout (curl: the header as written).
    let frame = [0u8, 0, 0, 0, 3, 0x0a, 0x01, b'x'];
    let body = dir.join("remaining.bin");
    std::fs::write(&body, frame).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--max-time", "20"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", "grpc-timeout: abc", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("http://{addr}/gwtest.Echo/Remaining"))
        .output()
        .expect("curl");
    // grpcio's server reports no deadline as `None` or as one of centuries.
    let answer = String::from_utf8_lossy(&out.stdout);
    let digits = answer
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .count();
    assert!(
        answer.ends_with("none") || digits > 12,
        "the upstream saw a deadline: {answer:?}"
    );
    // A call past its deadline on arrival is answered at once, and goes nowhere: before, the
    // gateway sent it upstream and then cancelled it. Without a body: an answer that comes
    // before the body is followed by hyper's RST_STREAM (NO_ERROR), which curl 7.88 takes for
    // an error (92) and prints nothing (the suite, once).
    let (head, took) = tokio::task::spawn_blocking(move || curl_slow_call(addr, "0S", None))
        .await
        .unwrap();
    assert!(head.contains("grpc-status: 4"), "{head}");
    assert!(head.contains("grpc-timeout"), "{head}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    let lines = log_lines(&gw.log, 5);
    assert_eq!(lines[0]["error"], "request_timeout", "{}", lines[0]);
    assert_eq!(lines[0]["grpc_status"], 4, "{}", lines[0]);
    assert_eq!(lines[4]["error"], "request_timeout", "{}", lines[4]);
    assert!(
        lines[4]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("deadline had passed on arrival")),
        "{}",
        lines[4]
    );
    assert!(
        lines[4]["endpoints"].as_array().is_none_or(Vec::is_empty),
        "a call past its deadline was sent upstream: {}",
        lines[4]
    );
}

/// A client-streaming call whose messages keep coming is not cut by the route's request
/// timeout, which runs from the client's last message: 12 messages 200 ms apart take 2.2 s
/// against the route's 1 s, each message a few bytes (a streaming call has no minimum rate).
/// Before, the gateway cut it at 1 s while data flowed; and a client deadline longer than the
/// route's went upstream capped at the route's 1 s from the arrival, which the upstream then
/// enforced with a bare `DEADLINE_EXCEEDED`. With no client deadline, and with 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stream_longer_than_the_request_timeout_completes() {
    let (server, dir) = grpc_server("grpc-long-stream");
    let route = "[routes.timeouts]\nrequest_timeout_ms = 1000";
    let gw = gateway("grpc-long-stream", &config(server.addr(), route)).await;
    let target = gw.addr.to_string();
    for deadline in ["none", "20"] {
        let (dir, target) = (dir.clone(), target.clone());
        let out = tokio::task::spawn_blocking(move || {
            client(&dir, &["stream", &target, "12", "200", deadline])
        })
        .await
        .unwrap();
        assert_eq!(out["ok"], 12, "client deadline {deadline}: {out}");
    }
    for l in log_lines(&gw.log, 2) {
        assert_eq!(l["status"], 200, "{l}");
        assert!(l["total_ms"].as_f64().unwrap() > 2000.0, "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_the_route_lists_is_retried_and_others_are_not() {
    let (server, dir) = grpc_server("grpc-retry");
    let cfg = format!(
        "[[routes]]\npath_prefix = \"/\"\nheaders = [{{ name = \"x-retry\", value = \"yes\" }}]\ncluster = \"grpc\"\n\
         [routes.retry]\ngrpc_status_codes = [\"UNAVAILABLE\"]\n\n{}",
        config(server.addr(), "")
    );
    let gw = gateway("grpc-retry", &cfg).await;
    let target = gw.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        // The route that does not retry: the first call of a text is UNAVAILABLE.
        let plain = client(&dir, &["one", &target, "Flaky", "k1", "10"]);
        (plain, dir)
    })
    .await
    .unwrap();
    let (plain, dir) = out;
    assert_eq!(plain["code"], "UNAVAILABLE", "{plain}");
    assert_eq!(plain["details"], "warming up", "{plain}");
    // The same call on the route that retries UNAVAILABLE: the retry succeeds. The header
    // that picks the route is sent as call metadata by a small wrapper.
    let script = GRPC_CLIENT.replace(
        "r = getattr(stub, method)(pb.Msg(text=text), timeout=timeout)",
        "r = getattr(stub, method)(pb.Msg(text=text), timeout=timeout, metadata=((\"x-retry\", \"yes\"),))",
    );
    let target = gw.addr.to_string();
    let retried = tokio::task::spawn_blocking(move || {
        run_python(
            &dir,
            "grpc_client_retry.py",
            &script,
            &["one", &target, "Flaky", "k2", "10"],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert_eq!(retried["ok"], "ok k2", "{retried}");
    let lines = log_lines(&gw.log, 2);
    let l = lines
        .iter()
        .find(|l| l["retries"] == 1)
        .expect("the retried call's line");
    assert_eq!(l["grpc_status"], 0, "{l}");
    assert_eq!(l["attempts"], 2, "{l}");
    let admin = gw.handle.admin_addr().unwrap();
    let m = get(&gateway_testkit::http::client(), admin, "/metrics")
        .await
        .body;
    assert!(
        m.contains("gateway_retries_total{cluster=\"grpc\",reason=\"grpc_status\"} 1"),
        "{m}"
    );
}

/// A call whose message is over the route's `max_request_body_bytes` is the client's
/// `RESOURCE_EXHAUSTED` (`request_body_too_large`), not the upstream's `UNAVAILABLE`: hyper's HTTP/2 client drops
/// the body's error and resets the stream, which read as the upstream's reset (a black-box
/// audit: `UNAVAILABLE: upstream_reset`, a status clients retry, for a call that can never
/// succeed). The access log says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_body_limit_is_resource_exhausted_not_the_upstreams_fault() {
    let (server, dir) = grpc_server("grpc-limit");
    let gw = gateway(
        "grpc-limit",
        &config(server.addr(), "max_request_body_bytes = 1000"),
    )
    .await;
    let target = gw.addr.to_string();
    let big = "x".repeat(5000);
    let (small, over) = tokio::task::spawn_blocking(move || {
        (
            client(&dir, &["one", &target, "Unary", "small", "10"]),
            client(&dir, &["one", &target, "Unary", &big, "10"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(small["ok"], "echo small", "{small}");
    assert_eq!(over["code"], "RESOURCE_EXHAUSTED", "{over}");
    assert!(
        over["details"]
            .as_str()
            .is_some_and(|d| d.contains("exceeds 1000 bytes")),
        "{over}"
    );
    let lines = log_lines(&gw.log, 2);
    let refused = lines
        .iter()
        .find(|l| l["error"] == "request_body_too_large")
        .unwrap_or_else(|| panic!("the call's line: {lines:?}"));
    // A gRPC answer is HTTP 200 with its status in the trailers.
    assert_eq!(refused["grpc_status"], 8, "{refused}");
}

#[test]
fn a_refused_upstream_is_unavailable_with_the_kernels_evidence_privileged() {
    gateway_testkit::root::require_root();
    let dir = temp_dir("grpc-refused");
    grpc_stubs(&dir);
    let refused = refused_addr();
    let cfg = write_config(
        &dir,
        &format!(
            "{}\n[clusters.grpc.retry]\nmax_retries = 0\n[observer]\nmode = \"kernel\"\ncgroup = \"gateway-grpc-{{pid}}\"\n",
            config(refused, "")
        ),
    );
    let gw = GatewayProcess::spawn(gateway_testkit::gateway_bin!().run(&cfg));
    let out = client(&dir, &["one", &gw.addr.to_string(), "Unary", "x", "10"]);
    assert_eq!(out["code"], "UNAVAILABLE", "{out}");
    let details = out["details"].as_str().unwrap();
    assert!(
        details.starts_with(&format!("connect_refused: connection refused by {refused}")),
        "{details}"
    );
    assert!(
        details.contains("kernel: refused, 1 SYN sent, RST received"),
        "{details}"
    );
}
