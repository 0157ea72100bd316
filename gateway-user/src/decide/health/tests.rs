use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn rst_and_icmp_eject_at_once() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    for (ev, reason) in [
        (Evidence::Refused, Reason::Refused),
        (Evidence::Unreachable, Reason::Unreachable),
        (Evidence::HostDied, Reason::HostDied),
    ] {
        let mut h = EndpointHealth::new(t);
        assert_eq!(
            h.observe(ev, t, &p, true),
            Transition::Ejected {
                reason,
                duration: DEFAULT_BASE_EJECTION
            }
        );
        assert_eq!(h.state(), State::Ejected);
        assert!(!h.routable());
    }
}

#[test]
fn an_unanswered_syn_makes_it_suspect_and_the_second_ejects() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    assert_eq!(
        h.observe(Evidence::SynUnanswered, t, &p, true),
        Transition::Suspected(Reason::SynUnanswered)
    );
    assert!(h.routable(), "suspect endpoints stay usable, deprioritised");
    assert!(matches!(
        h.observe(Evidence::SynUnanswered, t + ms(60), &p, true),
        Transition::Ejected {
            reason: Reason::SynUnanswered,
            ..
        }
    ));
}

#[test]
fn a_clean_handshake_clears_suspicion() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    h.observe(Evidence::SynUnanswered, t, &p, true);
    assert_eq!(
        h.observe(Evidence::ConnectOk { syn_retransmits: 0 }, t, &p, true),
        Transition::Recovered
    );
    assert_eq!(h.state(), State::Healthy);
    // and the strike count restarted
    assert_eq!(
        h.observe(Evidence::SynUnanswered, t, &p, true),
        Transition::Suspected(Reason::SynUnanswered)
    );
}

#[test]
fn slow_handshakes_deprioritise_but_never_eject() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    for _ in 1..p.slow_handshakes_to_suspect {
        assert_eq!(
            h.observe(Evidence::ConnectOk { syn_retransmits: 1 }, t, &p, true),
            Transition::None
        );
    }
    assert_eq!(
        h.observe(Evidence::ConnectOk { syn_retransmits: 2 }, t, &p, true),
        Transition::Suspected(Reason::Overloaded)
    );
    for _ in 0..10 {
        h.observe(Evidence::ConnectOk { syn_retransmits: 1 }, t, &p, true);
    }
    assert_eq!(h.state(), State::Suspect);
}

#[test]
fn a_slow_backend_is_not_a_network_failure() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    for _ in 1..p.response_timeouts_to_eject {
        assert_eq!(
            h.observe(Evidence::ResponseTimeout, t, &p, true),
            Transition::None
        );
        assert_eq!(h.state(), State::Healthy);
    }
    assert!(matches!(
        h.observe(Evidence::ResponseTimeout, t, &p, true),
        Transition::Ejected {
            reason: Reason::SlowBackend,
            ..
        }
    ));
    let mut off = HealthPolicy {
        response_timeouts_to_eject: 0,
        ..p.clone()
    };
    off.response_timeouts_to_eject = 0;
    let mut h = EndpointHealth::new(t);
    for _ in 0..100 {
        h.observe(Evidence::ResponseTimeout, t, &off, true);
    }
    assert_eq!(h.state(), State::Healthy, "0 disables the rule");
}

#[test]
fn back_off_doubles_up_to_the_cap_and_rise_successes_recover() {
    let p = HealthPolicy {
        max_ejection: ms(5000),
        ..HealthPolicy::default()
    };
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    let mut now = t;
    let mut durations = Vec::new();
    if let Transition::Ejected { duration, .. } = h.observe(Evidence::Refused, now, &p, true) {
        durations.push(duration);
    }
    for _ in 0..4 {
        now = h.ejected_until().unwrap();
        assert_eq!(h.tick(now - ms(1)), Transition::None);
        assert_eq!(h.tick(now), Transition::Probing);
        assert!(!h.routable(), "probing endpoints get probes, not requests");
        match h.probe(Evidence::Refused, now, &p, true) {
            Transition::Ejected { duration, reason } => {
                // What the probe met, not `probe_failed`.
                assert_eq!(reason, Reason::Refused);
                durations.push(duration);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        durations,
        [ms(1000), ms(2000), ms(4000), ms(5000), ms(5000)]
    );
    now = h.ejected_until().unwrap();
    h.tick(now);
    assert_eq!(
        h.probe(Evidence::ConnectOk { syn_retransmits: 0 }, now, &p, true),
        Transition::None
    );
    assert_eq!(
        h.probe(
            Evidence::ConnectOk { syn_retransmits: 0 },
            now + p.probe_interval,
            &p,
            true
        ),
        Transition::Recovered
    );
    assert_eq!(h.state(), State::Healthy);
}

#[test]
fn the_ejection_budget_fails_open_to_suspect() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    assert_eq!(
        h.observe(Evidence::Refused, t, &p, false),
        Transition::EjectionRefused(Reason::Refused)
    );
    assert_eq!(h.state(), State::Suspect);
    assert!(h.routable());
    assert_eq!(
        h.observe(Evidence::Refused, t, &p, false),
        Transition::None,
        "reported once"
    );
}

#[test]
fn ejection_budget_arithmetic() {
    // 3 endpoints at 50 %: one may go, a second would leave 1 of 3 (33 %).
    assert!(may_eject(3, 0, 50));
    assert!(!may_eject(3, 1, 50));
    // never the last one below 100 %; at 100 % the operator asked for it
    assert!(!may_eject(1, 0, 99));
    assert!(may_eject(1, 0, 100));
    assert!(may_eject(2, 0, 50));
    assert!(may_eject(2, 1, 100));
    assert!(!may_eject(2, 2, 100));
    assert!(may_eject(10, 4, 50));
    assert!(!may_eject(10, 5, 50));
}

#[test]
fn evidence_from_requests_in_flight_does_not_move_an_ejected_endpoint() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    h.observe(Evidence::Refused, t, &p, true);
    assert_eq!(
        h.observe(Evidence::ConnectOk { syn_retransmits: 0 }, t, &p, true),
        Transition::None
    );
    assert_eq!(h.state(), State::Ejected);
}

#[test]
fn tls_failures_on_healthy_tcp_eject_only_as_tls_failure_and_a_tcp_handshake_does_not_clear_them() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    for _ in 1..p.tls_failures_to_eject {
        // Every TLS attempt starts with a clean TCP handshake: it must not wipe the strikes.
        h.observe(Evidence::ConnectOk { syn_retransmits: 0 }, t, &p, true);
        assert_eq!(
            h.observe(Evidence::TlsFailed, t, &p, true),
            Transition::None
        );
        assert_eq!(
            h.state(),
            State::Healthy,
            "never suspect: the network is fine"
        );
    }
    h.observe(Evidence::ConnectOk { syn_retransmits: 0 }, t, &p, true);
    assert!(matches!(
        h.observe(Evidence::TlsFailed, t, &p, true),
        Transition::Ejected {
            reason: Reason::TlsFailure,
            ..
        }
    ));
    // A response in between clears them.
    let mut h = EndpointHealth::new(t);
    for _ in 0..10 {
        h.observe(Evidence::TlsFailed, t, &p, true);
        h.observe(Evidence::ResponseOk, t, &p, true);
    }
    assert_eq!(h.state(), State::Healthy);
    let off = HealthPolicy {
        tls_failures_to_eject: 0,
        ..p
    };
    let mut h = EndpointHealth::new(t);
    for _ in 0..100 {
        h.observe(Evidence::TlsFailed, t, &off, true);
    }
    assert_eq!(h.state(), State::Healthy, "0 disables the rule");
}

#[test]
fn only_failures_can_eject() {
    // `Cluster::report` asks the cluster's ejection budget only for failures: evidence that is
    // not one must never eject, whatever the budget says.
    let p = HealthPolicy::default();
    let t = Instant::now();
    for ev in [
        Evidence::ResponseOk,
        Evidence::ConnectOk { syn_retransmits: 0 },
        Evidence::ConnectOk { syn_retransmits: 3 },
    ] {
        assert!(!ev.is_failure());
        let mut h = EndpointHealth::new(t);
        for i in 0..100 {
            let t = h.observe(ev, t + ms(i), &p, true);
            assert!(!matches!(t, Transition::Ejected { .. }), "{ev:?}: {t:?}");
        }
        assert!(h.routable());
    }
    assert!(Evidence::Refused.is_failure() && Evidence::ResponseTimeout.is_failure());
}

#[test]
fn error_statuses_in_a_row_eject_and_any_other_response_clears_them() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    // Four 503s, then a 200: the count starts again.
    for _ in 1..p.error_statuses_to_eject {
        assert_eq!(
            h.observe(Evidence::ErrorStatus, t, &p, true),
            Transition::None
        );
    }
    h.observe(Evidence::ResponseOk, t, &p, true);
    for _ in 1..p.error_statuses_to_eject {
        h.observe(Evidence::ErrorStatus, t, &p, true);
        assert_eq!(h.state(), State::Healthy);
    }
    assert_eq!(
        h.observe(Evidence::ErrorStatus, t, &p, true),
        Transition::Ejected {
            reason: Reason::ErrorStatus,
            duration: DEFAULT_BASE_EJECTION
        }
    );
    // Fail-open: past the cluster's budget it is only deprioritised.
    let mut kept = EndpointHealth::new(t);
    for _ in 0..p.error_statuses_to_eject {
        kept.observe(Evidence::ErrorStatus, t, &p, false);
    }
    assert_eq!(kept.state(), State::Suspect);
    assert_eq!(kept.reason(), Some(Reason::ErrorStatus));
    let off = HealthPolicy {
        error_statuses_to_eject: 0,
        ..p
    };
    let mut h = EndpointHealth::new(t);
    for _ in 0..100 {
        h.observe(Evidence::ErrorStatus, t, &off, true);
    }
    assert_eq!(h.state(), State::Healthy, "0 disables the rule");
    assert!(is_error_status(502) && is_error_status(503) && is_error_status(504));
    assert!(!is_error_status(500) && !is_error_status(501) && !is_error_status(505));
    assert!(!is_error_status(429) && !is_error_status(200));
}

#[test]
fn back_from_an_error_status_ejection_one_more_ejects_until_a_good_response() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    for _ in 0..p.error_statuses_to_eject {
        h.observe(Evidence::ErrorStatus, t, &p, true);
    }
    assert_eq!(h.state(), State::Ejected);
    // Probes by TCP connect bring it back.
    let back = |h: &mut EndpointHealth, at: Instant| {
        assert_eq!(h.tick(at), Transition::Probing);
        for _ in 0..p.rise {
            h.probe(Evidence::ConnectOk { syn_retransmits: 0 }, at, &p, true);
        }
        assert_eq!(h.state(), State::Healthy);
    };
    let t1 = t + DEFAULT_BASE_EJECTION;
    back(&mut h, t1);
    // On probation: the first error status ejects again, for twice as long.
    assert_eq!(
        h.observe(Evidence::ErrorStatus, t1, &p, true),
        Transition::Ejected {
            reason: Reason::ErrorStatus,
            duration: DEFAULT_BASE_EJECTION * 2
        }
    );
    let t2 = t1 + DEFAULT_BASE_EJECTION * 2;
    back(&mut h, t2);
    // A good answer ends the probation: back to the count in a row.
    h.observe(Evidence::ResponseOk, t2, &p, true);
    for _ in 1..p.error_statuses_to_eject {
        assert_eq!(
            h.observe(Evidence::ErrorStatus, t2, &p, true),
            Transition::None
        );
    }
    // Back from an ejection for another reason: no probation.
    let mut other = EndpointHealth::new(t);
    other.observe(Evidence::Refused, t, &p, true);
    back(&mut other, t1);
    assert_eq!(
        other.observe(Evidence::ErrorStatus, t1, &p, true),
        Transition::None
    );
}

/// A suspect endpoint (here kept routable past the ejection budget) recovers on a probe's
/// expected answer (`probe_path`), as on a probe's clean connect: it stayed suspect for good,
/// and took no request while a healthy endpoint was left.
#[test]
fn a_probes_expected_answer_clears_suspicion() {
    let p = HealthPolicy::default();
    let t = Instant::now();
    let mut h = EndpointHealth::new(t);
    assert_eq!(
        h.observe(Evidence::Refused, t, &p, false),
        Transition::EjectionRefused(Reason::Refused)
    );
    assert_eq!(h.state(), State::Suspect);
    assert_eq!(
        h.probe(Evidence::ResponseOk, t + ms(100), &p, true),
        Transition::Recovered
    );
    assert_eq!(h.state(), State::Healthy);
    // A request's answer alone says nothing of the handshake: it does not.
    let mut h = EndpointHealth::new(t);
    h.observe(Evidence::SynUnanswered, t, &p, true);
    assert_eq!(
        h.observe(Evidence::ResponseOk, t, &p, true),
        Transition::None
    );
    assert_eq!(h.state(), State::Suspect);
}
