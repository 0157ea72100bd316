//! HTTP/2 to upstreams, with nginx as the h2c upstream and `h2load` (nghttp2) as the client:
//! requests are multiplexed over a few upstream connections (within `max_concurrent_streams`),
//! every one of them arrives as HTTP/2; and when the upstream sends GOAWAY mid-load (nginx's
//! `keepalive_requests`, which ends each connection after that many requests), the streams it
//! did not process are retried on another connection, so that no idempotent request fails.
//! Connections the load no longer needs are closed once idle for `idle_timeout_ms`.
//!
//! Unprivileged: loopback only.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use gateway_testkit::{
    http::{client, get},
    inprocess::{InProcess, gateway, log_lines},
    peers::*,
    tempdir::temp_dir,
};

fn config(upstream: std::net::SocketAddr, streams: u32) -> String {
    format!(
        "[router.upstream]\nendpoints = [\"{upstream}\"]\nprotocol = \"h2c\"\n\
         [router.upstream.limits]\nmax_concurrent_streams = {streams}\n"
    )
}

/// Established TCP connections to `addr` (the gateway's to its upstream), from `ss`.
fn established_to(addr: std::net::SocketAddr) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", "dst"])
        .arg(addr.to_string())
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// nginx's log lines: (protocol, connection number, status).
/// The upstream's log lines, once it has at least `at_least` (see `peers::settled_log`).
fn upstream_lines(path: &std::path::Path, at_least: usize) -> Vec<(String, u64, u16)> {
    tokio::task::block_in_place(|| gateway_testkit::peers::settled_log(path, at_least))
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

async fn metrics(gw: &InProcess) -> String {
    get(&client(), gw.handle.admin_addr().unwrap(), "/metrics")
        .await
        .body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_through_an_h2c_upstream_is_multiplexed() {
    const STREAMS: u32 = 32;
    let dir = temp_dir("h2c-up");
    // nginx ends an HTTP/2 connection after `keepalive_requests` (1000 by default): more
    // than this run, so that the connections counted are the gateway's choice alone.
    let nginx = nginx_h2c(&dir, "keepalive_requests 100000;");
    const IDLE: Duration = Duration::from_millis(1500);
    let cfg = config(nginx.addr, STREAMS)
        + &format!(
            "[router.upstream.timeouts]\nidle_timeout_ms = {}\n",
            IDLE.as_millis()
        );
    let gw = gateway("h2c-load", &cfg).await;
    let url = format!("http://{}/load", gw.addr);
    // 8 client connections × 16 streams: 128 requests in flight at once.
    let r =
        tokio::task::spawn_blocking(move || h2load(&url, &["-n", "20000", "-c", "8", "-m", "16"]))
            .await
            .unwrap();
    assert_eq!(
        (r.succeeded, r.failed, r.errored),
        (20000, 0, 0),
        "{}",
        r.text
    );
    assert_eq!(r.status_2xx, 20000, "{}", r.text);
    let lines = upstream_lines(&nginx.log, 20000);
    assert_eq!(lines.len(), 20000);
    assert!(
        lines.iter().all(|(p, _, s)| p == "HTTP/2.0" && *s == 200),
        "every request went up as HTTP/2"
    );
    let conns: BTreeSet<u64> = lines.iter().map(|(_, c, _)| *c).collect();
    // 128 in flight at 32 streams per connection: at least 4 connections, and not one per
    // request (nor per client connection and stream).
    assert!(
        (4..=12).contains(&conns.len()),
        "{} upstream connections for 128 requests in flight: {conns:?}",
        conns.len()
    );
    // Idle now: closed after `idle_timeout_ms` (swept every second), not kept for nginx's
    // own idle timeout (minutes).
    let open = established_to(nginx.addr);
    assert!(open >= 4, "{open} connections open right after the load");
    let start = Instant::now();
    while established_to(nginx.addr) > 0 {
        assert!(
            start.elapsed() < IDLE * 4,
            "{} connections still open {:?} after the load",
            established_to(nginx.addr),
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(gw);
}

/// `nghttp -nv` (nghttp2's client) with `urls` on one connection: each response's
/// `x-request-id` line as nghttp2 decoded it (`(stream_id=N, sensitive) x-request-id: ID`
/// when it came as a never-indexed literal).
fn nghttp_ids(urls: &[String], header: Option<&str>) -> Vec<String> {
    let mut cmd = std::process::Command::new("nghttp");
    cmd.arg("-nv");
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd.args(urls).output().expect("nghttp (nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    text.lines()
        .filter(|l| l.contains("recv (stream_id=") && l.contains(") x-request-id: "))
        .map(|l| l.split_once("recv ").unwrap().1.to_owned())
        .collect()
}

/// Request IDs cross HTTP/2 on both sides, many on one connection each way: from nginx's
/// log, the ID each request brought upstream; from nghttp2's client, the same ID back, sent
/// as a never-indexed literal (an ID is unique to its request: indexed, it would only churn
/// the HPACK tables, see `request_id::assign`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_cross_http2_both_ways_unindexed() {
    const N: usize = 30;
    let dir = temp_dir("h2c-ids");
    let nginx = nginx_h2c(&dir, "keepalive_requests 100000;");
    let gw = gateway("h2c-ids", &config(nginx.addr, 32)).await;
    let urls: Vec<String> = (0..N)
        .map(|i| format!("http://{}/ids/{i}", gw.addr))
        .collect();
    let generated = {
        let urls = urls.clone();
        tokio::task::spawn_blocking(move || nghttp_ids(&urls, None))
            .await
            .unwrap()
    };
    let kept = tokio::task::spawn_blocking(move || {
        nghttp_ids(&urls[..5], Some("x-request-id: client-id-7"))
    })
    .await
    .unwrap();
    assert_eq!(
        (generated.len(), kept.len()),
        (N, 5),
        "{generated:?} {kept:?}"
    );
    for line in generated.iter().chain(&kept) {
        assert!(line.contains(", sensitive)"), "never indexed: {line}");
    }
    let ids: Vec<&str> = generated
        .iter()
        .map(|l| l.rsplit_once(' ').unwrap().1)
        .collect();
    assert!(ids.iter().all(|id| id.len() == 36), "{ids:?}");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), N, "each its own");
    assert!(kept.iter().all(|l| l.ends_with(" client-id-7")), "{kept:?}");
    // nginx's log: protocol, connection, status, URI, the ID it received.
    let log = std::fs::read_to_string(&nginx.log).unwrap();
    let upstream: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("HTTP/2.0 ") && l.contains(" 200 /ids/"))
        .map(|l| l.rsplit_once(' ').unwrap().1)
        .collect();
    assert_eq!(upstream.len(), N + 5, "{log}");
    for id in ids.iter().copied().chain(["client-id-7"]) {
        assert!(upstream.contains(&id), "nginx got {id}: {upstream:?}");
    }
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_mid_load_fails_no_idempotent_request() {
    // nginx ends each HTTP/2 connection with GOAWAY after 100 requests: with 128 requests
    // in flight, streams above each GOAWAY's last-stream-id are refused unprocessed.
    goaway_load("h2c-goaway", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_every_ten_requests_fails_no_request() {
    // The harsh end: nginx ends each connection after 10 requests while the gateway may put
    // 64 streams on it, so until the gateway learns the limit most streams on a connection
    // are refused, and so are many of their retries. Each must get through, exactly once,
    // without the gateway opening a connection per refused stream (nginx has 1,024
    // worker_connections here, and closes new connections unanswered beyond that).
    goaway_load("h2c-goaway10", 10).await;
}

/// 20,000 GETs through h2load (8 connections × 16 streams) to nginx, which sends GOAWAY after
/// `keepalive` requests on each connection: every one answered 200 and processed by nginx once,
/// with refused streams retried, and the limit learned (`upstream::lifetime`).
async fn goaway_load(name: &str, keepalive: u32) {
    let dir = temp_dir(name);
    let nginx = nginx_h2c(&dir, &format!("keepalive_requests {keepalive};"));
    let gw = gateway(name, &config(nginx.addr, 64)).await;
    let url = format!("http://{}/goaway", gw.addr);
    let r =
        tokio::task::spawn_blocking(move || h2load(&url, &["-n", "20000", "-c", "8", "-m", "16"]))
            .await
            .unwrap();
    let failed: Vec<serde_json::Value> = log_lines(&gw.log, 20000)
        .into_iter()
        .filter(|l| l["status"] != 200)
        .collect();
    assert_eq!(failed.len(), 0, "first failed: {:?}", failed.first());
    assert_eq!(
        (r.succeeded, r.failed, r.errored),
        (20000, 0, 0),
        "{}",
        r.text
    );
    assert_eq!(r.status_2xx, 20000, "{}", r.text);
    let lines = upstream_lines(&nginx.log, 20000);
    let conns: BTreeSet<u64> = lines.iter().map(|(_, c, _)| *c).collect();
    // Once the gateway has learned the upstream's limit (two connections), each connection
    // carries that many requests: hardly more connections than the minimum. Before it learned
    // limits, with 10, it held about 1,000 connections at once and most carried one or two
    // requests, until nginx ran out of worker_connections and refused new ones outright.
    let least = 20000 / keepalive as usize;
    assert!(
        (least..=least + least / 10).contains(&conns.len()),
        "nginx closed a connection every {keepalive} requests: {} connections",
        conns.len()
    );
    assert_eq!(lines.len(), 20000, "each request processed once");
    let m = metrics(&gw).await;
    let refused: f64 = m
        .lines()
        .find(|l| {
            l.starts_with("gateway_retries_total{") && l.contains("reason=\"refused_stream\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(refused > 0.0, "streams refused by GOAWAY were retried: {m}");
    // The limit learned is shown: in `/status` at once, in the metrics at their next refresh.
    let status = get(&client(), gw.handle.admin_addr().unwrap(), "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(
        status["clusters"][0]["endpoints"][0]["h2_requests_per_connection"], keepalive,
        "{status}"
    );
    let page = get(&client(), gw.handle.admin_addr().unwrap(), "/").await;
    assert!(
        page.body
            .contains(&format!("data-h2-limit=\"{keepalive}\"")),
        "the status page shows the limit: {}",
        page.body
    );
    let gauge = format!(
        "gateway_upstream_h2_requests_per_connection{{cluster=\"default\",endpoint=\"{}\"}} {keepalive}",
        nginx.addr
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut m = metrics(&gw).await;
    while !m.lines().any(|l| l == gauge) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = metrics(&gw).await;
    }
    assert!(m.lines().any(|l| l == gauge), "{gauge} in {m}");
    eprintln!(
        "{name}: {refused} refused streams retried over {} connections",
        conns.len()
    );
}

/// nginx with TLS (a certificate for `up.test` from a CA of the test's own), HTTP/2 offered by
/// ALPN when `h2`; logs the protocol each request came in with.
fn nginx_tls(dir: &std::path::Path, h2: bool) -> (NginxTls, std::path::PathBuf) {
    nginx_tls_with(dir, h2, "return 200 \"ok\\n\";")
}

/// [`nginx_tls`] with `location` as what its `location /` does.
fn nginx_tls_with(
    dir: &std::path::Path,
    h2: bool,
    location: &str,
) -> (NginxTls, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let leaf = CertificateParams::new(vec!["up.test".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let (c, k) = (dir.join("up.pem"), dir.join("up.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let port = gateway_testkit::ports::free_port();
    let log = dir.join("tls-access.log");
    let conf = dir.join("nginx-tls.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx-tls.pid;\nerror_log {d}/nginx-tls.err;\n\
             events {{ worker_connections 256; }}\nhttp {{\n log_format p '$server_protocol $connection $status';\n\
             access_log {log} p;\n server {{\n  listen 127.0.0.1:{port} ssl{h2};\n  \
             ssl_certificate {c}; ssl_certificate_key {k};\n  location / {{ {location} }}\n }}\n}}\n",
            d = dir.display(),
            log = log.display(),
            h2 = if h2 { " http2" } else { "" },
            c = c.display(),
            k = k.display(),
        ),
    )
    .unwrap();
    let child = spawn_nginx(
        std::process::Command::new("/usr/sbin/nginx")
            .args(["-e", "stderr", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null()),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        NginxTls {
            addr,
            log,
            _child: child,
        },
        ca_pem,
    )
}

struct NginxTls {
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
    _child: NginxProcess,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_auto_choose_http2_by_alpn_over_upstream_tls() {
    // `h2` and `auto` to a TLS upstream that offers h2: HTTP/2; `auto` to one that offers only
    // HTTP/1.1: HTTP/1.1.
    for (protocol, offers_h2, want) in [
        ("h2", true, "HTTP/2.0"),
        ("auto", true, "HTTP/2.0"),
        ("auto", false, "HTTP/1.1"),
    ] {
        let dir = temp_dir("h2-alpn");
        let (nginx, ca) = nginx_tls(&dir, offers_h2);
        let cfg = format!(
            "[router.upstream]\nendpoints = [\"{}\"]\nprotocol = \"{protocol}\"\n\
             [router.upstream.tls]\nca_file = \"{}\"\nserver_name = \"up.test\"\n",
            nginx.addr,
            ca.display()
        );
        let gw = gateway("h2-alpn", &cfg).await;
        for _ in 0..3 {
            let got = get(&client(), gw.addr, "/x").await;
            assert_eq!(got.status, 200, "{protocol}: {}", got.body);
        }
        let lines = upstream_lines(&nginx.log, 3);
        assert_eq!(lines.len(), 3, "{protocol}");
        assert!(
            lines.iter().all(|(p, _, _)| p == want),
            "{protocol}, upstream offers h2: {offers_h2}: {lines:?}"
        );
    }
}

/// An HTTP/2 client claiming a gRPC call to an `auto` cluster whose endpoint chose HTTP/1.1
/// by ALPN is no streaming call: its body has the minimum rate, so a trickle (10 bytes every
/// 200 ms, through curl from a pipe) is cut as the client's, `client_body_timeout`
/// (`DEADLINE_EXCEEDED`) after about 1.1 s. Before, the claim exempted it, since the check was per cluster, and the trickle held
/// the HTTP/1.1 upstream connection for as long as it went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_claim_over_an_auto_cluster_that_chose_http1_is_held_to_the_minimum_rate() {
    use std::process::{Command, Stdio};
    let dir = temp_dir("auto-h1-trickle");
    // An upstream that reads the whole body before it answers (nginx buffers a body it
    // proxies; its own upstream refuses, so the answer would be a 502 once the body is in).
    let (nginx, ca) = nginx_tls_with(&dir, false, "proxy_pass http://127.0.0.1:9;");
    let cfg = format!(
        "[router.upstream]\nendpoints = [\"{}\"]\nprotocol = \"auto\"\n\
         [router.upstream.retry]\nmax_retries = 0\n\
         [router.upstream.timeouts]\nrequest_timeout_ms = 1000\n\
         [router.upstream.tls]\nca_file = \"{}\"\nserver_name = \"up.test\"\n",
        nginx.addr,
        ca.display()
    );
    let gw = gateway("auto-h1-trickle", &cfg).await;
    let url = format!("http://{}/x", gw.addr);
    let (answer, took) = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut curl = Command::new("curl")
            .args(["-sS", "-i", "--http2-prior-knowledge", "--max-time", "15"])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .args(["-X", "POST", "-T", "-", &url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl");
        let mut pipe = curl.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || gateway_testkit::http::trickle(&mut pipe));
        let out = curl.wait_with_output().expect("curl");
        feeder.join().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            start.elapsed(),
        )
    })
    .await
    .unwrap();
    // curl 7.88 takes hyper's RST_STREAM (NO_ERROR) behind the trailers-only answer, which
    // stops the body it still sends, for an error (92) and prints nothing: the gateway's log
    // says what it answered, and curl's time that it was let go.
    assert!(took < Duration::from_millis(4000), "{took:?}: {answer}");
    let line = &log_lines(&gw.log, 1)[0];
    assert_eq!(line["error"], "client_body_timeout", "{line}");
    assert_eq!(line["grpc_status"], 4, "{line}");
    assert!(
        line["detail"]
            .as_str()
            .is_some_and(|d| d.contains("slower than 500 bytes a second")),
        "{line}"
    );
}

/// A request with no usable host (HTTP/1.0 without `Host`, or an empty `Host`) to an h2c
/// cluster is the client's fault, answered 400: HTTP/2 needs `:authority`. It was a 502
/// `upstream_reset` that blamed the upstream and retired the shared connection, so that any
/// client could make the gateway open a new upstream connection per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_usable_host_to_an_http2_upstream_is_a_400() {
    use gateway_testkit::http::raw_exchange;

    let dir = temp_dir("h2c-nohost");
    let nginx = nginx_h2c(&dir, "");
    let gw = gateway("h2c-nohost", &config(nginx.addr, 8)).await;
    for req in [
        &b"GET /a HTTP/1.0\r\n\r\n"[..],
        &b"GET /b HTTP/1.1\r\nhost:\r\nconnection: close\r\n\r\n"[..],
    ] {
        let answer = raw_exchange(gw.addr, req, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1."), "{answer:?}");
        assert_eq!(answer.get(9..12), Some("400"), "{answer:?}");
        assert!(answer.contains("needs a valid Host"), "{answer:?}");
    }
    let ok = get(&client(), gw.addr, "/c").await;
    assert_eq!(ok.status, http::StatusCode::OK, "{}", ok.body);
    assert_eq!(
        upstream_lines(&nginx.log, 1).len(),
        1,
        "only the request with a host reached the upstream"
    );
}

/// `curl --http2` to an `http://` URL sends an h2c upgrade with its request. The gateway
/// tunnels only the upgrades a cluster lists (WebSocket by default; never h2c), so it answers
/// the request as a plain one, through an HTTP/2 cluster too. Before, every such request to an h2c cluster was refused ("an HTTP/1.1
/// `Upgrade` (WebSocket) needs protocol = \"http1\"").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_over_http_reaches_an_h2c_upstream() {
    let dir = temp_dir("h2c-curl-upgrade");
    let nginx = nginx_h2c(&dir, "");
    let gw = gateway("h2c-curl-upgrade", &config(nginx.addr, 8)).await;
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("curl")
            .args(["-sS", "-v", "--http2", "--max-time", "5", "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{http_version}"])
            .arg(format!("http://{}/up", gw.addr))
            .output()
            .expect("curl")
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.to_ascii_lowercase().contains("upgrade: h2c"),
        "curl sent the upgrade: {stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1.1", "{stderr}");
    assert_eq!(
        upstream_lines(&nginx.log, 1).len(),
        1,
        "it reached the upstream"
    );
}

/// An HTTP/2 upstream whose response breaks the protocol (no `:status`; a connection-specific
/// header): h2 resets the stream itself, and that was reported as `upstream_reset`, "closed the
/// connection before a complete response", which blames the path or a crash. It is `502
/// invalid_upstream_response` now. (An uppercase header name makes h2 end the whole connection:
/// that stays `upstream_reset`, since every stream on it gets the same error.) The upstream is
/// Python's `h2` with its own checks off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_that_breaks_the_protocol_is_an_invalid_response() {
    const SERVER: &str = r#"
import socket, sys, threading
import h2.config, h2.connection, h2.events
HEADERS = {"no_status": [("content-length", "2")],
           "uppercase": [(":status", "200"), ("X-Upper", "1"), ("content-length", "2")],
           "connection_header": [(":status", "200"), ("connection", "close"), ("content-length", "2")]}
def serve(s):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False, validate_inbound_headers=False))
    c.initiate_connection(); s.sendall(c.data_to_send())
    while True:
        d = s.recv(65536)
        if not d: return
        for e in c.receive_data(d):
            if isinstance(e, h2.events.RequestReceived):
                path = dict(e.headers)[b":path"].decode().strip("/")
                c.send_headers(e.stream_id, HEADERS[path])
                c.send_data(e.stream_id, b"ok", end_stream=True)
        s.sendall(c.data_to_send())
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(16)
print(l.getsockname()[1], flush=True)
while True:
    s, _ = l.accept()
    threading.Thread(target=serve, args=(s,), daemon=True).start()
"#;
    let dir = temp_dir("h2-violations");
    let up = serve_python(&dir, "bad_h2.py", SERVER, &[]);
    let gw = gateway(
        "h2-violations",
        &format!(
            "{}[router.upstream.retry]\nmax_retries = 0\n",
            config(up.addr(), 8)
        ),
    )
    .await;
    for path in ["no_status", "connection_header"] {
        let got = get(&client(), gw.addr, &format!("/{path}")).await;
        assert_eq!(got.status, 502, "{path}: {}", got.body);
        assert_eq!(
            got.header("x-gateway-error"),
            "invalid_upstream_response",
            "{path}: {}",
            got.body
        );
    }
}

/// An HTTP/2 upstream that sheds load with `RST_STREAM(REFUSED_STREAM)` (RFC 9113 section
/// 8.7: the stream was not processed) keeps its connection: the refused requests are retried
/// on it, and it carries on with the rest. Each refusal used to retire the connection it came
/// on, so an upstream shedding one stream in three got a new connection (a handshake, on an
/// upstream already short of capacity) for about every refusal: 205 connections for 223
/// refusals in this test. A request the upstream refuses as many times as the retries allow
/// is its `503 upstream_refused_stream`: the upstream's own load shedding, passed on. The
/// upstream is Python's `h2`, the client h2load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_that_refuses_some_streams_keeps_its_connection() {
    const SERVER: &str = r#"
import json, socket, sys, threading
import h2.config, h2.connection, h2.errors, h2.events
lock = threading.Lock()
stats = {"connections": 0, "streams": 0, "refused": 0, "served": 0}
def serve(s):
    with lock: stats["connections"] += 1
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection(); s.sendall(c.data_to_send())
    while True:
        try: d = s.recv(65536)
        except OSError: return
        if not d: return
        for e in c.receive_data(d):
            if isinstance(e, h2.events.RequestReceived):
                path = dict(e.headers)[b":path"].decode()
                with lock:
                    stats["streams"] += 1
                    n = stats["streams"]
                if path == "/stats":
                    with lock: body = json.dumps(stats).encode()
                elif n % 3 == 0:
                    c.reset_stream(e.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    with lock: stats["refused"] += 1
                    continue
                else:
                    with lock: stats["served"] += 1
                    body = b"ok"
                c.send_headers(e.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                c.send_data(e.stream_id, body, end_stream=True)
        s.sendall(c.data_to_send())
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(64)
print(l.getsockname()[1], flush=True)
while True:
    s, _ = l.accept()
    threading.Thread(target=serve, args=(s,), daemon=True).start()
"#;
    const REQUESTS: u64 = 600;
    let dir = temp_dir("h2-shedding");
    let up = serve_python(&dir, "shedding_h2.py", SERVER, &[]);
    let gw = gateway("h2-shedding", &config(up.addr(), 16)).await;
    let url = format!("http://{}/x", gw.addr);
    let n = REQUESTS.to_string();
    let r = tokio::task::spawn_blocking(move || h2load(&url, &["-n", &n, "-c", "2", "-m", "4"]))
        .await
        .unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&get(&client(), gw.addr, "/stats").await.body).unwrap();
    let refused = stats["refused"].as_u64().unwrap();
    let served = stats["served"].as_u64().unwrap();
    eprintln!("{REQUESTS} requests through a shedding upstream: {stats}");
    assert!(refused >= REQUESTS / 3, "the upstream refused: {stats}");
    assert!(
        stats["connections"].as_u64().unwrap() <= 8,
        "the upstream shed {refused} streams and got {} connections: {stats}",
        stats["connections"]
    );
    // Every request answered once: by the upstream, or with its refusal.
    assert_eq!(r.succeeded + r.failed, REQUESTS, "{}", r.text);
    assert_eq!(r.status_2xx, served, "{}", r.text);
    let shed: Vec<serde_json::Value> = log_lines(&gw.log, REQUESTS as usize + 1)
        .into_iter()
        .filter(|l| l["status"] != 200)
        .collect();
    assert_eq!(shed.len() as u64, REQUESTS - served);
    for l in &shed {
        assert_eq!(l["status"], 503, "{l}");
        assert_eq!(l["error"], "upstream_refused_stream", "{l}");
    }
    // Retried: refused once in three, with no retry a third of the requests would fail.
    assert!(
        served >= REQUESTS * 4 / 5,
        "{served} of {REQUESTS} served: {stats}"
    );
}

/// A response the client got whole is not one it left: hyper stops polling a body once it has
/// written its `content-length` bytes (and writes none for HEAD), and an HTTP/2 upstream may
/// send END_STREAM after the last byte, in a frame of its own. Such responses were logged
/// `aborted` and counted as `client_closed` in `gateway_responses_incomplete_total`. curl over
/// HTTP/1.1, a GET and a HEAD, against Python's `h2` sending END_STREAM 300 ms after the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_got_whole_is_not_counted_as_cut_short() {
    const SERVER: &str = r#"
import socket, sys, threading, time
import h2.config, h2.connection, h2.events
def serve(s):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection(); s.sendall(c.data_to_send())
    while True:
        d = s.recv(65536)
        if not d: return
        for e in c.receive_data(d):
            if isinstance(e, h2.events.RequestReceived):
                head = dict(e.headers)[b":method"] == b"HEAD"
                c.send_headers(e.stream_id, [(":status", "200"), ("content-length", "5")])
                if not head:
                    c.send_data(e.stream_id, b"hello")
                s.sendall(c.data_to_send())
                time.sleep(0.3)
                c.end_stream(e.stream_id)
        s.sendall(c.data_to_send())
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(16)
print(l.getsockname()[1], flush=True)
while True:
    s, _ = l.accept()
    threading.Thread(target=serve, args=(s,), daemon=True).start()
"#;
    let dir = temp_dir("h2-late-end");
    let up = serve_python(&dir, "late_end_h2.py", SERVER, &[]);
    let gw = gateway("h2-late-end", &config(up.addr(), 8)).await;
    let url = format!("http://{}/x", gw.addr);
    for head in [false, true] {
        let url = url.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut curl = std::process::Command::new("curl");
            curl.args(["-s", "-i", "--http1.1", "--max-time", "5"]);
            if head {
                curl.arg("-I");
            }
            curl.arg(url).output().expect("curl")
        })
        .await
        .unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(out.ends_with("hello"), !head, "{out}");
    }
    let lines = log_lines(&gw.log, 2);
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["aborted"], false, "{l}");
    }
    let admin = gw.handle.admin_addr().expect("admin listener");
    let m = get(&client(), admin, "/metrics").await.body;
    assert_eq!(
        gateway_testkit::admin::value(
            &m,
            "gateway_responses_incomplete_total",
            &[("reason", "client_closed")]
        ),
        0.0,
        "{m}"
    );
}
