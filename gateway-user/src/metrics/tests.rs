use prometheus_client::encoding::text::encode;

use super::{doc::wire_name, *};

#[test]
fn metrics_md_matches_the_code() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../METRICS.md"))
        .expect("METRICS.md at the repository root");
    assert_eq!(
        committed,
        catalogue_markdown(),
        "METRICS.md is stale: regenerate it (see its header)"
    );
}

/// A registry with a series in every family.
fn populated() -> Registry {
    let mut registry = Registry::default();
    let m = GatewayMetrics::new(&mut registry, LatencyBuckets::reaching(Duration::ZERO));
    let ep = EndpointLabels {
        cluster: "c".into(),
        endpoint: "10.0.0.1:80".into(),
    };
    m.requests
        .get_or_create(&RequestLabels {
            route: "r".into(),
            cluster: "c".into(),
            status: 200,
        })
        .inc();
    m.request_duration
        .get_or_create(&RouteLabels {
            route: "r".into(),
            cluster: "c".into(),
        })
        .observe(0.01);
    m.upstream_attempts
        .get_or_create(&EndpointOutcome {
            cluster: "c".into(),
            endpoint: "e".into(),
            outcome: "refused",
        })
        .inc();
    m.syn_rtt.get_or_create(&ep).observe(0.0001);
    m.syn_retransmits.get_or_create(&ep).inc();
    m.connect_failures
        .get_or_create(&EndpointErrno {
            cluster: "c".into(),
            endpoint: "e".into(),
            errno: "ETIMEDOUT",
        })
        .inc();
    m.socket_errors
        .get_or_create(&ErrnoLabels {
            errno: "ECONNREFUSED",
        })
        .inc();
    m.timeouts
        .get_or_create(&PhaseLabels {
            cluster: "c".into(),
            phase: "connect",
        })
        .inc();
    m.rtos.get_or_create(&ep).inc();
    m.connect_deadline.get_or_create(&ep).set(0.05);
    m.health_state
        .get_or_create(&StateLabels {
            cluster: "c".into(),
            endpoint: "e".into(),
            state: "healthy",
        })
        .set(1);
    m.latency.get_or_create(&ep).set(0.001);
    m.h2_requests_per_connection.get_or_create(&ep).set(10);
    m.slowdowns.get_or_create(&ep).inc();
    m.hash_spills.get_or_create(&ep).inc();
    m.ejections
        .get_or_create(&EndpointReason {
            cluster: "c".into(),
            endpoint: "e".into(),
            reason: "refused",
        })
        .inc();
    m.hedges
        .get_or_create(&HedgeLabels {
            cluster: "c".into(),
            reason: "deadline",
            result: "won",
        })
        .inc();
    m.retries
        .get_or_create(&ClusterReason {
            cluster: "c".into(),
            reason: "connect_failed",
        })
        .inc();
    m.retry_budget_exhausted
        .get_or_create(&ClusterLabels {
            cluster: "c".into(),
        })
        .inc();
    m.observer_kernel.set(1);
    m.observer_mode
        .get_or_create(&ModeLabels { mode: "kernel" })
        .set(1);
    m.events_lost.inc();
    m.tls_handshakes
        .get_or_create(&TlsHandshakeLabels {
            side: "downstream",
            result: "ok",
            version: "TLSv1.3",
        })
        .inc();
    m.tls_handshake_errors
        .get_or_create(&TlsErrorLabels {
            side: "upstream",
            reason: "unknown_ca",
        })
        .inc();
    m.tls_handshake_duration
        .get_or_create(&SideLabels { side: "downstream" })
        .observe(0.001);
    m.tls_certificate_expiry
        .get_or_create(&CertificateLabels {
            role: "server",
            file: "/etc/gateway/tls/cert.pem".into(),
            subject: "api.example.com".into(),
        })
        .set(1_900_000_000);
    m.kernel_anomalies
        .get_or_create(&KindLabels {
            kind: "slot_reused",
        })
        .inc();
    m.client_connections.set(3);
    m.client_rejected
        .get_or_create(&ListenerReason {
            listener: "127.0.0.1:8080".into(),
            reason: "max_connections",
        })
        .inc();
    m.client_proxy_protocol
        .get_or_create(&ResultLabels { result: "v2" })
        .inc();
    m.accept_errors
        .get_or_create(&ListenerErrno {
            listener: "127.0.0.1:8080".into(),
            errno: "EMFILE",
        })
        .inc();
    m.rate_limit_untracked
        .get_or_create(&RouteLabels {
            route: "r".into(),
            cluster: "c".into(),
        })
        .inc();
    m.access_log_lost
        .get_or_create(&ReasonLabels {
            reason: "write_error",
        })
        .inc();
    m.log_lost
        .get_or_create(&ReasonLabels {
            reason: "write_error",
        })
        .inc();
    m.panics.inc();
    m.dns_failures
        .get_or_create(&ClusterLabels {
            cluster: "c".into(),
        })
        .inc();
    for g in [
        &m.upstream_connections,
        &m.upstream_max_connections,
        &m.upstream_pending,
        &m.upgrades_active,
    ] {
        g.get_or_create(&ClusterLabels {
            cluster: "c".into(),
        })
        .set(1);
    }
    m.upgrades
        .get_or_create(&UpgradeEndLabels {
            cluster: "c".into(),
            end: "client_closed",
        })
        .inc();
    m.upgrade_bytes
        .get_or_create(&DirectionLabels {
            cluster: "c".into(),
            direction: "to_client",
        })
        .inc();
    m.kernel_anomaly_logs_suppressed.inc();
    m.worker_connections
        .get_or_create(&WorkerLabels { worker: 0 })
        .set(2);
    m.responses_incomplete
        .get_or_create(&IncompleteLabels {
            route: "r".into(),
            cluster: "c".into(),
            reason: "upstream_reset",
        })
        .inc();
    registry
}

#[test]
fn every_catalogue_entry_is_exported_with_its_labels() {
    let mut text = String::new();
    encode(&mut text, &populated()).unwrap();
    for d in CATALOGUE {
        let wire = wire_name(d);
        let line = text
            .lines()
            .find(|l| l.starts_with(&wire) && !l.starts_with('#'))
            .unwrap_or_else(|| panic!("{wire} not exported:\n{text}"));
        for label in d.labels {
            assert!(
                line.contains(&format!("{label}=")),
                "{wire} lacks label {label}: {line}"
            );
        }
        assert!(
            text.contains(&format!("# TYPE {} {}", family_name(d), d.kind)),
            "{} type:\n{text}",
            d.name
        );
    }
    assert!(
        text.contains("gateway_upstream_syn_rtt_seconds_bucket{le=\"0.00005\""),
        "50 µs lowest bucket:\n{text}"
    );
}

/// The registry ends every help text with a period: ours must not bring a second one.
#[test]
fn help_texts_end_in_exactly_one_period() {
    let mut text = String::new();
    encode(&mut text, &populated()).unwrap();
    let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
    assert!(helps.len() >= CATALOGUE.len(), "{text}");
    for h in helps {
        assert!(h.ends_with('.') && !h.ends_with(".."), "{h}");
    }
}

/// The default request timeout is 30 s: the buckets must go past it, not stop at 13 s.
#[test]
fn buckets_reach_the_longest_timeout() {
    let b = LatencyBuckets::reaching(Duration::from_secs(30));
    let bounds: Vec<f64> = b.bounds().collect();
    assert_eq!(bounds[0], 50e-6);
    assert!(bounds[bounds.len() - 2] < 30.0 && *bounds.last().unwrap() >= 30.0);
    assert!(
        (b.top().as_secs_f64() - 52.4288).abs() < 1e-6,
        "{:?}",
        b.top()
    );
    // Short timeouts keep the 13.1 s floor; an hour is reached too.
    assert_eq!(
        LatencyBuckets::reaching(Duration::from_secs(1))
            .bounds()
            .count(),
        19
    );
    assert!(LatencyBuckets::reaching(Duration::from_secs(3600)).top() >= Duration::from_secs(3600));
    let mut registry = Registry::default();
    let m = GatewayMetrics::new(&mut registry, b);
    m.request_duration
        .get_or_create(&RouteLabels {
            route: "r".into(),
            cluster: "c".into(),
        })
        .observe(29.0);
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            "gateway_request_duration_seconds_bucket{le=\"52.4288\",route=\"r\",cluster=\"c\"} 1"
        ),
        "{text}"
    );
}
