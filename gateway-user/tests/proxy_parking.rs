//! Idle plain HTTP/1 client connections are parked (held as a bare socket, without hyper's
//! buffers) and served again on the same socket when the client sends: counted in
//! `gateway_client_connections_parked`; one whose last request had a body is not parked; part
//! of a head sent across the park is kept; pipelined
//! requests are all answered; a parked connection is closed at the header-read timeout as an
//! idle one was before (at most a second later); a connection parked after a request upgrades to a WebSocket (Python's
//! `websockets` as the server) and echoes. The memory this saves is measured in
//! `proxy_overload`.
//!
//! Unprivileged: loopback only.

use std::time::{Duration, Instant};

use gateway_testkit::{
    http::{client, get, read_message},
    inprocess::{InProcess, gateway},
    peers::*,
    tempdir::temp_dir,
    upstream::Upstream,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// The gateway parks a connection quiet for 1 s within 2 s (`server::park::PARK_AFTER`).
const PARKED_WITHIN: Duration = Duration::from_millis(2600);

async fn metric(gw: &InProcess, name: &str) -> f64 {
    let admin = gw.handle.admin_addr().expect("admin listener");
    let got = get(&client(), admin, "/metrics").await;
    got.body
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn parked(gw: &InProcess) -> f64 {
    metric(gw, "gateway_client_connections_parked").await
}

/// Waits until `n` connections are parked; how long that took. It fails after
/// [`PARKED_WITHIN`] and 3 s more, the room a loaded machine needs (the gateway runs in this
/// process); a check that a park does not happen still waits only `PARKED_WITHIN`.
async fn wait_parked(gw: &InProcess, n: f64) -> Duration {
    let start = Instant::now();
    let limit = PARKED_WITHIN + Duration::from_secs(3);
    while parked(gw).await != n {
        assert!(
            start.elapsed() < limit,
            "{n} parked connections expected within {limit:?}, have {}",
            parked(gw).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// One response (head and a `content-length` body) from `s`; its head.
async fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    tokio::time::timeout(Duration::from_secs(5), read_message(s, buf))
        .await
        .expect("a response within 5 s")
        .unwrap_or_else(|| panic!("closed; read so far: {}", String::from_utf8_lossy(buf)))
}

const GET: &[u8] = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n";

async fn plain(label: &str, up: &Upstream, extra: &str) -> InProcess {
    gateway(
        label,
        &format!(
            "{extra}\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_parked_and_served_again_on_the_same_socket() {
    let up = Upstream::start("up").await;
    let gw = plain("park-again", &up, "").await;
    // A connection that never sent a byte is parked from the start.
    let mut quiet = TcpStream::connect(gw.addr).await.unwrap();
    wait_parked(&gw, 1.0).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    // Timed from before the request: the connection is quiet only after its answer, which
    // this task (on the gateway's runtime) may read a moment late.
    let sent = Instant::now();
    s.write_all(GET).await.unwrap();
    assert!(response(&mut s, &mut buf).await.starts_with("HTTP/1.1 200"));
    wait_parked(&gw, 2.0).await;
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "parked {took:?} after the request, before the connection was quiet for a second"
    );
    for _ in 0..3 {
        s.write_all(GET).await.unwrap();
        let head = response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        wait_parked(&gw, 2.0).await;
    }
    quiet.write_all(GET).await.unwrap();
    let mut qbuf = Vec::new();
    assert!(
        response(&mut quiet, &mut qbuf)
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(up.hits(), 5);
    // Each request came on its own socket: no reconnect.
    assert_eq!(
        metric(&gw, "gateway_client_connections").await,
        2.0,
        "both client connections are still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_across_a_park_and_pipelined_requests_are_answered() {
    let up = Upstream::start("up").await;
    let gw = plain("park-carry", &up, "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(GET).await.unwrap();
    response(&mut s, &mut buf).await;
    wait_parked(&gw, 1.0).await;
    // Half a head wakes the connection; it is not parked while the rest has not come (hyper
    // holds the half; the gateway would otherwise try after 1-2 s).
    s.write_all(b"GET /b HTTP/1.1\r\nho").await.unwrap();
    // Nothing to wait for: a park that does not happen shows in no count.
    tokio::time::sleep(PARKED_WITHIN).await;
    assert_eq!(parked(&gw).await, 0.0);
    s.write_all(b"st: x\r\n\r\n").await.unwrap();
    let head = response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    wait_parked(&gw, 1.0).await;
    // Three requests in one write, after a park.
    s.write_all(&GET.repeat(3)).await.unwrap();
    for _ in 0..3 {
        let head = response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    assert_eq!(up.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_at_the_header_read_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(3000);
    let up = Upstream::start("up").await;
    let gw = plain(
        "park-timeout",
        &up,
        &format!(
            "[router.downstream]\nheader_read_timeout_ms = {}",
            TIMEOUT.as_millis()
        ),
    )
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    // From before the request: the connection goes quiet after its answer.
    let idle = Instant::now();
    s.write_all(GET).await.unwrap();
    response(&mut s, &mut buf).await;
    wait_parked(&gw, 1.0).await;
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(TIMEOUT * 2, s.read(&mut byte))
        .await
        .expect("closed by the gateway")
        .unwrap_or(0);
    let took = idle.elapsed();
    assert_eq!(n, 0, "closed, not answered");
    // The header-read timeout runs from when the connection went quiet; parking notices that
    // within a second, so the close comes at most a second later than hyper's would have (and
    // up to a second more for timers on a machine loaded by the rest of the suite).
    assert!(
        took >= TIMEOUT - Duration::from_millis(50)
            && took <= TIMEOUT + Duration::from_millis(2000),
        "closed after {took:?}, the timeout is {TIMEOUT:?}"
    );
    assert_eq!(parked(&gw).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_upgrades_to_a_websocket() {
    let server = serve_python(
        &temp_dir("park-ws-peer"),
        "ws_server.py",
        WS_ECHO_SERVER,
        &[],
    );
    let up = Upstream::start("up").await;
    let gw = gateway(
        "park-ws",
        &format!(
            "[[routes]]\npath_prefix = \"/ws\"\ncluster = \"ws\"\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"plain\"\n\n\
             [clusters.ws]\nendpoints = [\"{}\"]\n\n[clusters.plain]\nendpoints = [\"{}\"]\n",
            server.addr(),
            up.addr
        ),
    )
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(GET).await.unwrap();
    response(&mut s, &mut buf).await;
    wait_parked(&gw, 1.0).await;
    s.write_all(
        b"GET /ws/chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    // A masked text frame "hi" (RFC 6455 section 5.2), echoed unmasked.
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x82];
    frame.extend_from_slice(&mask);
    frame.extend(b"hi".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    s.write_all(&frame).await.unwrap();
    while buf.len() < 4 {
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("an echo within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the echo");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(&buf[..4], &[0x81, 0x02, b'h', b'i'], "{buf:?}");
    assert_eq!(
        parked(&gw).await,
        0.0,
        "an upgraded connection is not parked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_last_request_had_a_body_is_not_parked() {
    let up = Upstream::start("up").await;
    let gw = plain("park-body", &up, "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    assert!(response(&mut s, &mut buf).await.starts_with("HTTP/1.1 200"));
    // Nothing to wait for: the gateway parks within 2.6 s or not at all.
    tokio::time::sleep(PARKED_WITHIN).await;
    assert_eq!(
        parked(&gw).await,
        0.0,
        "hyper may not have read a body to its end"
    );
    // Still served; after a request without a body it is parked again.
    s.write_all(GET).await.unwrap();
    assert!(response(&mut s, &mut buf).await.starts_with("HTTP/1.1 200"));
    wait_parked(&gw, 1.0).await;
}
