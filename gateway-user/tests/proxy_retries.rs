//! Retries and the errors that remain when retrying cannot help: retry on refused to another
//! endpoint (invisible to the client), 502/503 with their reasons, the retry budget, and
//! idempotent-only retries after a response timeout.

use std::time::Duration;

use gateway_testkit::{
    admin::wait_in_flight,
    http::{client, empty, get, send},
    inprocess::{InProcess, gateway, log_lines},
    ports::refused_addr,
    upstream::{Upstream, raw_responder},
};
use http::{Request, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_endpoint_is_retried_on_another_invisibly() {
    let good = Upstream::start("good").await;
    let refused = refused_addr();
    let gw = gateway(
        "retry-refused",
        &format!(
            "[router.upstream]\nendpoints = [\"{refused}\", \"{}\"]\n",
            good.addr
        ),
    )
    .await;
    let c = client();
    for _ in 0..20 {
        let got = get(&c, gw.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert_eq!(got.body, "good");
        assert_eq!(got.headers.get("x-gateway-error"), None);
    }
    assert_eq!(good.hits(), 20);
    let lines = log_lines(&gw.log, 20);
    let retried: Vec<_> = lines.iter().filter(|l| l["retries"] == 1).collect();
    assert!(
        !retried.is_empty(),
        "round robin sends some first attempts to the refused endpoint"
    );
    for l in retried {
        assert_eq!(l["status"], 200);
        assert_eq!(l["endpoints"][0], refused.to_string());
        assert_eq!(l["endpoints"][1], good.addr.to_string());
        assert_eq!(l["attempt_errors"][0], "connect_refused");
        assert_eq!(l["attempt_errors"][1], "-");
        assert_eq!(l["error"], serde_json::Value::Null);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_single_endpoint_is_502_connect_refused() {
    let refused = refused_addr();
    let gw = gateway(
        "refused",
        &format!("[router.upstream]\nendpoints = [\"{refused}\"]\n"),
    )
    .await;
    let got = get(&client(), gw.addr, "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.header("x-gateway-error"), "connect_refused");
    assert_eq!(got.header("x-gateway-endpoint"), refused.to_string());
    assert_eq!(got.header("x-gateway-attempts"), "1");
    assert!(
        got.body
            .starts_with(&format!("502 Bad Gateway: connection refused by {refused}")),
        "{}",
        got.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refusing_is_502_after_trying_each_once() {
    let (a, b) = (refused_addr(), refused_addr());
    let gw = gateway(
        "all-refused",
        &format!("[router.upstream]\nendpoints = [\"{a}\", \"{b}\"]\n"),
    )
    .await;
    let got = get(&client(), gw.addr, "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.header("x-gateway-error"), "connect_refused");
    assert_eq!(got.header("x-gateway-attempts"), "2");
    assert!(
        got.body.contains(&format!("{a} (connect_refused)")),
        "{}",
        got.body
    );
    assert!(
        got.body.contains(&format!("{b} (connect_refused)")),
        "{}",
        got.body
    );
}

/// With one endpoint ejected and the other kept as suspect (the budget), a request to the
/// suspect one that fails finds no endpoint for its retry: it made one attempt and no retry,
/// and the log and the metrics say so (they said `retries: 1` and counted a retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_finds_no_endpoint_is_not_counted() {
    let (a, b) = (refused_addr(), refused_addr());
    let gw = gateway(
        "retry-none-left",
        &format!(
            "[router.upstream]\nendpoints = [\"{a}\", \"{b}\"]\n\
             [router.upstream.health]\nejection_ms = 60000\n"
        ),
    )
    .await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, gw.addr, "/").await.status, StatusCode::BAD_GATEWAY);
    }
    for l in log_lines(&gw.log, 3) {
        let attempts = l["attempts"].as_u64().unwrap();
        assert_eq!(l["retries"].as_u64().unwrap() + 1, attempts, "{l}");
    }
    let last = &log_lines(&gw.log, 3)[2];
    assert_eq!(last["attempts"], 1, "{last}");
    let m = get(&c, gw.handle.admin_addr().unwrap(), "/metrics")
        .await
        .body;
    let retries: f64 = m
        .lines()
        .filter(|l| l.starts_with("gateway_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        retries, 1.0,
        "only the first request's retry went ahead: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejected_endpoints_leave_503_no_healthy_upstream() {
    let refused = refused_addr();
    let gw = gateway(
        "no-healthy",
        &format!(
            "[router.upstream]\nendpoints = [\"{refused}\"]\n[router.upstream.health]\nmax_ejected_percent = 100\nejection_ms = 60000\n"
        ),
    )
    .await;
    let c = client();
    let first = get(&c, gw.addr, "/").await;
    assert_eq!(first.header("x-gateway-error"), "connect_refused");
    let second = get(&c, gw.addr, "/").await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.header("x-gateway-error"), "no_healthy_upstream");
    assert_eq!(second.header("x-gateway-attempts"), "0");
    assert!(
        second
            .body
            .contains("no healthy endpoint in cluster `default` (1 endpoint(s), 1 ejected)"),
        "{}",
        second.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pending_queue_is_503_overloaded() {
    let up = Upstream::start("slow").await;
    // Long enough to hold the connection until the second request is refused, on a loaded
    // machine too.
    up.set_delay(Duration::from_millis(5000));
    let gw = gateway(
        "overloaded",
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\n[router.upstream.limits]\nmax_connections = 1\nmax_pending_requests = 0\n",
            up.addr
        ),
    )
    .await;
    let c = client();
    let (c1, addr) = (c.clone(), gw.addr);
    let busy = tokio::spawn(async move { get(&c1, addr, "/").await });
    // The first request holds the only connection: wait until the gateway has it in flight.
    let (admin, upstream) = (gw.handle.admin_addr().unwrap(), up.addr);
    tokio::task::spawn_blocking(move || wait_in_flight(admin, "default", upstream))
        .await
        .unwrap();
    let got = get(&c, gw.addr, "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.header("x-gateway-error"), "overloaded");
    assert_eq!(busy.await.unwrap().status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_without_response_is_502_upstream_reset() {
    let up = raw_responder(b"").await;
    let gw = gateway(
        "reset",
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    )
    .await;
    let got = get(&client(), gw.addr, "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "upstream_reset");
    assert_eq!(got.header("x-gateway-endpoint"), up.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_response_is_502_invalid_upstream_response() {
    let up = raw_responder(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let gw = gateway(
        "garbage",
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    )
    .await;
    let got = get(&client(), gw.addr, "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
    assert_eq!(got.header("x-gateway-error"), "invalid_upstream_response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_retry_budget_means_no_retry() {
    let good = Upstream::start("good").await;
    let refused = refused_addr();
    let gw = gateway(
        "budget",
        &format!(
            "[router.upstream]\nendpoints = [\"{refused}\", \"{}\"]\n[router.upstream.retry]\nbudget_percent = 0\nmin_retry_concurrency = 0\n[router.upstream.health]\nmax_ejected_percent = 0\n",
            good.addr
        ),
    )
    .await;
    let c = client();
    let mut refused_answers = 0;
    for _ in 0..10 {
        let got = get(&c, gw.addr, "/").await;
        if got.status == StatusCode::BAD_GATEWAY {
            assert_eq!(got.header("x-gateway-error"), "connect_refused");
            assert_eq!(
                got.header("x-gateway-attempts"),
                "1",
                "no retry: the budget is spent"
            );
            refused_answers += 1;
        }
    }
    // The RST makes the endpoint suspect (ejection is off), so later requests prefer the
    // healthy one: exactly one request meets the refusal, and it is not retried.
    assert_eq!(refused_answers, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_is_retried_only_for_idempotent_requests_when_enabled() {
    let (_slow, _fast, gw) = slow_and_fast("retry-timeout").await;
    let c = client();
    for _ in 0..4 {
        let got = get(&c, gw.addr, "/").await;
        assert_eq!(
            got.status,
            StatusCode::OK,
            "GET is retried on the fast endpoint: {}",
            got.body
        );
        assert_eq!(got.body, "fast");
    }
    let mut timeouts = 0;
    for _ in 0..4 {
        let req = Request::post(format!("http://{}/", gw.addr))
            .body(empty())
            .unwrap();
        let got = send(&c, req).await;
        if got.status == StatusCode::GATEWAY_TIMEOUT {
            assert_eq!(got.header("x-gateway-error"), "response_timeout");
            assert_eq!(got.header("x-gateway-attempts"), "1");
            timeouts += 1;
        }
    }
    assert_eq!(timeouts, 2, "POST is never replayed after a timeout");
}

/// `curl -X PUT --data-binary @file URL` with `Expect:` off (so the body follows the head at
/// once), chunked if asked: the status line's code and the body.
fn curl_put(file: &std::path::Path, url: &str, chunked: bool) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "20", "-H", "Expect:", "-X", "PUT"])
        .args(if chunked {
            &["-H", "Transfer-Encoding: chunked"][..]
        } else {
            &[]
        })
        .args(["-w", "\n%{http_code}"])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

/// A body read ahead of the upstream is kept for a retry as the buffer it was read into, and
/// replayed whole: a PUT of 40,000 bytes (curl; with a length, and chunked) that times out on
/// the slow endpoint is answered by the fast one, which read all 40,000 bytes (`/sink` answers
/// the length it read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_read_ahead_is_replayed_whole_after_a_response_timeout() {
    let (_slow, _fast, gw) = slow_and_fast("retry-body").await;
    let file = gw.dir.join("body-40000.bin");
    std::fs::write(&file, vec![b'x'; 40_000]).unwrap();
    let url = format!("http://{}/sink", gw.addr);
    // Whether a request of each kind (with a length, chunked) was retried, read from its log line.
    let mut retried = [false; 2];
    for i in 0..8 {
        let chunked = i % 2 == 1;
        let (file, url) = (file.clone(), url.clone());
        let (code, body) = tokio::task::spawn_blocking(move || curl_put(&file, &url, chunked))
            .await
            .unwrap();
        assert_eq!(code, "200", "{body}");
        assert_eq!(body, "40000", "the fast endpoint read the whole body");
        let lines = log_lines(&gw.log, i + 1);
        let line = &lines[i];
        assert_eq!(line["request_bytes"], 40_000, "{line}");
        if line["attempt_errors"] == serde_json::json!(["response_timeout", "-"]) {
            retried[usize::from(chunked)] = true;
        }
    }
    assert_eq!(
        retried,
        [true, true],
        "round robin tried the slow endpoint first for a body of each kind"
    );
}

/// The copies of bodies kept for retries share `request_buffering_memory_bytes` with what is
/// read ahead. With it at 64 KiB, two PUTs of 40,000 bytes wait on a slow upstream: one body is
/// kept (`gateway_request_retry_copy_bytes` 40,000), the other has no room and is not
/// (`gateway_request_retry_copy_over_budget_total` 1), both are answered, and the bytes are
/// given back when they are. Before, each request kept 64 KiB outside any budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copies_share_the_request_buffering_memory() {
    use gateway_testkit::admin::{metrics, value, wait_for};
    let up = Upstream::start("slow").await;
    // Both PUTs must be waiting on it at once: two curl processes, started together, within
    // this much on a loaded machine too.
    up.set_delay(Duration::from_millis(4000));
    let gw = gateway(
        "retry-copy-budget",
        &format!(
            "[router.downstream]\nrequest_buffering_memory_bytes = 65536\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let read = move |name: &str| value(&metrics(admin), name, &[]);
    let file = gw.dir.join("body-40000.bin");
    std::fs::write(&file, vec![b'x'; 40_000]).unwrap();
    let url = format!("http://{}/sink", gw.addr);
    let puts: Vec<_> = (0..2)
        .map(|_| {
            let (file, url) = (file.clone(), url.clone());
            tokio::task::spawn_blocking(move || curl_put(&file, &url, false))
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        wait_for("one body kept, one over the budget", || {
            let kept = read("gateway_request_retry_copy_bytes");
            let over = read("gateway_request_retry_copy_over_budget_total");
            let ahead = read("gateway_request_read_ahead_bytes");
            match (kept, over, ahead) {
                (40_000.0, 1.0, 0.0) => Ok(()),
                v => Err(format!("(kept, over, read ahead) {v:?}")),
            }
        })
    })
    .await
    .unwrap();
    for put in puts {
        let (code, body) = put.await.unwrap();
        assert_eq!(code, "200", "{body}");
        assert_eq!(body, "40000");
    }
    tokio::task::spawn_blocking(move || {
        wait_for("the kept body given back", || {
            match read("gateway_request_retry_copy_bytes") {
                0.0 => Ok(()),
                v => Err(format!("gateway_request_retry_copy_bytes {v}")),
            }
        })
    })
    .await
    .unwrap();
}

/// The copy kept for a retry is given back once the request has its response, not when its
/// client's body ends: on a route with `request_buffering = false`, a PUT declares 50,000
/// bytes, sends 20,000 and stalls; the upstream answers its head and a first chunk at once and
/// the rest 20 s later (`/stall/`). While the client still holds its body open and the
/// response streams, `gateway_request_retry_copy_bytes` is back to 0 (a long HTTP/2 or gRPC
/// stream's copy held its share of `request_buffering_memory_bytes` until the stream ended,
/// which may be hours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_kept_for_a_retry_is_given_back_with_the_response() {
    use gateway_testkit::admin::{metrics, value, wait_for};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = Upstream::start("up").await;
    let gw = gateway(
        "retry-copy-given-back",
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"default\"\nrequest_buffering = false\n",
            up.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut msg = b"PUT /stall/20000 HTTP/1.1\r\nhost: x\r\ncontent-length: 50000\r\n\r\n".to_vec();
    msg.resize(msg.len() + 20_000, b'a');
    s.write_all(&msg).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
        .await
        .expect("an answer while the body is still open")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tokio::task::spawn_blocking(move || {
        wait_for("the copy given back with the response", || {
            match value(&metrics(admin), "gateway_request_retry_copy_bytes", &[]) {
                0.0 => Ok(()),
                v => Err(format!("gateway_request_retry_copy_bytes {v}")),
            }
        })
    })
    .await
    .unwrap();
    drop(s);
}

/// A gateway over a slow endpoint (3 s to answer) and a fast one, with a response timeout of
/// 300 ms that is retried (and ejects nothing): the upstreams, then the gateway.
async fn slow_and_fast(label: &str) -> (Upstream, Upstream, InProcess) {
    let slow = Upstream::start("slow").await;
    let fast = Upstream::start("fast").await;
    slow.set_delay(Duration::from_millis(3000));
    let gw = gateway(
        label,
        &format!(
            "[router.upstream]\nendpoints = [\"{}\", \"{}\"]\n[router.upstream.timeouts]\nresponse_timeout_ms = 300\n[router.upstream.retry]\non_response_timeout = true\n[router.upstream.health]\nresponse_timeouts_to_eject = 0\n",
            slow.addr, fast.addr
        ),
    )
    .await;
    (slow, fast, gw)
}
