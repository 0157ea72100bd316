use std::io;

use gateway_common::Outcome;

use super::*;
use crate::{
    decide::health::{State, Transition},
    proxy::error::ProxyError,
    signals::ConnectEvidence,
};

fn meter() -> (Telemetry, EndpointMeter) {
    let t = Telemetry::new(
        &crate::signals::UserspaceOnly::default(),
        Duration::from_secs(30),
    );
    let e = t
        .cluster("api")
        .endpoint("10.0.0.1:80".parse().unwrap(), Duration::from_millis(250));
    (t, e)
}

fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

#[test]
fn kernel_refusal_counts_attempt_errno_and_so_error() {
    let (t, e) = meter();
    let ev = ConnectEvidence {
        outcome: Outcome::Refused,
        syn_retransmits: 0,
        syn_rtt: None,
        errno: Some(errno::ECONNREFUSED),
        elapsed: Duration::from_micros(80),
        so_error: None,
        refused_by_icmp: false,
    };
    e.connect_failed(&ProxyError::ConnectRefused {
        endpoint: "10.0.0.1:80".parse().unwrap(),
        elapsed: Duration::from_micros(80),
        cookie: 1,
        evidence: Some(ev),
    });
    let text = t.encode();
    for want in [
        "gateway_upstream_attempts_total{cluster=\"api\",endpoint=\"10.0.0.1:80\",outcome=\"refused\"} 1",
        "gateway_upstream_connect_failures_total{cluster=\"api\",endpoint=\"10.0.0.1:80\",errno=\"ECONNREFUSED\"} 1",
        "gateway_socket_errors_total{errno=\"ECONNREFUSED\"} 1",
        "gateway_endpoint_health_state{cluster=\"api\",endpoint=\"10.0.0.1:80\",state=\"healthy\"} 1",
        "gateway_upstream_connect_deadline_seconds{cluster=\"api\",endpoint=\"10.0.0.1:80\"} 0.25",
        "gateway_observer_kernel_signals 0",
        "gateway_observer_mode{mode=\"userspace\"} 1",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
}

#[test]
fn userspace_failures_use_the_proxys_reading() {
    let (t, e) = meter();
    e.connect_failed(&ProxyError::ConnectFailed {
        endpoint: "10.0.0.1:80".parse().unwrap(),
        source: io::Error::from_raw_os_error(libc::EADDRNOTAVAIL),
        cookie: Some(1),
    });
    e.connect_abandoned(None, true);
    e.connect_abandoned(None, false);
    let text = t.encode();
    assert!(text.contains("outcome=\"addr_unavailable\"} 1"), "{text}");
    assert!(text.contains("outcome=\"aborted\"} 2"), "{text}");
    assert!(text.contains("errno=\"ETIMEDOUT\"} 1"), "{text}");
    assert!(text.contains("errno=\"EADDRNOTAVAIL\"} 1"), "{text}");
    assert!(
        line(&text, "gateway_socket_errors_total").is_none(),
        "no SO_ERROR without the kernel:\n{text}"
    );
}

#[test]
fn kernel_handshakes_feed_the_syn_rtt_histogram() {
    let (t, e) = meter();
    e.connected(Some(&ConnectEvidence {
        outcome: Outcome::Established,
        syn_retransmits: 1,
        syn_rtt: Some(Duration::from_micros(1_000_070)),
        errno: None,
        elapsed: Duration::from_secs(1),
        so_error: None,
        refused_by_icmp: false,
    }));
    e.connected(None);
    let text = t.encode();
    assert!(
        text.contains(
            "gateway_upstream_syn_rtt_seconds_count{cluster=\"api\",endpoint=\"10.0.0.1:80\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "gateway_upstream_syn_retransmits_total{cluster=\"api\",endpoint=\"10.0.0.1:80\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("outcome=\"established\"} 2"), "{text}");
}

#[test]
fn ejection_flips_the_state_gauges() {
    let (t, e) = meter();
    e.transition(
        Transition::Ejected {
            reason: crate::decide::health::Reason::Refused,
            duration: Duration::from_secs(1),
        },
        State::Ejected,
    );
    let text = t.encode();
    assert!(text.contains("state=\"ejected\"} 1"), "{text}");
    assert!(text.contains("state=\"healthy\"} 0"), "{text}");
    assert!(
        text.contains("gateway_endpoint_ejections_total{cluster=\"api\",endpoint=\"10.0.0.1:80\",reason=\"refused\"} 1"),
        "{text}"
    );
    drop(e);
    let text = t.encode();
    assert!(
        !text.contains("10.0.0.1:80"),
        "a dropped endpoint takes its series with it:\n{text}"
    );
}

/// Every family that has a series of the endpoint, the route or the cluster.
fn mentions<'a>(text: &'a str, what: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(what))
        .collect()
}

/// A reload builds new meters before the old generation is dropped: the series stay (and
/// keep counting) while any meter uses them, and go with the last one.
#[test]
fn series_of_gone_endpoints_routes_and_clusters_are_removed() {
    let t = Telemetry::new(
        &crate::signals::UserspaceOnly::default(),
        Duration::from_secs(30),
    );
    let old_cluster = t.cluster("api");
    let old_ep = old_cluster.endpoint("10.0.0.1:80".parse().unwrap(), Duration::from_secs(1));
    let old_route = t.route("r", "api");
    old_ep.connect_abandoned(None, true);
    old_ep.transition(
        Transition::Ejected {
            reason: crate::decide::health::Reason::SynUnanswered,
            duration: Duration::from_secs(1),
        },
        State::Ejected,
    );
    old_cluster.retry(RetryReason::ConnectFailed);
    old_cluster.hedge(HedgeResult::Won);
    // A response cut short for each reason the route may count.
    let mut cut = Record::new(
        "127.0.0.1:1".parse().unwrap(),
        http::Method::GET,
        http::Uri::from_static("/"),
        http::Version::HTTP_11,
    );
    cut.status = 200;
    for reason in series::INCOMPLETE_REASONS {
        cut.cut_short = Some(reason);
        old_route.done(&cut, Duration::ZERO);
    }
    assert!(
        t.encode().contains(
            "gateway_responses_incomplete_total{route=\"r\",cluster=\"api\",reason=\"client_closed\"} 1"
        ),
        "{}",
        t.encode()
    );
    let families_before = mentions(&t.encode(), "10.0.0.1:80").len();
    assert!(families_before >= 8, "{}", t.encode());
    // The reload: the same cluster rebuilt, the same endpoint and route.
    let new_cluster = t.cluster("api");
    let new_ep = new_cluster.endpoint("10.0.0.1:80".parse().unwrap(), Duration::from_secs(1));
    let new_route = t.route("r", "api");
    drop((old_ep, old_route, old_cluster));
    let text = t.encode();
    assert_eq!(
        mentions(&text, "10.0.0.1:80").len(),
        families_before,
        "{text}"
    );
    assert!(
        text.contains("errno=\"ETIMEDOUT\"} 1"),
        "counters carry on across a reload:\n{text}"
    );
    new_ep.connect_abandoned(None, true);
    assert!(t.encode().contains("errno=\"ETIMEDOUT\"} 2"));
    // The next reload drops the endpoint, then the cluster and its route.
    drop(new_ep);
    let text = t.encode();
    assert_eq!(mentions(&text, "10.0.0.1:80"), Vec::<&str>::new(), "{text}");
    assert!(!mentions(&text, "cluster=\"api\"").is_empty());
    drop((new_route, new_cluster));
    let text = t.encode();
    assert_eq!(
        mentions(&text, "cluster=\"api\""),
        Vec::<&str>::new(),
        "{text}"
    );
}
