//! Every upstream timeout fires with the right status and reason: connect (on a loopback
//! listener whose accept queue is full, so the kernel drops the SYNs), response head, response
//! body stall, upstream write stall, overall request, and the idle timeout of pooled
//! connections. Unprivileged; the SYN-blackhole version with a timing check is in
//! `proxy_privileged_blackhole.rs`.

use std::time::{Duration, Instant};

use gateway_testkit::{
    admin::wait_in_flight,
    http::{client, empty, generated, get, send},
    inprocess::{gateway, log_lines},
    upstream::{Upstream, hold_listener, silent_listener},
};
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;

/// The timeouts below are 300 ms; a response that comes this much later than its timer is
/// late. The rest takes a few ms, but the gateway runs in the test's process, which a loaded
/// machine (CI builds in the background) can hold up for hundreds of ms; what a broken timer
/// would show instead is the upstream's 3 s, or the kernel's connect timeout.
const LATE: Duration = Duration::from_millis(700);

/// `took` is within [`LATE`] after `timeout`, never before it.
fn on_time(took: Duration, timeout: Duration) {
    assert!(
        took >= timeout && took < timeout + LATE,
        "answered after {took:?}, the timer is {timeout:?}"
    );
}

fn single(endpoint: std::net::SocketAddr, timeouts: &str) -> String {
    format!(
        "[router.upstream]\nendpoints = [\"{endpoint}\"]\n[router.upstream.retry]\nmax_retries = 0\n[router.upstream.timeouts]\n{timeouts}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_504_connect_timeout() {
    let silent = silent_listener();
    let gw = gateway(
        "connect-timeout",
        &single(silent.addr, "connect_timeout_ms = 300"),
    )
    .await;
    let start = Instant::now();
    let got = get(&client(), gw.addr, "/").await;
    let took = start.elapsed();
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "connect_timeout");
    assert_eq!(got.header("x-gateway-endpoint"), silent.addr.to_string());
    assert_eq!(got.header("x-gateway-attempts"), "1");
    assert!(
        got.body
            .contains(&format!("connect timeout to {} after 300 ms", silent.addr)),
        "{}",
        got.body
    );
    on_time(took, Duration::from_millis(300));
    let l = &log_lines(&gw.log, 1)[0];
    assert_eq!(l["error"], "connect_timeout");
    assert_eq!(l["status"], 504);
    assert!(
        l["cookies"][0].as_u64().unwrap() > 0,
        "the attempt carries its SO_COOKIE: {l}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_is_504_response_timeout() {
    let up = Upstream::start("slow").await;
    let gw = gateway(
        "response-timeout",
        &single(up.addr, "response_timeout_ms = 300"),
    )
    .await;
    let start = Instant::now();
    let got = get(&client(), gw.addr, "/delay/3000").await;
    let took = start.elapsed();
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "response_timeout");
    assert_eq!(got.header("x-gateway-endpoint"), up.addr.to_string());
    assert!(
        got.body
            .contains(&format!("no response from {} within 300 ms", up.addr)),
        "{}",
        got.body
    );
    on_time(took, Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_is_504_request_timeout() {
    let up = Upstream::start("slow").await;
    let gw = gateway(
        "request-timeout",
        &single(
            up.addr,
            "response_timeout_ms = 5000\nrequest_timeout_ms = 300",
        ),
    )
    .await;
    let got = get(&client(), gw.addr, "/delay/3000").await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "request_timeout");
    assert!(
        got.body.contains(&format!(
            "no response from {} (waiting for the response head) within the request timeout of 300 ms",
            up.addr
        )),
        "{}",
        got.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_response_body_is_cut_off_and_logged() {
    let up = Upstream::start("staller").await;
    let gw = gateway("body-stall", &single(up.addr, "response_timeout_ms = 300")).await;
    let resp = client()
        .request(
            Request::get(format!("http://{}/stall/3000", gw.addr))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    // The head was already sent: the client sees 200, then the body breaks off.
    assert_eq!(resp.status(), StatusCode::OK);
    let start = Instant::now();
    let body = resp.into_body().collect().await;
    let took = start.elapsed();
    assert!(body.is_err(), "the body must not complete");
    // The stall timer started when the gateway read the first chunk, a moment before the
    // client saw the head.
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(300) + LATE,
        "cut off after {took:?}, the timer is 300 ms"
    );
    let l = &log_lines(&gw.log, 1)[0];
    assert_eq!(l["error"], "response_timeout", "{l}");
    assert_eq!(l["status"], 200);
    // Counted under its 200, and as a response cut short.
    let admin = gw.handle.admin_addr().expect("admin listener");
    let m = get(&client(), admin, "/metrics").await.body;
    let value = |name, labels| gateway_testkit::admin::value(&m, name, labels);
    assert_eq!(value("gateway_requests_total", &[("status", "200")]), 1.0);
    assert_eq!(
        value(
            "gateway_responses_incomplete_total",
            &[("reason", "response_timeout")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_stops_reading_is_504_upstream_write_timeout() {
    let hold = hold_listener().await;
    let gw = gateway(
        "write-timeout",
        &single(hold.addr, "write_timeout_ms = 300"),
    )
    .await;
    // 256 MiB: far more than the loopback socket buffers between gateway and upstream.
    let req = Request::post(format!("http://{}/sink", gw.addr))
        .body(generated(256 << 20))
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "upstream_write_timeout");
    assert!(
        got.body.contains("stopped reading the request for 300 ms"),
        "{}",
        got.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_after_idle_timeout() {
    let up = Upstream::start("up").await;
    // Adaptive deadlines off: their warm-up probes open connections this test would count.
    let gw = gateway(
        "idle",
        &single(
            up.addr,
            "idle_timeout_ms = 1000\nadaptive_connect_deadline = false",
        ),
    )
    .await;
    // Idle time is what this test is about, so it waits on the clock: a tenth of the idle
    // timeout keeps the connection (with 900 ms to spare for a busy machine), the idle timeout
    // and a half does not.
    let c = client();
    get(&c, gw.addr, "/").await;
    get(&c, gw.addr, "/").await;
    assert_eq!(
        up.connections(),
        1,
        "back-to-back requests share a pooled connection"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    get(&c, gw.addr, "/").await;
    assert_eq!(
        up.connections(),
        1,
        "a connection idle for a tenth of the idle timeout is reused"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    get(&c, gw.addr, "/").await;
    assert_eq!(
        up.connections(),
        2,
        "an expired idle connection is not reused"
    );
}

/// A client that gives up before its response begins (it closes its connection while the
/// upstream is slow) is logged and counted as `499` and `aborted`, instead of vanishing: these
/// are the requests an operator chasing a slow upstream most needs to see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_is_logged_and_counted_as_499() {
    use tokio::io::AsyncWriteExt as _;

    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_secs(3));
    let gw = gateway("client-gone", &single(up.addr, "")).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let admin = gw.handle.admin_addr().expect("admin listener");
    let upstream = up.addr;
    tokio::task::block_in_place(|| wait_in_flight(admin, "default", upstream));
    let gave_up = Instant::now();
    drop(s);
    let l = &log_lines(&gw.log, 1)[0];
    assert!(
        gave_up.elapsed() < Duration::from_secs(2),
        "logged when the client left, not when the upstream answered"
    );
    assert_eq!(l["status"], 499, "{l}");
    assert_eq!(l["aborted"], true, "{l}");
    assert_eq!(l["path"], "/slow", "{l}");
    assert_eq!(l["endpoints"][0], up.addr.to_string(), "{l}");
    let metrics = get(&client(), admin, "/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|m| m.starts_with("gateway_requests_total{") && m.contains("status=\"499\"")),
        "{metrics}"
    );
}

/// curl POSTing what `feed` writes to its stdin (`-T -`, chunked), as `feed` writes it, to
/// `url`; the answer's head and body (`-i`). The pipe stays open until `feed` returns.
fn curl_upload(
    url: String,
    feed: impl FnOnce(&mut std::process::ChildStdin) + Send + 'static,
) -> String {
    curl_upload_with(url, &[], feed)
}

/// [`curl_upload`] with more `headers` (`-H` values).
fn curl_upload_with(
    url: String,
    headers: &[&str],
    feed: impl FnOnce(&mut std::process::ChildStdin) + Send + 'static,
) -> String {
    use std::process::{Command, Stdio};
    let mut curl = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "15",
            "-H",
            "Expect:",
            "-X",
            "POST",
            "-T",
            "-",
        ])
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let mut stdin = curl.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || feed(&mut stdin));
    let out = curl.wait_with_output().expect("curl");
    feeder.join().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer to a request whose client's body timed out: `408 client_body_timeout`, or, for
/// one sent with `headers` (a gRPC content type), the gRPC status (HTTP 200, DEADLINE_EXCEEDED).
fn assert_body_timeout(answer: &str, headers: &[&str]) {
    let want = if headers.is_empty() {
        "HTTP/1.1 408"
    } else {
        "HTTP/1.1 200"
    };
    assert!(answer.starts_with(want), "{headers:?}: {answer}");
    assert!(answer.contains("client_body_timeout"), "{answer}");
    // The rest of the body may still come: the connection closes, and says so, the gRPC
    // status over HTTP/1 too (it did not).
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{headers:?}: {answer}"
    );
}

/// Routes to `up`: `/streamed/` with `request_buffering = false` (the body goes upstream as
/// it comes), anything else read ahead (the default).
fn body_routes(up: &Upstream, timeouts: &str) -> String {
    let routes = "[[routes]]\npath_prefix = \"/streamed/\"\nrewrite_prefix = \"/\"\ncluster = \"default\"\nrequest_buffering = false\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"default\"\n";
    format!("{}\n{routes}", single(up.addr, timeouts))
}

/// A client that stops sending its body is `408 client_body_timeout` once it has sent
/// nothing for the request timeout, and that is not counted against the endpoint: read ahead
/// (the default) with no upstream ever asked; on a route with `request_buffering = false`,
/// while the upstream waits for the body. curl uploads from a pipe that goes quiet after
/// 500 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_is_408_client_body_timeout() {
    let up = Upstream::start("sink").await;
    let gw = gateway("body-stall", &body_routes(&up, "request_timeout_ms = 1000")).await;
    // The third claims to be a gRPC call over HTTP/1, where gRPC does not work: the same
    // client's stall (its answer a gRPC status), not the upstream's request timeout.
    let grpc = &["Content-Type: application/grpc"][..];
    let cases = [
        ("/sink", &[][..], "no upstream had been asked", 0),
        (
            "/streamed/sink",
            &[][..],
            "the upstream was waiting for it",
            1,
        ),
        ("/streamed/sink", grpc, "the upstream was waiting for it", 2),
    ];
    for (path, headers, _, hits) in cases {
        let url = format!("http://{}{path}", gw.addr);
        let answer = tokio::task::spawn_blocking(move || {
            curl_upload_with(url, headers, |pipe| {
                use std::io::Write as _;
                pipe.write_all(&[b'x'; 500]).unwrap();
                pipe.flush().unwrap();
                // Quiet, the pipe open, well past the request timeout.
                std::thread::sleep(Duration::from_secs(4));
            })
        })
        .await
        .unwrap();
        assert_body_timeout(&answer, headers);
        assert_eq!(up.hits(), hits, "requests that reached the upstream");
    }
    for (l, (_, _, said, _)) in log_lines(&gw.log, 3).iter().zip(cases) {
        assert_eq!(l["error"], "client_body_timeout", "{l}");
        let detail = l["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("500 bytes of its request body, then nothing more for the request timeout of 1000 ms"),
            "{l}"
        );
        assert!(detail.contains(said), "{l}");
        // At the request timeout from the last byte, not when the pipe closed at 4 s (curl
        // sends until its input ends).
        let took = l["total_ms"].as_f64().expect("total_ms");
        assert!((1000.0..3000.0).contains(&took), "{l}");
    }
    let admin = gw.handle.admin_addr().expect("admin listener");
    let status = tokio::task::spawn_blocking(move || gateway_testkit::admin::status(admin))
        .await
        .unwrap();
    let ep = gateway_testkit::admin::endpoint(&status, "default", up.addr);
    assert!(
        ep["errors"].get("request_timeout").is_none(),
        "counted against the endpoint: {ep:#}"
    );
}

/// A client that trickles its body (10 bytes every 200 ms, gaps well within the 1 s request
/// timeout) earns 2 ms past the timeout per byte, 500 bytes a second, and so is `408
/// client_body_timeout` after about 1.1 s: it cannot hold its connection and its read-ahead
/// memory for hours (R.U.D.Y.).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trickles_its_body_is_408_client_body_timeout() {
    let up = Upstream::start("sink").await;
    let gw = gateway(
        "body-trickle",
        &body_routes(&up, "request_timeout_ms = 1000"),
    )
    .await;
    // The second claims to be a gRPC call, whose body has no minimum rate and is not read
    // ahead: over HTTP/1 to an HTTP/1 cluster, where gRPC does not work, it is not taken for one.
    for headers in [&[][..], &["Content-Type: application/grpc"][..]] {
        let url = format!("http://{}/sink", gw.addr);
        let answer = tokio::task::spawn_blocking(move || {
            curl_upload_with(url, headers, gateway_testkit::http::trickle)
        })
        .await
        .unwrap();
        assert_body_timeout(&answer, headers);
        assert_eq!(up.hits(), 0, "read ahead: no upstream asked");
    }
    for l in log_lines(&gw.log, 2) {
        assert_eq!(l["error"], "client_body_timeout", "{l}");
        assert!(
            l["detail"]
                .as_str()
                .is_some_and(|d| d.contains("slower than 500 bytes a second")),
            "{l}"
        );
        let took = l["total_ms"].as_f64().expect("total_ms");
        assert!((1000.0..2500.0).contains(&took), "{l}");
    }
}

/// An upload that keeps coming is not cut by the request timeout, however long it takes: the
/// timeout runs from the body's last byte so far (as Envoy's route timeout starts at the end
/// of the request). curl sends 1 KiB every 50 ms from a pipe, for three times the 1 s request
/// timeout: a body under the read-ahead, one over it (read ahead, then streamed), and one on a
/// route that streams it all. Before, each was `408 client_body_timeout` at 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_keeps_coming_outlasts_the_request_timeout() {
    let up = Upstream::start("sink").await;
    let gw = gateway("body-slow", &body_routes(&up, "request_timeout_ms = 1000")).await;
    for (path, chunk) in [
        ("/sink", 512usize),
        ("/sink", 4096),
        ("/streamed/sink", 4096),
    ] {
        let url = format!("http://{}{path}", gw.addr);
        let start = Instant::now();
        let answer = tokio::task::spawn_blocking(move || {
            curl_upload(url, move |pipe| {
                use std::io::Write as _;
                for _ in 0..60 {
                    // A curl that got its answer early has closed the pipe: its answer says why.
                    if pipe
                        .write_all(&vec![b'x'; chunk])
                        .and_then(|()| pipe.flush())
                        .is_err()
                    {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .await
        .unwrap();
        let took = start.elapsed();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{path}, {chunk}-byte chunks after {took:?}: {answer}"
        );
        // The sink answers with the length it read.
        assert!(answer.ends_with(&(60 * chunk).to_string()), "{answer}");
        assert!(took >= Duration::from_millis(2900), "{took:?}");
    }
    // Once the body is in, the request timeout still bounds the wait for the response head.
    let url = format!("http://{}/delay/3000", gw.addr);
    let answer = tokio::task::spawn_blocking(move || {
        curl_upload(url, |pipe| {
            use std::io::Write as _;
            pipe.write_all(b"done").unwrap();
        })
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("request timeout of 1000 ms"), "{answer}");
}
