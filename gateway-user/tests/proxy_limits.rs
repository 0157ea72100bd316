//! Client-side limits: 431 for oversized heads, 400 for malformed requests, 413 for bodies over
//! the limit, slow-loris clients cut off by the header-read timeout, an idle HTTP/2 connection
//! closed with GOAWAY at `http2_idle_timeout_ms` (not while a stream is open), an HTTP/2
//! client that never opens its flow-control window closed at the write timeout (nghttp),
//! slow request bodies read ahead before any upstream connection is taken (curl, HTTP/1.1 and
//! HTTP/2), and streaming of large
//! bodies in both directions with the gateway's peak RSS staying small (the built binary, so
//! that its memory is measured alone).

use std::time::{Duration, Instant};

use gateway_testkit::{
    config::{base_config, write_config},
    gateway_bin,
    http::{Body, client, empty, full, generated, get, h2c_connection, raw_exchange, send},
    inprocess::{InProcess, gateway, log_lines},
    process::GatewayProcess,
    tempdir::temp_dir,
    upstream::Upstream,
};
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;

async fn limited(label: &str, up: &Upstream) -> InProcess {
    gateway(
        label,
        &format!(
            "[router.downstream]\nmax_request_header_bytes = 4096\nmax_request_body_bytes = 1000\nheader_read_timeout_ms = 300\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_431() {
    let up = Upstream::start("up").await;
    let gw = limited("431", &up).await;
    let req = Request::get(format!("http://{}/", gw.addr))
        .header("x-big", "y".repeat(6000))
        .body(empty())
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(got.header("x-gateway-error"), "request_headers_too_large");
    assert!(got.body.contains("the limit is 4096"), "{}", got.body);
    // Far beyond the limit, hyper refuses the head before it is parsed: still 431.
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "y".repeat(64 * 1024)
    );
    let raw = raw_exchange(gw.addr, huge.as_bytes(), Duration::from_secs(5)).await;
    assert!(raw.starts_with("HTTP/1.1 431"), "{raw}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_400() {
    let up = Upstream::start("up").await;
    let gw = limited("400", &up).await;
    let raw = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nthis is not a header\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    let raw = raw_exchange(gw.addr, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("x-gateway-error: bad_request"), "{raw}");
    assert!(raw.contains("without a Host header"), "{raw}");
    assert_eq!(up.hits(), 0);
}

/// What hyper refuses before the proxy sees it (a head it cannot parse, more than 100 header
/// fields) is answered by hyper; it is logged and counted as any request is (it was in
/// neither: only the client knew). curl sends the bad header name and the 101 fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_by_the_parser_are_logged_and_counted() {
    let up = Upstream::start("up").await;
    let gw = limited("parser", &up).await;
    let url = format!("http://{}/", gw.addr);
    // curl's status code for `headers` sent to the gateway.
    let curl = |headers: Vec<String>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut curl = std::process::Command::new("curl");
            curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
            for h in headers {
                curl.arg("-H").arg(h);
            }
            let out = curl.arg(url).output().expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    // A space in a header name is no token: hyper refuses the head.
    assert_eq!(curl(vec!["not a header: 1".into()]).await.unwrap(), "400");
    let fields = (0..101).map(|i| format!("x-{i}: 1")).collect();
    assert_eq!(curl(fields).await.unwrap(), "431");
    assert_eq!(up.hits(), 0);
    let lines = log_lines(&gw.log, 2);
    for (l, status, error) in [
        (&lines[0], 400, "bad_request"),
        (&lines[1], 431, "request_headers_too_large"),
    ] {
        assert_eq!(l["status"], status, "{l}");
        assert_eq!(l["error"], error, "{l}");
        assert_eq!(l["method"], "-", "{l}");
        assert_eq!(l["path"], "-", "{l}");
        assert!(
            l["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("refused by the HTTP/1 parser: ")),
            "{l}"
        );
    }
    let admin = gw.handle.admin_addr().expect("admin listener");
    let m = tokio::task::spawn_blocking(move || gateway_testkit::admin::metrics(admin))
        .await
        .unwrap();
    for status in ["400", "431"] {
        let n = gateway_testkit::admin::value(
            &m,
            "gateway_requests_total",
            &[("route", "-"), ("status", status)],
        );
        assert_eq!(n, 1.0, "status {status}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let up = Upstream::start("up").await;
    let gw = limited("413", &up).await;
    let c = client();
    // Declared length over the limit: refused before anything goes upstream.
    let req = Request::post(format!("http://{}/sink", gw.addr))
        .body(full(vec![b'x'; 2000]))
        .unwrap();
    let got = send(&c, req).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(got.header("x-gateway-error"), "request_body_too_large");
    // Answered before its body was read: the connection closes, and says so, so that the
    // client does not send its next request on it.
    assert_eq!(got.header("connection"), "close");
    assert_eq!(up.hits(), 0);
    // Chunked, length unknown up front: cut off once the limit is crossed.
    let req = Request::post(format!("http://{}/sink", gw.addr))
        .body(unsized_body(generated(200_000)))
        .unwrap();
    let got = send(&c, req).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "request_body_too_large");
    assert_eq!(got.header("connection"), "close");
    // Within the limit, the body goes through.
    let req = Request::post(format!("http://{}/sink", gw.addr))
        .body(full(vec![b'x'; 1000]))
        .unwrap();
    let got = send(&c, req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "1000");
    assert_eq!(
        got.header("connection"),
        "",
        "a body read to its end keeps the connection"
    );
}

/// A route's `max_request_body_bytes` replaces the router's on that route, higher or lower,
/// for a declared length (refused before anything is read) and for a chunked body (cut off as
/// it crosses the limit); other routes keep the router's. curl over HTTP/1.1, nghttp over
/// HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_limit_replaces_the_router_limit_on_that_route() {
    let up = Upstream::start("up").await;
    let gw = gateway(
        "route-413",
        &format!(
            r#"[router.downstream]
max_request_body_bytes = 1000
[clusters.api]
endpoints = ["{up}"]
[[routes]]
name = "uploads"
host = "uploads.test"
cluster = "api"
max_request_body_bytes = 100000
[[routes]]
name = "tiny"
host = "tiny.test"
cluster = "api"
max_request_body_bytes = 10
[[routes]]
name = "rest"
cluster = "api"
"#,
            up = up.addr
        ),
    )
    .await;
    let (addr, dir) = (gw.addr, gw.dir.clone());
    let send = |host: &'static str, size: usize, chunked: bool, h2: bool| {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || post(addr, &dir, host, size, chunked, h2))
    };
    // nghttp gives the status alone, curl /sink's byte count too.
    let ok = |n: usize, h2: bool| {
        if h2 {
            "200".to_owned()
        } else {
            format!("{n} 200")
        }
    };
    for (h2, chunked) in [(false, false), (false, true), (true, false)] {
        let case = format!("h2={h2} chunked={chunked}");
        // (host, the largest body it takes): the uploads route allows more than the router's
        // 1,000, the tiny one less, and a host without a route of its own has the router's.
        for (host, limit) in [
            ("uploads.test", 100_000),
            ("other.test", 1000),
            ("tiny.test", 10),
        ] {
            let got = send(host, limit, chunked, h2).await.unwrap();
            assert_eq!(got, ok(limit, h2), "{case} {host}");
            let got = send(host, limit + 1, chunked, h2).await.unwrap();
            assert!(got.ends_with("413"), "{case} {host}: {got}");
            if !h2 {
                assert!(
                    got.contains(&format!("exceeds {limit} bytes")),
                    "{case}: {got}"
                );
            }
        }
    }
    // Three refusals per protocol and framing; each logged on its route.
    let lines = log_lines(&gw.log, 18);
    let refused: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["status"] == 413)
        .map(|l| {
            assert_eq!(l["error"], "request_body_too_large", "{l}");
            (l["route"].as_str().unwrap(), l["host"].as_str().unwrap())
        })
        .collect();
    assert_eq!(refused.len(), 9, "{lines:?}");
    for (route, host) in refused {
        let want = match host {
            "uploads.test" => "uploads",
            "tiny.test" => "tiny",
            _ => "rest",
        };
        assert_eq!(route, want);
    }
}

/// POSTs `size` bytes to `/sink` with `host`, and says what came back: curl over HTTP/1.1 (the
/// body, `/sink`'s count of the bytes it got, and the status), or nghttp over HTTP/2 (the
/// status alone). Not curl for HTTP/2: Debian 12's curl 7.88 reports error 92 instead of the
/// status when a complete response and the RST_STREAM(NO_ERROR) that RFC 9113 section 8.1
/// recommends after it arrive before it has sent its body, as they do from the gateway and, a
/// little later, from nginx.
fn post(
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    host: &str,
    size: usize,
    chunked: bool,
    h2: bool,
) -> String {
    let file = dir.join(format!("body-{size}"));
    std::fs::write(&file, vec![b'x'; size]).unwrap();
    let url = format!("http://{addr}/sink");
    if h2 {
        let out = std::process::Command::new("nghttp")
            .args(["-v", "-H"])
            .arg(format!(":authority: {host}"))
            .arg("-d")
            .arg(&file)
            .arg(url)
            .output()
            .expect("nghttp");
        let text = String::from_utf8_lossy(&out.stdout);
        return text
            .lines()
            .find_map(|l| l.split_once(":status: "))
            .map_or_else(
                || format!("no status: {text}"),
                |(_, s)| s.trim().to_owned(),
            );
    }
    let mut curl = std::process::Command::new("curl");
    curl.args(["-s", "-w", " %{http_code}", "-H"])
        .arg(format!("Host: {host}"))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()));
    if chunked {
        curl.args(["-H", "Transfer-Encoding: chunked"]);
    }
    let out = curl.arg(url).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Hides a body's size so that the client sends it chunked.
fn unsized_body(b: Body) -> Body {
    struct Unsized(Body);
    impl hyper::body::Body for Unsized {
        type Data = bytes::Bytes;
        type Error = Box<dyn std::error::Error + Send + Sync>;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            std::pin::Pin::new(&mut self.0).poll_frame(cx)
        }
    }
    Unsized(b).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_is_cut_off_by_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = Upstream::start("up").await;
    let gw = limited("loris", &up).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    // Half a head, then a byte now and then, never the blank line.
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => return r,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if s.write_all(b"x").await.is_err() {
                        return Ok(0);
                    }
                }
            }
        }
    })
    .await;
    let took = start.elapsed();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the gateway must close the connection: {closed:?}"
    );
    assert!(
        took >= Duration::from_millis(300),
        "closed before the timeout: {took:?}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_waiting_for_its_next_head_is_closed_at_the_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = Upstream::start("up").await;
    let gw = limited("idle-head", &up).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    // The response is in: the timeout runs from here, with half of the next head sent.
    let answered = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    let took = answered.elapsed();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the gateway must close the connection: {closed:?}"
    );
    assert!(
        took >= Duration::from_millis(290),
        "closed before the timeout: {took:?}"
    );
    assert_eq!(up.hits(), 1);
}

/// Downloads and uploads 512 MiB through the gateway binary and checks its peak RSS.
/// An HTTP/2 client connection (prior knowledge, hyper's client) with no stream open for
/// `http2_idle_timeout_ms` gets GOAWAY and is closed; a stream longer than the limit keeps it
/// open, and the limit counts from that stream's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_at_its_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(500);
    let up = Upstream::start("up").await;
    up.set_delay(IDLE * 2);
    let gw = gateway(
        "h2-idle",
        &format!(
            "[router.downstream]\nhttp2_idle_timeout_ms = {}\n[router.upstream]\nendpoints = [\"{}\"]\n",
            IDLE.as_millis(),
            up.addr
        ),
    )
    .await;
    let (mut sender, mut conn) = h2c_connection(gw.addr).await;
    let req = Request::get(format!("http://{}/", gw.addr))
        .body(empty())
        .unwrap();
    // The gateway's idle timer starts after this, whenever this task reads the answer.
    let sent = Instant::now();
    let resp = sender
        .send_request(req)
        .await
        .expect("the long stream completes");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    let answered = Instant::now();
    let ended = tokio::time::timeout(IDLE * 8, &mut conn)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .unwrap();
    let (took, since_sent) = (answered.elapsed(), sent.elapsed());
    assert!(ended.is_ok(), "closed with GOAWAY, cleanly: {ended:?}");
    // Not before the limit (timed from before the request, which this task, sharing the
    // runtime's two threads, may read the answer to a moment late); after it, up to 1 s late
    // on a loaded machine.
    assert!(
        since_sent >= IDLE && took < IDLE + Duration::from_secs(1),
        "closed {took:?} after its last stream ({since_sent:?} after it was sent); the limit is {IDLE:?}"
    );
}

/// An HTTP/2 client that never opens its flow-control window for a response (nghttp with a
/// stream window of 0) holds the stream, and the upstream connection behind it, only for the
/// write timeout: the gateway closes the connection, as it closes an HTTP/1 connection whose
/// socket takes no byte for as long, and the request is logged as aborted, cut short by
/// `client_write_timeout` (the gateway's doing; it was `client_closed`, as if the client had
/// gone away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_never_reads_a_stream_is_closed_at_the_write_timeout() {
    const WRITE: Duration = Duration::from_millis(600);
    let up = Upstream::start("up").await;
    let gw = gateway(
        "h2-window",
        &format!(
            "[router.downstream]\nwrite_timeout_ms = {}\n[router.upstream]\nendpoints = [\"{}\"]\n",
            WRITE.as_millis(),
            up.addr
        ),
    )
    .await;
    let url = format!("http://{}/bytes/1000000", gw.addr);
    let start = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("nghttp")
            .args(["-w", "0", "-t", "10", &url])
            .output()
            .expect("nghttp (nghttp2-client)")
    })
    .await
    .unwrap();
    let took = start.elapsed();
    // Not before the timeout; after it, nghttp's own start-up and a loaded machine (without
    // the timeout, nghttp's -t 10 would end it at 10 s).
    assert!(
        took >= WRITE && took < WRITE + Duration::from_secs(2),
        "nghttp ended after {took:?}; the write timeout is {WRITE:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cut_by_the_write_timeout(&gw, 1_000_000);
}

/// The one request `gw` served was cut short because its client stopped reading: so says its
/// log line (`aborted`, with fewer than `size` bytes, `incomplete: client_write_timeout`) and
/// the metric, where `client_closed` stays 0.
fn cut_by_the_write_timeout(gw: &InProcess, size: u64) {
    let l = &log_lines(&gw.log, 1)[0];
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["aborted"], true, "{l}");
    assert_eq!(l["incomplete"], "client_write_timeout", "{l}");
    assert!(l["bytes"].as_u64().unwrap() < size, "{l}");
    let admin = gw.handle.admin_addr().expect("admin listener");
    let m = gateway_testkit::admin::metrics(admin);
    let cut = |reason| {
        gateway_testkit::admin::value(
            &m,
            "gateway_responses_incomplete_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(
        (cut("client_write_timeout"), cut("client_closed")),
        (1.0, 0.0),
        "{m}"
    );
}

/// An HTTP/1 client that stops reading: curl writing the body into a pipe that nobody reads.
/// Once the pipe and the socket buffers are full, the gateway's writes make no progress; it
/// closes the connection at the write timeout, and counts and logs the response as cut short
/// by `client_write_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_is_closed_at_the_write_timeout() {
    const SIZE: u64 = 200_000_000;
    let up = Upstream::start("up").await;
    let gw = gateway(
        "h1-stops-reading",
        &format!(
            "[router.downstream]\nwrite_timeout_ms = 600\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await;
    // Its stdout is a pipe this test never reads.
    let mut reader = std::process::Command::new("curl")
        .args(["-sS", &format!("http://{}/bytes/{SIZE}", gw.addr)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("curl");
    let logged = tokio::task::spawn_blocking({
        let log = gw.log.clone();
        move || log_lines(&log, 1)
    })
    .await;
    let _ = reader.kill();
    let _ = reader.wait();
    logged.expect("the response is logged once the gateway gives up on the client");
    cut_by_the_write_timeout(&gw, SIZE);
}

/// An HTTP/2 client that reads slowly, but reads, is not taken for one that stopped: with a
/// 16 KiB window, reading a frame every 200 ms, 256 KiB take about 3 s against a write
/// timeout of 1.2 s (a read may come 1 s late on a loaded machine), and the response arrives
/// whole. (hyper waits for room for what is left
/// of the last piece before it asks for the next; pieces of the upstream's 64 KiB chunks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_reads_slowly_is_not_closed() {
    const SIZE: usize = 256 * 1024;
    let up = Upstream::start("up").await;
    let gw = gateway(
        "h2-slow-reader",
        &format!(
            "[router.downstream]\nwrite_timeout_ms = 1200\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .handshake::<_, Body>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake with the gateway");
    tokio::spawn(conn);
    let req = Request::get(format!("http://{}/bytes/{SIZE}", gw.addr))
        .body(empty())
        .unwrap();
    let resp = sender.send_request(req).await.expect("the response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream was not cut");
        got += frame.data_ref().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(got, SIZE);
    let l = &log_lines(&gw.log, 1)[0];
    assert_eq!(l["aborted"], false, "{l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_with_bounded_memory() {
    const SIZE: u64 = 512 << 20;
    let up = Upstream::start("up").await;
    let dir = temp_dir("stream");
    let cfg = write_config(
        &dir,
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let baseline = gw.peak_rss_kib();
    let c = client();

    let resp = c
        .request(
            Request::get(format!("http://{}/bytes/{SIZE}", gw.addr))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        got += f.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, SIZE);

    let req = Request::post(format!("http://{}/sink", gw.addr))
        .body(generated(SIZE))
        .unwrap();
    let got = send(&c, req).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, SIZE.to_string());

    let peak = gw.peak_rss_kib();
    eprintln!(
        "gateway peak RSS: {baseline} KiB at start, {peak} KiB after 2 x {} MiB",
        SIZE >> 20
    );
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB: the gateway must not buffer bodies (start: {baseline} KiB)"
    );
}

/// The part of a held body sent at once, and the rest.
const HELD_FIRST: usize = 100;
const HELD_REST: usize = 300;

/// A curl process [`held_body`] started: killed and reaped if the test ends before
/// [`release`].
struct HeldCurl(Option<std::process::Child>);

impl Drop for HeldCurl {
    fn drop(&mut self) {
        if let Some(mut curl) = self.0.take() {
            let _ = curl.kill();
            let _ = curl.wait();
        }
    }
}

/// curl sending a body from a pipe to `url` (over HTTP/2 with prior knowledge when `h2`; over
/// HTTP/1.1 chunked, as curl sends a body of unknown length): [`HELD_FIRST`] bytes now, the
/// rest when [`release`] says, so that the body is still arriving for as long as the test
/// wants, however slowly the machine runs.
fn held_body(url: &str, h2: bool) -> HeldCurl {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut curl = Command::new("curl");
    curl.args([
        "-s",
        "-i",
        "--max-time",
        "30",
        "-X",
        "POST",
        "-T",
        "-",
        "-H",
        "Expect:",
    ]);
    if h2 {
        curl.arg("--http2-prior-knowledge");
    }
    let mut child = curl
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let stdin = child.stdin.as_mut().expect("curl's stdin");
    stdin
        .write_all(&[b'x'; HELD_FIRST])
        .expect("writing to curl");
    HeldCurl(Some(child))
}

/// Sends the rest of a [`held_body`] and ends it: what curl printed (`-i`). (A curl that has
/// already exited shows in what it printed, not as a failed write.)
fn release(mut held: HeldCurl) -> tokio::task::JoinHandle<String> {
    use std::io::Write as _;
    let mut curl = held.0.take().expect("a held curl");
    let mut stdin = curl.stdin.take().expect("curl's stdin");
    let _ = stdin.write_all(&[b'y'; HELD_REST]);
    drop(stdin);
    tokio::task::spawn_blocking(move || {
        let out = curl.wait_with_output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// A client that sends its body slowly (slowloris on the body) holds no upstream connection
/// while it does: four of them, over both protocols, each holding its body open after its
/// first bytes, against a cluster of two connections; once the gateway holds the four
/// bodies' first bytes read ahead, no request has gone upstream, and a GET beside them is
/// answered. Released, the four are answered in full. The control, on a route with
/// `request_buffering = false`, shows what this prevents: two held bodies there go upstream
/// at once, take both connections, and the GET waits for one until they are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_hold_no_upstream_connection() {
    use gateway_testkit::admin::{metrics, value, wait_for};
    let up = Upstream::start("sink").await;
    let gw = gateway(
        "slow-bodies",
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\n[router.upstream.limits]\nmax_connections = 2\n[router.upstream.timeouts]\nrequest_timeout_ms = 15000\n\n[[routes]]\npath_prefix = \"/streamed/\"\nrewrite_prefix = \"/\"\ncluster = \"default\"\nrequest_buffering = false\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"default\"\n",
            up.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let url = |path: &str| format!("http://{}{path}", gw.addr);
    let held: Vec<_> = (0..4)
        .map(|i| held_body(&url("/sink"), i % 2 == 1))
        .collect();
    let want = (4 * HELD_FIRST) as f64;
    tokio::task::spawn_blocking(move || {
        wait_for("the four bodies' first bytes read ahead", || {
            match value(&metrics(admin), "gateway_request_read_ahead_bytes", &[]) {
                v if v == want => Ok(()),
                v => Err(format!("gateway_request_read_ahead_bytes {v}")),
            }
        })
    })
    .await
    .unwrap();
    // The upstream sees a request's head as soon as it is sent (its own connections are no
    // measure: the gateway's warm-up probes open some).
    assert_eq!(
        up.hits(),
        0,
        "a request went upstream with its body still arriving"
    );
    let got = tokio::time::timeout(Duration::from_secs(5), get(&client(), gw.addr, "/"))
        .await
        .expect("the GET beside four held bodies was answered within 5 s");
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    let whole = (HELD_FIRST + HELD_REST).to_string();
    for answer in held.into_iter().map(release) {
        let answer = answer.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/2 200"),
            "{answer}"
        );
        assert!(answer.ends_with(&whole), "{answer}");
    }
    assert_eq!(up.hits(), 5);

    // The control: streamed, the held bodies go upstream at once and hold both connections.
    let held: Vec<_> = (0..2)
        .map(|_| held_body(&url("/streamed/sink"), false))
        .collect();
    let hits = up.hits.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the two streamed requests upstream", || {
            match hits.load(std::sync::atomic::Ordering::SeqCst) {
                7 => Ok(()),
                n => Err(format!("{n} requests upstream")),
            }
        })
    })
    .await
    .unwrap();
    let addr = gw.addr;
    let waiting = tokio::spawn(async move { get(&client(), addr, "/").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answered_early = waiting.is_finished();
    let answers: Vec<_> = held.into_iter().map(release).collect();
    let got = waiting.await.unwrap();
    assert!(
        !answered_early || got.status != StatusCode::OK,
        "the control shows nothing: the GET was answered beside streamed held bodies"
    );
    for answer in answers {
        let answer = answer.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&whole), "{answer}");
    }
}

/// A body sent as one-byte chunks costs what its bytes cost while it is read ahead: 20 clients
/// each send 60,000 of them (`1\r\nx\r\n`) and stall. Held frame by frame, each request held
/// about 8 MB (a frame's bookkeeping per byte, and a `Bytes` per byte kept for a retry); now
/// the read-ahead buffer holds 60,000 bytes, which the copy kept for a retry shares once the
/// body is read ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_one_byte_chunks_costs_its_bytes_while_read_ahead() {
    const CLIENTS: usize = 20;
    const CHUNKS: usize = 60_000;
    use tokio::io::AsyncWriteExt as _;
    let up = Upstream::start("up").await;
    let dir = temp_dir("tiny-chunks");
    let cfg = write_config(
        &dir,
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\n[router.upstream.timeouts]\nrequest_timeout_ms = 60000\n",
            up.addr
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let baseline = gw.rss_kib();
    let mut body = b"POST /sink HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    body.extend(b"1\r\nx\r\n".repeat(CHUNKS));
    let mut held = Vec::new();
    for _ in 0..CLIENTS {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&body).await.unwrap();
        held.push(s);
    }
    // Until the gateway has read them all (the last chunks arrive in the kernel's buffers
    // first): its CPU time stops growing.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", gw.pid())).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let mut last = cpu();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = cpu();
        if now == last {
            break;
        }
        last = now;
    }
    let grown = gw.rss_kib().saturating_sub(baseline);
    eprintln!(
        "RSS grew {grown} KiB for {CLIENTS} bodies of {CHUNKS} one-byte chunks (start {baseline} KiB)"
    );
    assert_eq!(up.hits(), 0, "nothing goes upstream before its body is in");
    assert!(
        grown < 40 * 1024,
        "RSS grew {grown} KiB: read ahead, a one-byte chunk costs more than its byte"
    );
    drop(held);
}

/// `[router.downstream] request_buffering_memory_bytes` bounds what all requests together hold
/// read ahead, the metrics say where it stands, and a reload applies it. With it at 64 KiB,
/// one client sends 60,000 bytes of a 65,536-byte body and stalls:
/// `gateway_request_read_ahead_bytes` shows them held. A POST of 6,000 bytes sent whole takes
/// the total past the limit, but its body is in: read whole, it is not counted (curl). One
/// whose first 6,000 bytes of 20,000 do the same streams the rest to the upstream instead,
/// and is counted in `gateway_request_read_ahead_over_budget_total`. Bytes are given back when
/// handed on or when their client goes. Reloaded with 1 MiB, the same partial body is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_memory_is_bounded_counted_and_given_back() {
    use gateway_testkit::admin::{metrics, value, wait_for};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = Upstream::start("sink").await;
    let config = |limit: u64| {
        format!(
            "[router.downstream]\nrequest_buffering_memory_bytes = {limit}\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        )
    };
    let gw = gateway("ahead-budget", &config(65_536)).await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let held = move || value(&metrics(admin), "gateway_request_read_ahead_bytes", &[]);
    let over = move || {
        value(
            &metrics(admin),
            "gateway_request_read_ahead_over_budget_total",
            &[],
        )
    };
    let settle = |what: &'static str, want: f64| {
        tokio::task::spawn_blocking(move || {
            wait_for(what, || match held() {
                v if v == want => Ok(()),
                v => Err(format!("gateway_request_read_ahead_bytes {v}")),
            })
        })
    };
    // A POST to the sink declaring `len` bytes, of which `sent` are written with the head.
    let partial = |len: usize, sent: usize| async move {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut msg =
            format!("POST /sink HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n").into_bytes();
        msg.resize(msg.len() + sent, b'a');
        s.write_all(&msg).await.unwrap();
        s
    };
    // Sends the rest of a `partial` body; the upstream's answer (the length it read).
    let finish = |mut s: tokio::net::TcpStream, rest: usize| async move {
        s.write_all(&vec![b'b'; rest]).await.unwrap();
        let mut answer = vec![0; 4096];
        let n = s.read(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    let file = gw.dir.join("body-6000.bin");
    std::fs::write(&file, vec![b'x'; 6_000]).unwrap();
    let url = format!("http://{}/sink", gw.addr);
    let curl = move || {
        let (file, url) = (file.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("curl")
                .args(["-s", "-i", "--max-time", "10", "-H", "Expect:"])
                .arg("--data-binary")
                .arg(format!("@{}", file.display()))
                .arg(url)
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };

    assert_eq!(held(), 0.0);
    let stalled = partial(65_536, 60_000).await;
    settle("the stalled body's bytes read ahead", 60_000.0)
        .await
        .unwrap();
    assert_eq!(over(), 0.0);
    let got = curl().await.unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("6000"), "the upstream read all of it: {got}");
    assert_eq!(over(), 0.0, "a body read whole streamed nothing");
    let streaming = partial(20_000, 6_000).await;
    tokio::task::spawn_blocking(move || {
        wait_for("the partial body counted over the budget", || {
            match over() {
                1.0 => Ok(()),
                v => Err(format!("gateway_request_read_ahead_over_budget_total {v}")),
            }
        })
    })
    .await
    .unwrap();
    let got = finish(streaming, 14_000).await;
    assert!(got.ends_with("20000"), "the upstream read all of it: {got}");
    assert_eq!(up.hits(), 2);
    assert_eq!(held(), 60_000.0, "the streamed POST holds nothing now");
    drop(stalled);
    settle("the stalled body's bytes given back", 0.0)
        .await
        .unwrap();

    let text = format!("{}\n{}", base_config(&gw.log), config(1 << 20));
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    let stalled = partial(65_536, 60_000).await;
    settle("the stalled body's bytes read ahead", 60_000.0)
        .await
        .unwrap();
    let held_too = partial(20_000, 6_000).await;
    settle("both bodies read ahead, within 1 MiB", 66_000.0)
        .await
        .unwrap();
    assert_eq!(
        over(),
        1.0,
        "reloaded with 1 MiB, the partial body was held"
    );
    let got = finish(held_too, 14_000).await;
    assert!(got.ends_with("20000"), "{got}");
    drop(stalled);
    settle("the stalled body's bytes given back", 0.0)
        .await
        .unwrap();
}

/// `[router.downstream] http2_max_concurrent_streams` is what the gateway advertises and what a
/// client gets. nghttp2's own client reads it from the gateway's SETTINGS (200 by default, 5
/// when set); h2load then asks for 20 streams at once on one connection to an upstream that
/// answers after 2 s, and the upstream never has more than 5 of them in flight (`/status`,
/// sampled while they run). h2load opens its streams before the gateway's SETTINGS arrive,
/// as HTTP/2 allows: those beyond 5 are refused (`REFUSED_STREAM`, which h2load counts as
/// errors and does not retry) and never reach the upstream. Reloaded with 50, a new
/// connection is told 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http2_stream_limit_is_a_setting_clients_obey() {
    use gateway_testkit::{
        admin::{endpoint, status},
        peers::h2load,
    };
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let up = Upstream::start("streams").await;
    let advertised = |addr: std::net::SocketAddr| {
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("nghttp")
                .args(["-nv", "-t", "10s", &format!("http://{addr}/")])
                .output()
                .expect("nghttp (nghttp2-client)");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text
                .lines()
                .skip_while(|l| !l.contains("recv SETTINGS frame"))
                .find_map(|l| l.split("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):").nth(1))
                .unwrap_or_else(|| {
                    panic!("no SETTINGS_MAX_CONCURRENT_STREAMS from the gateway:\n{text}")
                });
            line.trim_end_matches(']').trim().parse::<u32>().unwrap()
        })
    };
    let endpoints = format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr);
    let by_default = gateway("h2-streams-default", &endpoints).await;
    assert_eq!(advertised(by_default.addr).await.unwrap(), 200);
    drop(by_default);

    let gw = gateway(
        "h2-streams",
        &format!("[router.downstream]\nhttp2_max_concurrent_streams = 5\n{endpoints}"),
    )
    .await;
    assert_eq!(advertised(gw.addr).await.unwrap(), 5);
    let admin = gw.handle.admin_addr().expect("admin listener");
    /// Stops the sampler however the test ends.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let done = Arc::new(AtomicBool::new(false));
    let (stop, upstream) = (done.clone(), up.addr);
    let stop_sampler = Stop(done);
    let sampler = tokio::task::spawn_blocking(move || {
        let mut most = 0;
        while !stop.load(Ordering::Relaxed) {
            let n = endpoint(&status(admin), "default", upstream)["in_flight"]
                .as_u64()
                .unwrap();
            most = most.max(n);
            std::thread::sleep(Duration::from_millis(20));
        }
        most
    });
    // Long enough that the sampler sees them in flight on a loaded machine too.
    let url = format!("http://{}/delay/2000", gw.addr);
    // nghttp's own GETs.
    let before = up.hits() as u64;
    let r = tokio::task::spawn_blocking(move || {
        h2load(&url, &["-n", "20", "-c", "1", "-m", "20", "-T", "30"])
    })
    .await
    .unwrap();
    drop(stop_sampler);
    let most = sampler.await.unwrap();
    assert_eq!(r.succeeded + r.failed, 20, "{}", r.text);
    assert!(r.succeeded >= 5, "{}", r.text);
    assert_eq!(r.status_2xx, r.succeeded, "{}", r.text);
    assert_eq!(
        up.hits() as u64 - before,
        r.succeeded,
        "a refused stream reached the upstream: {}",
        r.text
    );
    assert!(
        (2..=5).contains(&most),
        "{most} requests in flight at the upstream at most, from one connection allowed 5 streams"
    );

    // A reload applies it to new connections.
    let text = format!(
        "{}\n[router.downstream]\nhttp2_max_concurrent_streams = 50\n{endpoints}",
        base_config(&gw.log)
    );
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert_eq!(advertised(gw.addr).await.unwrap(), 50);
}
