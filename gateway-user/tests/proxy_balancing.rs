//! Load-balancing distribution: round robin (plain and weighted) and least request, with the
//! gateway in-process in front of loopback upstreams.

use std::time::Duration;

use gateway_testkit::{
    http::{client, get},
    inprocess::gateway,
    upstream::Upstream,
};
use http::StatusCode;

/// Adaptive connect deadlines are off here: their warm-up probes open TCP connections of their
/// own, and these tests count the connections that requests use.
fn cluster(policy: &str, endpoints: &[String]) -> String {
    format!(
        "[router.upstream]\nlb_policy = \"{policy}\"\nendpoints = [{}]\n[router.upstream.timeouts]\nadaptive_connect_deadline = false\n",
        endpoints.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let eps: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    let gw = gateway("rr", &cluster("round_robin", &eps)).await;
    let c = client();
    for _ in 0..300 {
        assert_eq!(get(&c, gw.addr, "/").await.status, StatusCode::OK);
    }
    let hits: Vec<usize> = ups.iter().map(Upstream::hits).collect();
    assert_eq!(hits, vec![100, 100, 100]);
    // Keep-alive pooling: sequential requests reuse one connection per endpoint.
    let conns: Vec<usize> = ups.iter().map(Upstream::connections).collect();
    assert_eq!(conns, vec![1, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let heavy = Upstream::start("heavy").await;
    let light = Upstream::start("light").await;
    let eps = vec![
        format!("{{ address = \"{}\", weight = 3 }}", heavy.addr),
        format!("\"{}\"", light.addr),
    ];
    let gw = gateway("wrr", &cluster("round_robin", &eps)).await;
    let c = client();
    for _ in 0..400 {
        get(&c, gw.addr, "/").await;
    }
    assert_eq!((heavy.hits(), light.hits()), (300, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_steers_away_from_a_slow_endpoint() {
    const CLIENTS: usize = 8;
    const EACH: usize = 100;
    let slow = Upstream::start("slow").await;
    let fast = Upstream::start("fast").await;
    slow.set_delay(Duration::from_millis(50));
    let eps = vec![format!("\"{}\"", slow.addr), format!("\"{}\"", fast.addr)];
    let gw = gateway("lr", &cluster("least_request", &eps)).await;
    let c = client();
    // 8 concurrent clients: requests pile up on the slow endpoint, and power of two choices
    // sends new ones to the fast one.
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let c = c.clone();
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                assert_eq!(get(&c, addr, "/").await.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (s, f) = (slow.hits(), fast.hits());
    let n = CLIENTS * EACH;
    assert_eq!(s + f, n);
    // Round robin (or a random pick) would give the slow endpoint half. Two random draws
    // (with replacement) pick it when both land on it (1 in 4) or when it is not busier than
    // the other, which, once it holds the waiting clients, it is not: a quarter on average.
    // Over 800 requests (σ ≈ 12) a third is more than five σ above that.
    eprintln!("least request: fast {f}, slow {s}");
    assert!(
        3 * s < n,
        "fast {f}, slow {s}: the slow endpoint got a third or more"
    );
}
