//! The ejection budget under concurrent failures: two workers that see both endpoints of a
//! two-endpoint cluster fail at the same moment (a network blip to the whole pool) must not
//! eject both, past `max_ejected_percent` (50 %): one stays in use, fail-open.

use std::{path::Path, sync::Barrier, time::Duration};

use super::*;
use crate::{proxy::telemetry::Telemetry, signals::UserspaceOnly};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_never_eject_past_the_budget() {
    let text = "[router]\nlistener_port = 8080\n[clusters.a]\nendpoints = [\"127.0.0.1:9001\", \
                \"127.0.0.1:9002\"]\n[[routes]]\ncluster = \"a\"\n";
    let spec = crate::config::load_str(text, Path::new("t.toml"))
        .unwrap()
        .settings
        .clusters["a"]
        .clone();
    assert_eq!(spec.health.machine.max_ejected_percent, 50);
    let t = Telemetry::new(&UserspaceOnly::default(), Duration::from_secs(30));
    let signals: Arc<dyn SignalSource> = Arc::new(UserspaceOnly::default());
    let mut emptied = 0;
    const ROUNDS: usize = 300;
    for _ in 0..ROUNDS {
        let c = Cluster::start(spec.clone(), signals.clone(), (1, t.cluster("a")), None).await;
        let eps = c.endpoints();
        let go = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (c, ep, go) = (c.clone(), eps[i].clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    c.report(&ep, Evidence::Refused, &|| "RST".to_owned());
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let routable = eps.iter().filter(|e| e.health.routable()).count();
        assert!(
            routable <= 1,
            "one refused connect each ejects within the budget"
        );
        if routable == 0 {
            emptied += 1;
        }
    }
    assert_eq!(
        emptied, 0,
        "{emptied} of {ROUNDS} clusters were left with no endpoint"
    );
}

/// The spec of cluster `a` with `endpoints` (ports on 127.0.0.1) and `extra` TOML lines.
fn spec_of(ports: &[u16], extra: &str) -> ClusterSpec {
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let text = format!(
        "[router]\nlistener_port = 8080\n[clusters.a]\nendpoints = [{}]\n{extra}\n\
         [clusters.a.health]\nslow_start_ms = 600000\n[[routes]]\ncluster = \"a\"\n",
        list.join(", ")
    );
    crate::config::load_str(&text, Path::new("t.toml"))
        .unwrap()
        .settings
        .clusters["a"]
        .clone()
}

/// A reload that changes a cluster (here: an endpoint added, the policy changed) keeps what was
/// learnt about each host: the ejected endpoint stays ejected, the healthy one takes its full
/// share at once, and only the added one ramps up. The replaced cluster's background tasks
/// stop.
#[tokio::test]
async fn a_replacing_cluster_carries_on_each_hosts_health() {
    let t = Telemetry::new(&UserspaceOnly::default(), Duration::from_secs(30));
    let signals: Arc<dyn SignalSource> = Arc::new(UserspaceOnly::default());
    let old = Cluster::start(
        spec_of(&[9001, 9002], ""),
        signals.clone(),
        (1, t.cluster("a")),
        None,
    )
    .await;
    let eps = old.endpoints();
    old.report(&eps[0], Evidence::Refused, &|| "RST".to_owned());
    assert!(!eps[0].health.routable(), "ejected");

    let new = Cluster::start(
        spec_of(&[9001, 9002, 9003], "lb_policy = \"least_request\""),
        signals,
        (1, t.cluster("a")),
        Some(&old),
    )
    .await;
    let window = new.spec.health.slow_start;
    let eps = new.endpoints();
    assert!(!eps[0].health.routable(), "still ejected after the reload");
    assert_eq!(eps[0].health.state(), crate::decide::health::State::Ejected);
    assert!(eps[1].health.routable());
    assert_eq!(eps[1].health.slow_start_percent(window), 100, "no ramp");
    assert!(
        eps[2].health.slow_start_percent(window) < 100,
        "the added endpoint ramps up"
    );

    assert!(Arc::ptr_eq(
        &old.endpoints()[1].latency,
        &new.endpoints()[1].latency
    ));

    let weak = Arc::downgrade(&old);
    assert!(live(&weak).is_some());
    old.retire();
    assert!(live(&weak).is_none(), "its tasks stop at their next round");
    assert!(live(&Arc::downgrade(&new)).is_some());
    // A retired cluster's requests still report, but never eject: the budget is its
    // successor's to keep.
    let old_eps = old.endpoints();
    old.report(&old_eps[1], Evidence::Refused, &|| "RST".to_owned());
    assert!(eps[1].health.routable(), "kept routable (suspect)");
}

/// What a reload's successor does not keep: ejections past the new set's budget (the healthy
/// endpoint removed) fail open, and a change to the health settings ends an ejection for the
/// new probes to decide.
#[tokio::test]
async fn a_reload_fails_open_past_the_budget_and_rejudges_under_new_checks() {
    let t = Telemetry::new(&UserspaceOnly::default(), Duration::from_secs(30));
    let signals: Arc<dyn SignalSource> = Arc::new(UserspaceOnly::default());
    let start = |spec, previous: Option<Arc<Cluster>>| {
        let (signals, meter) = (signals.clone(), t.cluster("a"));
        async move { Cluster::start(spec, signals, (1, meter), previous.as_deref()).await }
    };
    let old = start(spec_of(&[9001, 9002], ""), None).await;
    old.report(&old.endpoints()[0], Evidence::Refused, &|| "RST".to_owned());
    assert!(!old.endpoints()[0].health.routable());
    let alone = start(spec_of(&[9001], ""), Some(old.clone())).await;
    let ep = &alone.endpoints()[0];
    assert!(ep.health.routable(), "the last endpoint fails open");
    assert_eq!(ep.health.state(), crate::decide::health::State::Suspect);

    let old = start(spec_of(&[9001, 9002], ""), None).await;
    old.report(&old.endpoints()[0], Evidence::Refused, &|| "RST".to_owned());
    let same = start(
        spec_of(&[9001, 9002], "lb_policy = \"least_request\""),
        Some(old.clone()),
    )
    .await;
    let (t0, _) = same.endpoints()[0].health.tick(&same.spec);
    assert_eq!(t0, crate::decide::health::Transition::None, "still ejected");
    let mut rechecked = spec_of(&[9001, 9002], "");
    rechecked.health.machine.probe_interval = Duration::from_millis(50);
    let new = start(rechecked, Some(same.clone())).await;
    let (t1, _) = new.endpoints()[0].health.tick(&new.spec);
    assert_eq!(
        t1,
        crate::decide::health::Transition::Probing,
        "new health settings: probed at once"
    );
}

/// Connections a reload's successor took over stay open whoever else held them lets go (the
/// replaced cluster's endpoint, one its DNS refresh made of the same address), and close with
/// their last owner; closed ones are not taken over.
#[tokio::test]
async fn taken_over_connections_close_with_their_last_owner() {
    let t = Telemetry::new(&UserspaceOnly::default(), Duration::from_secs(30));
    let signals: Arc<dyn SignalSource> = Arc::new(UserspaceOnly::default());
    let start = |previous: Option<Arc<Cluster>>| {
        let (signals, meter) = (signals.clone(), t.cluster("a"));
        let spec = spec_of(&[9001], "");
        async move { Cluster::start(spec, signals, (1, meter), previous.as_deref()).await }
    };
    let old = start(None).await;
    let new = start(Some(old.clone())).await;
    let (was, now) = (old.endpoints()[0].clone(), new.endpoints()[0].clone());
    assert!(Arc::ptr_eq(&was.pool, &now.pool), "taken over");
    let refreshed = successor(old.new_endpoint(was.addr, 2), &old.endpoints(), true);
    for e in [&was, &refreshed, &was] {
        e.close();
    }
    assert!(!now.pool.closed(), "still held by the successor");
    old.retire();
    drop(old);
    assert!(!now.pool.closed());
    now.close();
    assert!(now.pool.closed(), "closed with its last owner");
    let next = start(Some(new.clone())).await;
    let fresh = &next.endpoints()[0];
    assert!(!Arc::ptr_eq(&fresh.pool, &now.pool) && !fresh.pool.closed());
}
