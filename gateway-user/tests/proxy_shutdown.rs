//! SIGTERM / SIGINT: the gateway stops accepting, reports draining on /healthz, completes the
//! requests in flight, and exits 0; a request longer than the grace period is cut off when it
//! ends. Runs the built binary.

mod proxy_support;

use std::time::{Duration, Instant};

use http::StatusCode;
use proxy_support::*;

fn config(up: &Upstream) -> String {
    format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr)
}

async fn spawn(up: &Upstream, grace_ms: u64, label: &str) -> GatewayProcess {
    let dir = temp_dir(label);
    let path = write_config(&dir, &config(up));
    // base_config sets shutdown_grace_ms = 5000; override it.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "shutdown_grace_ms = 5000",
        &format!("shutdown_grace_ms = {grace_ms}"),
    );
    std::fs::write(&path, text).unwrap();
    GatewayProcess::spawn(&path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_in_flight_requests_then_exits() {
    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_millis(1000));
    let mut gw = spawn(&up, 5000, "drain").await;
    let c = client();
    let (c1, addr) = (c.clone(), gw.addr);
    let in_flight = tokio::spawn(async move { get(&c1, addr, "/").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_for_log("draining", Duration::from_secs(2)),
        "{}",
        gw.stderr_text()
    );

    // New connections are refused, and the admin health check says draining.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "listener still open while draining"
    );
    let admin = gw.admin.expect("admin address");
    let health = get(&client(), admin, "/healthz").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);

    let got = in_flight.await.unwrap();
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.body, "up");
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(5))).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "drain took {:?}",
        t0.elapsed()
    );
    assert!(
        gw.stderr_text().contains("drained; exiting"),
        "{}",
        gw.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_bounds_the_drain() {
    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_millis(10_000));
    let mut gw = spawn(&up, 300, "grace").await;
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
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    gw.signal(libc::SIGINT);
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(5))).expect("exited");
    let took = t0.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "exit after {took:?}"
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the request longer than the grace period is cut off"
    );
    assert!(
        gw.stderr_text().contains("grace period over"),
        "{}",
        gw.stderr_text()
    );
}
