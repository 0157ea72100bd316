//! Slow start's shares under each policy: an endpoint just back keeps about its percent of the
//! turns it would win, and the turns it gives up spread over the others, not onto its
//! neighbour in the schedule.

use std::{path::Path, time::Duration};

use super::*;
use crate::{proxy::telemetry::Telemetry, signals::UserspaceOnly};

/// Picks `n` times from three endpoints of a cluster with `policy` and a 10-minute slow start,
/// the first just back (10 %); how many each got.
/// Cluster `a` of three endpoints, 127.0.0.1:9001 to :9003, with `tables` (TOML keys of the
/// cluster first, then its sub-tables).
fn three(tables: &str) -> (ClusterSpec, Vec<Arc<Endpoint>>) {
    cluster_of(3, tables)
}

/// Cluster `a` of `n` endpoints, 127.0.0.1:9001 on, with `tables`.
fn cluster_of(n: u16, tables: &str) -> (ClusterSpec, Vec<Arc<Endpoint>>) {
    let list: Vec<String> = (0..n)
        .map(|i| format!("\"127.0.0.1:{}\"", 9001 + i))
        .collect();
    let text = format!(
        "[router]\nlistener_port = 8080\n[clusters.a]\nendpoints = [{}]\n{tables}\
         [[routes]]\ncluster = \"a\"\n",
        list.join(", ")
    );
    let spec = crate::config::load_str(&text, Path::new("t.toml"))
        .unwrap()
        .settings
        .clusters["a"]
        .clone();
    let t = Telemetry::new(&UserspaceOnly::default(), Duration::from_secs(30));
    let meter = t.cluster("a");
    let eps = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 9001 + i));
            Arc::new(Endpoint::new(addr, 1, &spec, 1, &meter))
        })
        .collect();
    (spec, eps)
}

fn shares(policy: &str, n: usize) -> [usize; 3] {
    let (spec, eps) = three(&format!(
        "lb_policy = \"{policy}\"\n[clusters.a.health]\nslow_start_ms = 600000\n"
    ));
    eps[0].health.came_back();
    assert_eq!(eps[0].health.slow_start_percent(spec.health.slow_start), 10);
    let set = Endpoints::new(eps.clone());
    let mut got = [0; 3];
    for _ in 0..n {
        let Ok(ep) = set.pick(&spec, |_| false, (None, true)) else {
            panic!("{policy}: no pick");
        };
        got[usize::from(ep.addr.port() - 9001)] += 1;
    }
    got
}

#[tokio::test]
async fn a_warming_endpoint_keeps_about_its_percent_and_the_rest_spread_evenly() {
    for policy in [
        "round_robin",
        "least_request",
        "peak_ewma",
        "consistent_hash",
    ] {
        let got = shares(policy, 30_000);
        eprintln!("{policy}: {got:?}");
        // A third of the turns, a tenth of them kept: 1,000 of 30,000; the rest evenly.
        assert!((600..=1_500).contains(&got[0]), "{policy}: {got:?}");
        for other in &got[1..] {
            assert!((13_500..=15_300).contains(other), "{policy}: {got:?}");
        }
    }
}

/// Round robin over three endpoints with `max_connections = 30`, the first holding
/// `held` requests: how many of `n` picks each got. A pick is kept (a request that holds its
/// connection) unless `released` (one that ends at once, as on a fast endpoint).
fn round_robin_with(held: u64, n: usize, released: bool) -> [u64; 3] {
    let (spec, eps) =
        three("lb_policy = \"round_robin\"\n[clusters.a.limits]\nmax_connections = 30\n");
    eps[0].in_flight.store(held, Ordering::Relaxed);
    let set = Endpoints::new(eps.clone());
    let mut got = [0; 3];
    for _ in 0..n {
        let Ok(ep) = set.pick(&spec, |_| false, (None, true)) else {
            panic!("no pick");
        };
        got[usize::from(ep.addr.port() - 9001)] += 1;
        if !released {
            ep.in_flight.fetch_add(1, Ordering::Relaxed);
        }
    }
    got
}

#[tokio::test]
async fn an_endpoint_holding_its_share_gives_its_turns_to_the_least_loaded_with_room() {
    // Below its share (10 of 30), plain round robin.
    assert_eq!(round_robin_with(0, 9, false), [3, 3, 3]);
    // At its share: its turns go to the less loaded of the other two, not all to its
    // neighbour in the schedule (12 to 6).
    let got = round_robin_with(10, 18, false);
    assert_eq!(got[0], 0, "{got:?}");
    assert!(got[1].abs_diff(got[2]) <= 2, "{got:?}");
    // Requests that end at once leave the other two equally loaded: its turns are shared at
    // random, not all given to the first listed (2,000 to 1,000).
    let got = round_robin_with(10, 3_000, true);
    assert_eq!(got[0], 0, "{got:?}");
    for other in &got[1..] {
        assert!((1_350..=1_650).contains(other), "{got:?}");
    }
    // Every endpoint at its share or beyond: the least loaded of all, so the one that holds
    // its share gets no more than the others (plain round robin would give it a third).
    let got = round_robin_with(10, 60, false);
    let loads = [got[0] + 10, got[1], got[2]];
    let spread = loads.iter().max().unwrap() - loads.iter().min().unwrap();
    assert!(spread <= 1, "{got:?}");
    assert!(got[0] < 20, "{got:?}");
}

/// Round robin with one endpoint of four ejected: its turns spread over the other three by
/// weight, not all to its neighbour in the schedule (which took twice its share: 1,500, 750,
/// 750 of 3,000 with one of three ejected, a third more with one of four).
#[tokio::test]
async fn an_ejected_endpoints_turns_spread_over_the_others() {
    let (spec, eps) = cluster_of(4, "");
    let now = tokio::time::Instant::now();
    let ev = crate::decide::health::Evidence::Refused;
    eps[1]
        .health
        .observe(ev, now, &spec, true, &|| "RST".to_owned());
    assert!(!eps[1].health.routable());
    let set = Endpoints::new(eps.clone());
    let mut got = [0; 4];
    for _ in 0..3_000 {
        let ep = set.pick(&spec, |_| false, (None, true)).ok().unwrap();
        got[usize::from(ep.addr.port() - 9001)] += 1;
    }
    assert_eq!(got[1], 0, "{got:?}");
    for (i, n) in got.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert!((900..=1_100).contains(n), "endpoint {i}: {got:?}");
    }
}
