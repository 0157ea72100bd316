//! SIGTERM / SIGINT: the gateway stops accepting, reports draining on /healthz, completes the
//! requests in flight, and exits 0; a request longer than the grace period is cut off when it
//! ends; an HTTP/2 connection gets GOAWAY, whether or not it has sent a request yet. Runs the
//! built binary.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{metrics, value, wait_for, wait_in_flight},
    config::write_config,
    gateway_bin,
    http::{client, empty, get, h2c_connection, h2c_over},
    process::GatewayProcess,
    tempdir::temp_dir,
    upstream::Upstream,
};
use http::StatusCode;

/// Exiting takes this long at most once nothing is left to wait for: the signal, closing the
/// listeners, detaching the kernel observer and leaving its cgroup (as root), process exit.
/// A few hundred ms on a quiet machine; the bound leaves room for a loaded one (CI builds in
/// the background) while staying well under what each test rules out: waiting out a 5 s grace
/// period (twice this is under it), or a 10 s upstream.
const EXIT: Duration = Duration::from_millis(2000);

/// Waits until the gateway's `/status` shows a request in flight to `upstream`.
fn config(up: &Upstream) -> String {
    format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr)
}

async fn spawn(up: &Upstream, grace_ms: u64, label: &str) -> GatewayProcess {
    spawn_logging(up, grace_ms, label).0
}

/// [`spawn`], and the path of its access log.
fn spawn_logging(up: &Upstream, grace_ms: u64, label: &str) -> (GatewayProcess, PathBuf) {
    let dir = temp_dir(label);
    let path = write_config(&dir, &config(up));
    // base_config sets shutdown_grace_ms = 5000; override it.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "shutdown_grace_ms = 5000",
        &format!("shutdown_grace_ms = {grace_ms}"),
    );
    std::fs::write(&path, text).unwrap();
    (
        GatewayProcess::spawn(gateway_bin!().run(&path)),
        dir.join("access.log"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_in_flight_requests_then_exits() {
    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_millis(1000));
    let mut gw = spawn(&up, 5000, "drain").await;
    let c = client();
    let (c1, addr) = (c.clone(), gw.addr);
    let admin = gw.admin;
    let sent = Instant::now();
    let in_flight = tokio::spawn(async move { get(&c1, addr, "/").await });
    let upstream = up.addr;
    tokio::task::block_in_place(|| wait_in_flight(admin, "default", upstream));
    gw.signal(libc::SIGTERM);
    gw.expect_log("draining", Duration::from_secs(2));

    // New connections are refused, and the admin health check says draining.
    let refused_by = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(
            Instant::now() < refused_by,
            "listener still open while draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = get(&client(), admin, "/healthz").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);

    let got = in_flight.await.unwrap();
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.body, "up");
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(5))).expect("exited");
    let took = sent.elapsed();
    assert!(status.success(), "{status:?}");
    // The upstream answers 1000 ms after it got the request: the gateway exits after that,
    // and promptly.
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1000) + EXIT,
        "exited {took:?} after the request was sent; the upstream answers after 1000 ms"
    );
    gw.wait_output(Duration::from_secs(5));
    assert!(gw.text().contains("drained; exiting"), "{}", gw.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_bounds_the_drain() {
    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_millis(10_000));
    let (mut gw, access_log) = spawn_logging(&up, 300, "grace");
    let c = client();
    let (c1, addr) = (c.clone(), gw.addr);
    let in_flight = tokio::spawn(async move {
        c1.request(
            http::Request::get(format!("http://{addr}/"))
                .body(empty())
                .unwrap(),
        )
        .await
    });
    let (admin, upstream) = (gw.admin, up.addr);
    tokio::task::block_in_place(|| wait_in_flight(admin, "default", upstream));
    let t0 = Instant::now();
    gw.signal(libc::SIGINT);
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(5))).expect("exited");
    let took = t0.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(300) + EXIT,
        "exit {took:?} after SIGINT, the grace period is 300 ms"
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the request longer than the grace period is cut off"
    );
    gw.wait_output(Duration::from_secs(5));
    assert!(gw.text().contains("grace period over"), "{}", gw.text());
    // Logged as a request that got no response (499, aborted), and as the gateway's doing,
    // not its client's.
    let l = &gateway_testkit::inprocess::log_lines(&access_log, 1)[0];
    assert_eq!(
        (&l["status"], &l["aborted"]),
        (&serde_json::json!(499), &serde_json::json!(true)),
        "{l}"
    );
    assert!(
        l["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("dropped by the gateway: the drain's grace period")),
        "{l}"
    );
}

/// A response under way when the grace period runs out is cut off by the gateway, not by its
/// client: curl has the head and the first chunk of a body that stalls, and the access log
/// says `incomplete: "shutdown"` (the reason `gateway_responses_incomplete_total` counts it
/// under; it was `client_closed`, as if the client had gone away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_off_when_the_grace_period_ends_is_incomplete_by_shutdown() {
    use std::io::BufRead as _;
    let up = Upstream::start("up").await;
    let (mut gw, access_log) = spawn_logging(&up, 300, "grace-cut");
    let mut curl = std::process::Command::new("curl")
        .args(["-sS", "-N", &format!("http://{}/stall/10000", gw.addr)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("curl");
    let mut body = std::io::BufReader::new(curl.stdout.take().unwrap());
    let mut first = String::new();
    tokio::task::block_in_place(|| body.read_line(&mut first)).unwrap();
    assert_eq!(first, "first chunk\n");
    gw.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(5))).expect("exited");
    assert!(status.success(), "{status:?}");
    let curl_status = tokio::task::block_in_place(|| curl.wait()).unwrap();
    assert!(!curl_status.success(), "curl got the stalled body whole?");
    let log = gateway_testkit::inprocess::log_lines(&access_log, 1);
    let l = &log[0];
    assert_eq!(
        (&l["path"], &l["status"], &l["aborted"], &l["incomplete"]),
        (
            &serde_json::json!("/stall/10000"),
            &serde_json::json!(200),
            &serde_json::json!(true),
            &serde_json::json!("shutdown")
        ),
        "{l}"
    );
}

/// An HTTP/2 client connection (prior knowledge, one of hyper's) with a request in flight
/// when SIGTERM comes: the request completes, the connection gets GOAWAY and is closed, the
/// gateway exits once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_gets_goaway_and_its_stream_completes() {
    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_millis(1000));
    let mut gw = spawn(&up, 5000, "drain-h2").await;
    let (mut sender, conn) = h2c_connection(gw.addr).await;
    let req = http::Request::get(format!("http://{}/", gw.addr))
        .body(empty())
        .unwrap();
    let in_flight = tokio::spawn(sender.send_request(req));
    let (admin, upstream) = (gw.admin, up.addr);
    tokio::task::block_in_place(|| wait_in_flight(admin, "default", upstream));
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    let resp = in_flight
        .await
        .unwrap()
        .expect("the stream in flight completes");
    assert_eq!(resp.status(), StatusCode::OK);
    // GOAWAY, then the connection closed by the gateway: hyper's connection future ends.
    let ended = tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the HTTP/2 connection is closed after the drain's GOAWAY")
        .unwrap();
    assert!(ended.is_ok(), "closed cleanly: {ended:?}");
    assert!(
        sender.is_closed(),
        "no new stream on a connection that got GOAWAY"
    );
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(5))).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(1000) + EXIT,
        "exited {:?} after SIGTERM; the upstream answers 1000 ms after the request",
        t0.elapsed()
    );
}

/// An HTTP/2 client connection (prior knowledge) that has sent no request when SIGTERM comes
/// gets GOAWAY at once: the gateway exits without waiting out the grace period for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_without_a_request_gets_goaway_at_the_drain() {
    let up = Upstream::start("up").await;
    let gw = spawn(&up, 5000, "drain-h2-quiet").await;
    let (sender, conn) = h2c_connection(gw.addr).await;
    // Served as HTTP/2 (its preface read), no longer waiting for its first bytes.
    let admin = gw.admin;
    tokio::task::block_in_place(|| {
        wait_for("the connection served as HTTP/2", || {
            let m = metrics(admin);
            let open = value(&m, "gateway_client_connections", &[]);
            let waiting = value(&m, "gateway_client_connections_parked", &[]);
            (open == 1.0 && waiting == 0.0).then_some(()).ok_or(m)
        })
    });
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    closed_by_goaway_then_exits(gw, t0, (sender, conn), "the quiet one").await;
}

/// The HTTP/2 connection (`what`) is closed cleanly within 3 s of SIGTERM at `t0`, and the
/// gateway then exits 0 without waiting out the 5 s grace period: nothing was in flight.
async fn closed_by_goaway_then_exits(
    mut gw: GatewayProcess,
    t0: Instant,
    (sender, conn): (
        hyper::client::conn::http2::SendRequest<gateway_testkit::http::Body>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ),
    what: &str,
) {
    let ended = tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .unwrap_or_else(|_| panic!("{what}: the HTTP/2 connection is closed at the drain"))
        .unwrap();
    assert!(
        ended.is_ok(),
        "{what}: closed with GOAWAY, cleanly: {ended:?}"
    );
    drop(sender);
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(8))).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < EXIT * 2,
        "exited {:?} after SIGTERM; the grace period is 5 s and nothing was in flight",
        t0.elapsed()
    );
}

/// A connection accepted before SIGTERM whose HTTP/2 preface comes only after the drain began
/// gets GOAWAY as soon as it is served, as if it had been open then: it used to miss the
/// drain's change (its task started after it) and hold the gateway for the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_starts_during_the_drain_gets_goaway() {
    let up = Upstream::start("up").await;
    let gw = spawn(&up, 5000, "drain-h2-late").await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let admin = gw.admin;
    tokio::task::block_in_place(|| {
        wait_for("accepted, waiting for its first bytes", || {
            let m = metrics(admin);
            let waiting = value(&m, "gateway_client_connections_parked", &[]);
            (waiting == 1.0).then_some(()).ok_or(m)
        })
    });
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    // The drain has begun once the listener is closed (the log line comes just before).
    let refused_by = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(Instant::now() < refused_by, "listener still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h2 = h2c_over(tcp).await;
    closed_by_goaway_then_exits(gw, t0, h2, "the one that started during the drain").await;
}
