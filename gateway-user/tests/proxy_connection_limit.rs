//! A cluster whose `max_connections` are all in use (long requests, WebSocket tunnels): a
//! request that finds none free waits, counted in `gateway_upstream_pending_requests` beside
//! `gateway_upstream_connections` and `gateway_upstream_max_connections`, and if none frees
//! up within its request timeout, its `504` says that it waited for a connection. It used to
//! say `no response from <endpoint> (connecting)`, and a black-box audit went after a healthy
//! upstream; nothing showed the limit.

use std::time::Duration;

use gateway_testkit::{
    admin::{metrics, value, wait_for},
    http::{client, get},
    inprocess::{gateway, log_lines},
    upstream::Upstream,
};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_out_a_full_connection_limit_says_so() {
    let up = Upstream::start("up").await;
    let gw = gateway(
        "conn-limit",
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\n\
             [router.upstream.limits]\nmax_connections = 1\n\
             [router.upstream.timeouts]\nresponse_timeout_ms = 10000\n\n\
             [[routes]]\nname = \"long\"\npath_prefix = \"/delay/\"\ncluster = \"default\"\n[routes.timeouts]\nrequest_timeout_ms = 10000\n\n\
             [[routes]]\nname = \"short\"\npath_prefix = \"/\"\ncluster = \"default\"\n[routes.timeouts]\nrequest_timeout_ms = 3000\n",
            up.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let cluster = [("cluster", "default")];
    // The only connection, held for 6 s.
    let addr = gw.addr;
    let long = tokio::spawn(async move { get(&client(), addr, "/delay/6000").await });
    while up.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A second request waits for it, and the wait shows.
    let waiting = tokio::spawn(async move { get(&client(), addr, "/").await });
    tokio::task::spawn_blocking(move || {
        wait_for("one connection held of 1, one request waiting", || {
            let m = metrics(admin);
            let seen = (
                value(&m, "gateway_upstream_connections", &cluster),
                value(&m, "gateway_upstream_max_connections", &cluster),
                value(&m, "gateway_upstream_pending_requests", &cluster),
            );
            if seen == (1.0, 1.0, 1.0) {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        })
    })
    .await
    .unwrap();
    let r = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.body);
    assert!(
        r.body.contains(
            "no response (waiting for a connection: all 1 of the cluster's max_connections in use) within the request timeout of 3000 ms"
        ),
        "{}",
        r.body
    );
    assert_eq!(long.await.unwrap().status, StatusCode::OK);
    let lines = log_lines(&gw.log, 2);
    let timed_out = lines
        .iter()
        .find(|l| l["route"] == "short")
        .expect("the waiting request's line");
    assert_eq!(timed_out["error"], "request_timeout", "{timed_out}");
    // Once the long request is over, nothing waits and the connection is idle (still held).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = tokio::task::spawn_blocking(move || metrics(admin))
        .await
        .unwrap();
    assert_eq!(
        value(&m, "gateway_upstream_pending_requests", &cluster),
        0.0,
        "{m}"
    );
}
