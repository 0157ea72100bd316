//! Slow start's shares under each policy: an endpoint just back keeps about its percent of the
//! turns it would win, and the turns it gives up spread over the others, not onto its
//! neighbour in the schedule.

use std::{path::Path, time::Duration};

use super::*;
use crate::{proxy::telemetry::Telemetry, signals::UserspaceOnly};

/// Picks `n` times from three endpoints of a cluster with `policy` and a 10-minute slow start,
/// the first just back (10 %); how many each got.
fn shares(policy: &str, n: usize) -> [usize; 3] {
    let text = format!(
        "[router]\nlistener_port = 8080\n[clusters.a]\nendpoints = [\"127.0.0.1:9001\", \
         \"127.0.0.1:9002\", \"127.0.0.1:9003\"]\nlb_policy = \"{policy}\"\n\
         [clusters.a.health]\nslow_start_ms = 600000\n[[routes]]\ncluster = \"a\"\n"
    );
    let spec = crate::config::load_str(&text, Path::new("t.toml"))
        .unwrap()
        .settings
        .clusters["a"]
        .clone();
    let t = Telemetry::new(&UserspaceOnly::default(), Duration::from_secs(30));
    let meter = t.cluster("a");
    let eps: Vec<Arc<Endpoint>> = spec
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 9001 + i as u16));
            Arc::new(Endpoint::new(addr, 1, &spec, 1, &meter))
        })
        .collect();
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
