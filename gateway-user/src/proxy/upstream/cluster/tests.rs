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
