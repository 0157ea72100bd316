//! The classifier on synthetic measurements: one case per verdict (the top verdict is the
//! injected cause), plus ranking, merging across addresses, and honesty without kernel signals.

use std::net::SocketAddr;

use super::*;
use crate::diagnose::measure::{
    DeadlineSource, HttpOutcome, Resolution, ResolutionMethod, Source, Summary, SynBudget,
    TargetMeasurements,
};

const ADDR: &str = "10.77.1.2:8080";

fn attempt(outcome: AttemptOutcome, retx: u32, elapsed_us: u64) -> Attempt {
    Attempt {
        cookie: 1,
        outcome,
        source: Source::Kernel,
        errno: match outcome {
            AttemptOutcome::Refused => Some("ECONNREFUSED".into()),
            AttemptOutcome::Timeout => Some("ETIMEDOUT".into()),
            AttemptOutcome::Unreachable => Some("EHOSTUNREACH".into()),
            AttemptOutcome::AddrUnavailable => Some("EADDRNOTAVAIL".into()),
            AttemptOutcome::Denied => Some("EPERM".into()),
            _ => None,
        },
        elapsed_us,
        syn_retransmits: Some(retx),
        syn_rtt_us: (outcome == AttemptOutcome::Established).then_some(elapsed_us),
        refused_by_icmp: false,
        http: None,
    }
}

fn established(rtt_us: u64) -> Attempt {
    attempt(AttemptOutcome::Established, 0, rtt_us)
}

fn http(outcome: HttpOutcome, first_byte_us: Option<u64>, acked: bool) -> HttpExchange {
    HttpExchange {
        outcome,
        error: None,
        request_bytes: 80,
        request_acked: Some(acked),
        ack_us: acked.then_some(120),
        first_byte_us,
        status: first_byte_us.map(|_| 200),
        data_retransmits: Some(0),
        rtos: Some(0),
        source: Source::Kernel,
        accept_us: None,
        rounds_after_accept: 0,
        retransmits_before_accept: None,
        retransmits_after_accept: None,
    }
}

/// An exchange whose request went out a line at a time: accepted after `accept_us`, then
/// `rounds` round trips with `lost` retransmits.
fn http_rounds(accept_us: u64, rounds: u32, lost: u32) -> HttpExchange {
    HttpExchange {
        accept_us: Some(accept_us),
        rounds_after_accept: rounds,
        retransmits_before_accept: Some(0),
        retransmits_after_accept: Some(lost),
        data_retransmits: Some(lost),
        ..http(HttpOutcome::Response, Some(900), true)
    }
}

fn with_http(mut a: Attempt, h: HttpExchange) -> Attempt {
    a.http = Some(h);
    a
}

fn target(attempts: Vec<Attempt>) -> TargetMeasurements {
    target_at(ADDR.parse().unwrap(), attempts)
}

fn target_at(addr: SocketAddr, attempts: Vec<Attempt>) -> TargetMeasurements {
    TargetMeasurements {
        kernel_signals: true,
        kernel_signals_missing: None,
        resolution: Resolution {
            host: addr.ip().to_string(),
            method: ResolutionMethod::Literal,
            elapsed_us: 0,
            addresses: vec![addr.ip()],
            error: None,
        },
        count: attempts.len() as u32,
        connect_deadline_ms: 3300,
        connect_deadline_source: DeadlineSource::Kernel,
        syn_budget: SynBudget {
            tcp_syn_retries: 1,
            tcp_syn_linear_timeouts: 0,
            budget_ms: 3000,
        },
        local_port_range: Some([40000, 40003]),
        http_path: None,
        response_timeout_ms: None,
        addresses: vec![AddressMeasurements::new(addr, attempts)],
        gateway: None,
        events_lost: Some(0),
    }
}

fn top(m: &TargetMeasurements) -> Verdict {
    let ranked = classify(m);
    assert!(!ranked.is_empty(), "no verdict for {m:#?}");
    for w in ranked.windows(2) {
        assert!(
            w[0].confidence >= w[1].confidence,
            "not ranked: {ranked:#?}"
        );
    }
    for v in &ranked {
        assert!((0.0..=1.0).contains(&v.confidence), "{v:?}");
        assert!(!v.evidence.is_empty(), "a verdict without evidence: {v:?}");
    }
    ranked[0].clone()
}

fn assert_top(m: &TargetMeasurements, want: VerdictName, min_confidence: f64) -> Verdict {
    let v = top(m);
    assert_eq!(v.verdict, want, "{:#?}", classify(m));
    assert!(
        v.confidence >= min_confidence,
        "confidence {} < {min_confidence}: {v:#?}",
        v.confidence
    );
    if want != VerdictName::Healthy {
        assert!(!v.next_steps.is_empty(), "{v:#?}");
    }
    v
}

#[test]
fn healthy() {
    let m = target(vec![established(80); 5]);
    let v = assert_top(&m, VerdictName::Healthy, 0.99);
    assert!(
        v.evidence[0].contains("5/5 connects to 10.77.1.2:8080 established")
            && v.evidence[0].contains("none needed a SYN retransmit"),
        "{v:#?}"
    );
    assert_eq!(classify(&m).len(), 1);
}

#[test]
fn refused() {
    let v = assert_top(
        &target(vec![attempt(AttemptOutcome::Refused, 0, 60); 5]),
        VerdictName::Refused,
        0.95,
    );
    assert!(
        v.evidence[0].starts_with("5/5 connects to 10.77.1.2:8080 refused: an RST"),
        "{v:#?}"
    );
    assert!(
        v.next_steps[0].contains("ss -ltn 'sport = :8080'"),
        "{v:#?}"
    );
}

/// An ICMP port unreachable (no RST) is a firewall's REJECT: the same verdict, with what
/// tells it from a port with no listener, and where to look instead.
#[test]
fn refused_by_icmp_names_the_firewall_not_the_listener() {
    let icmp = Attempt {
        refused_by_icmp: true,
        ..attempt(AttemptOutcome::Refused, 0, 60)
    };
    let v = assert_top(&target(vec![icmp.clone(); 5]), VerdictName::Refused, 0.95);
    assert!(
        v.evidence[0].starts_with(
            "5/5 connects to 10.77.1.2:8080 refused, 5 of them by an ICMP port unreachable"
        ) && v.evidence[0].contains("no RST"),
        "{v:#?}"
    );
    assert!(v.evidence[1].contains("kube-proxy"), "{v:#?}");
    assert!(
        !v.evidence.iter().any(|e| e.contains("nothing listens")),
        "{v:#?}"
    );
    assert!(
        v.next_steps[0].starts_with("tcpdump -ni any 'icmp[icmptype]"),
        "{v:#?}"
    );
    assert!(v.next_steps[1].starts_with("iptables "), "{v:#?}");
    // IPv6: ICMPv6's port unreachable, and ip6tables.
    let v6 = classify(&target_at("[fd00::2]:8080".parse().unwrap(), vec![icmp; 5]));
    let v = &v6[0];
    assert!(
        v.next_steps[0].starts_with("tcpdump -ni any 'icmp6 and ip6[40] == 1 and ip6[41] == 4'"),
        "{v:#?}"
    );
    assert!(v.next_steps[1].starts_with("ip6tables "), "{v:#?}");
}

#[test]
fn filtered_names_the_syns_and_the_silence() {
    let v = assert_top(
        &target(vec![attempt(AttemptOutcome::Timeout, 1, 3_010_000); 5]),
        VerdictName::Filtered,
        0.95,
    );
    assert!(
        v.evidence[0].starts_with(
            "5/5 SYNs to 10.77.1.2:8080 unanswered after 1 SYN retransmit each: no SYN-ACK, no \
             RST, no ICMP; the kernel gave up with ETIMEDOUT after a median 3.01 s \
             (tcp_syn_retries=1"
        ),
        "{v:#?}"
    );
    assert!(v.evidence[0].ends_with("[kernel]"), "{v:#?}");
}

/// Every SYN to the port unanswered, and `other` at another port of the same host.
fn silent_with_other_port(other: Vec<Attempt>) -> TargetMeasurements {
    let mut m = target(vec![attempt(AttemptOutcome::Timeout, 1, 3_010_000); 5]);
    m.addresses[0].other_port = Some(crate::diagnose::measure::OtherPort {
        port: 65535,
        from_target: None,
        deadline_ms: 1000,
        attempts: other,
    });
    m
}

#[test]
fn a_silent_port_of_a_host_that_answers_elsewhere_is_filtered_for_sure() {
    let m = silent_with_other_port(vec![attempt(AttemptOutcome::Refused, 0, 150); 3]);
    let v = assert_top(&m, VerdictName::Filtered, 0.95);
    assert!(
        v.evidence[1].starts_with(
            "3/3 connects to port 65535 of the same host were answered (3 with an RST, 0 with a \
             SYN-ACK) [kernel]: something answers for 10.77.1.2 (the host, or a device in front \
             of it), so only port 8080's SYNs go unanswered"
        ),
        "{v:#?}"
    );
    assert!(
        v.next_steps[0].starts_with("look for a DROP on tcp/8080"),
        "{v:#?}"
    );
}

#[test]
fn a_refusal_by_icmp_at_another_port_is_not_the_host_answering() {
    // A port unreachable may come from a firewall on the path (a REJECT rule), not the host.
    let icmp = Attempt {
        refused_by_icmp: true,
        ..attempt(AttemptOutcome::Refused, 0, 150)
    };
    let m = silent_with_other_port(vec![icmp; 3]);
    let v = top(&m);
    assert_eq!(v.verdict, VerdictName::Filtered, "{v:#?}");
    assert!(
        v.evidence.iter().all(|e| !e.contains("were answered")),
        "{v:#?}"
    );
    assert!(
        v.evidence[1].starts_with("3 connects to port 65535 of the same host ended with"),
        "{v:#?}"
    );
}

#[test]
fn a_host_silent_on_every_port_is_filtered_with_less_confidence() {
    let m = silent_with_other_port(vec![attempt(AttemptOutcome::Deadline, 0, 1_000_000); 3]);
    let v = top(&m);
    assert_eq!(v.verdict, VerdictName::Filtered, "{v:#?}");
    // Before: 0.99, though a host that is down looks the same.
    assert_eq!(
        v.confidence,
        connect_failures::HOST_SILENT_CONFIDENCE,
        "{v:#?}"
    );
    assert!(
        v.evidence[1].starts_with(
            "3/3 connects to port 65535 of the same host went unanswered too (deadline 1000 ms) \
             [kernel]: the host may be down or unreachable, or a firewall may drop every port; \
             SYNs alone cannot tell these apart"
        ),
        "{v:#?}"
    );
    assert!(v.next_steps[1].starts_with("is 10.77.1.2 up?"), "{v:#?}");
}

#[test]
fn unreachable() {
    let v = assert_top(
        &target(vec![attempt(AttemptOutcome::Unreachable, 0, 1_100); 5]),
        VerdictName::Unreachable,
        0.95,
    );
    assert!(v.evidence[0].contains("EHOSTUNREACH"), "{v:#?}");
    assert!(
        v.next_steps[0].starts_with("ip route get 10.77.1.2"),
        "{v:#?}"
    );
}

#[test]
fn overloaded_when_every_handshake_needs_retransmits() {
    let attempts = (1..=5)
        .map(|k| {
            attempt(
                AttemptOutcome::Established,
                k % 3 + 1,
                1_000_000 * u64::from(k),
            )
        })
        .collect();
    let v = assert_top(&target(attempts), VerdictName::Overloaded, 0.8);
    assert!(
        v.evidence[0].starts_with(
            "5/5 handshakes with 10.77.1.2:8080 completed only after 1–3 SYN retransmits"
        ),
        "{v:#?}"
    );
    assert!(
        v.next_steps
            .iter()
            .any(|s| s.contains("TcpExtListenOverflows")),
        "{v:#?}"
    );
    let ranked = classify(&target(
        (0..5)
            .map(|_| attempt(AttemptOutcome::Established, 2, 2_000_000))
            .collect(),
    ));
    assert!(
        ranked.iter().any(|v| v.verdict == VerdictName::LossyPath),
        "loss is ranked as the alternative: {ranked:#?}"
    );
}

#[test]
fn lossy_path_when_retransmits_are_intermittent() {
    let mut attempts = Vec::new();
    for k in 0..20 {
        attempts.push(match k % 5 {
            0 | 1 => attempt(AttemptOutcome::Established, 1, 1_000_100),
            2 => attempt(AttemptOutcome::Established, 2, 2_000_100),
            _ => established(90),
        });
    }
    attempts.push(attempt(AttemptOutcome::Deadline, 6, 10_000_000));
    // From handshakes alone this could be a full accept queue that others compete for too:
    // lossy_path first, but not confidently, overloaded next, and how to tell them apart.
    let m = target(attempts);
    let ranked = classify(&m);
    assert_eq!(ranked[1].verdict, VerdictName::Overloaded, "{ranked:#?}");
    assert!(ranked[1].confidence >= 0.5, "{ranked:#?}");
    let v = assert_top(&m, VerdictName::LossyPath, 0.55);
    assert!(v.confidence <= 0.6, "{v:#?}");
    assert!(
        v.evidence.iter().any(|e| e.contains("--http PATH")),
        "{v:#?}"
    );
    assert!(
        v.evidence[0].starts_with(
            "12/20 handshakes with 10.77.1.2:8080 needed SYN retransmits (1–2 SYN retransmits) \
             while the other 8 completed in a median 0.09 ms"
        ),
        "{v:#?}"
    );
    assert!(
        v.evidence
            .iter()
            .any(|e| e.starts_with("1/21 connects to 10.77.1.2:8080 got no answer at all")),
        "{v:#?}"
    );
}

/// Issue 15: an overloaded listener that other clients compete for. The handshakes are mixed
/// (some unanswered, some after retransmits, some clean), as loss would make them; data sent
/// over the connections the listener's kernel had accepted loses nothing, which loss would not
/// manage.
#[test]
fn a_contended_accept_queue_is_overloaded_when_accepted_connections_lose_nothing() {
    let mut attempts = Vec::new();
    for k in 0..10 {
        attempts.push(match k % 5 {
            0 => attempt(AttemptOutcome::Deadline, 6, 10_000_000),
            1 | 2 => with_http(
                attempt(AttemptOutcome::Established, 2, 3_000_100),
                http_rounds(150, 5, 0),
            ),
            3 => with_http(
                attempt(AttemptOutcome::Established, 1, 1_000_100),
                http_rounds(90, 5, 0),
            ),
            _ => with_http(established(90), http_rounds(80, 5, 0)),
        });
    }
    let mut m = target(attempts);
    m.http_path = Some("/".into());
    let v = assert_top(&m, VerdictName::Overloaded, 0.85);
    assert!(
        v.evidence.iter().any(|e| e.starts_with(
            "40 round trips over 8 connections to 10.77.1.2:8080 that its kernel had accepted \
             (the first request line ACKed), 0 retransmits"
        )),
        "{v:#?}"
    );
    let ranked = classify(&m);
    let lossy = ranked.iter().find(|v| v.verdict == VerdictName::LossyPath);
    assert!(lossy.is_none_or(|l| l.confidence <= 0.15), "{ranked:#?}");
}

/// The same handshakes, but data over accepted connections lost packets too: a lossy path.
#[test]
fn loss_after_the_listener_accepted_is_a_lossy_path() {
    let mut attempts = Vec::new();
    for k in 0..10 {
        let rounds = http_rounds(150, 5, u32::from(k % 2 == 0));
        attempts.push(match k % 5 {
            0 => attempt(AttemptOutcome::Deadline, 6, 10_000_000),
            1 | 2 => with_http(attempt(AttemptOutcome::Established, 2, 3_000_100), rounds),
            _ => with_http(established(90), rounds),
        });
    }
    let mut m = target(attempts);
    m.http_path = Some("/".into());
    let v = assert_top(&m, VerdictName::LossyPath, 0.8);
    assert!(
        v.evidence[0].starts_with(
            "4/8 connections to 10.77.1.2:8080 lost packets after its kernel had accepted them"
        ),
        "{v:#?}"
    );
    let ranked = classify(&m);
    assert!(
        ranked.iter().all(|v| v.verdict != VerdictName::Overloaded),
        "{ranked:#?}"
    );
}

#[test]
fn data_retransmits_are_loss_too() {
    let mut h = http(HttpOutcome::Response, Some(900), true);
    h.data_retransmits = Some(3);
    h.rtos = Some(1);
    let mut attempts = vec![
        with_http(
            established(80),
            http(HttpOutcome::Response, Some(700), true)
        );
        3
    ];
    attempts.push(with_http(established(80), h.clone()));
    attempts.push(with_http(established(80), h));
    let mut m = target(attempts);
    m.http_path = Some("/".into());
    let v = assert_top(&m, VerdictName::LossyPath, 0.5);
    assert!(
        v.evidence.iter().any(|e| e.contains(
            "2/5 HTTP exchanges with 10.77.1.2:8080 lost packets: 6 data retransmits, 2 RTOs"
        )),
        "{v:#?}"
    );
}

#[test]
fn slow_backend() {
    let attempts = vec![with_http(established(80), http(HttpOutcome::Timeout, None, true)); 5];
    let mut m = target(attempts);
    m.http_path = Some("/slow".into());
    m.response_timeout_ms = Some(1000);
    let v = assert_top(&m, VerdictName::SlowBackend, 0.95);
    assert!(
        v.evidence[0].starts_with(
            "5/5 GET /slow to 10.77.1.2:8080: handshake in a median 0.08 ms, the 80-byte \
             request ACKed by 10.77.1.2's kernel within 0.12 ms, but no response byte within \
             the 1000 ms response timeout"
        ),
        "{v:#?}"
    );
}

#[test]
fn a_late_answer_is_slow_too_but_an_unacked_request_is_not() {
    let late = vec![
        with_http(
            established(80),
            http(HttpOutcome::Response, Some(3_000_000), true)
        );
        5
    ];
    let mut m = target(late);
    m.http_path = Some("/".into());
    m.response_timeout_ms = Some(5000);
    assert_top(&m, VerdictName::SlowBackend, 0.9);

    let mut unacked = http(HttpOutcome::Timeout, None, false);
    unacked.data_retransmits = Some(4);
    let mut m = target(vec![with_http(established(80), unacked); 5]);
    m.http_path = Some("/".into());
    m.response_timeout_ms = Some(1000);
    assert_top(&m, VerdictName::LossyPath, 0.5);
}

#[test]
fn dns_failure() {
    let mut m = target(Vec::new());
    m.addresses.clear();
    m.resolution = Resolution {
        host: "no-such-host.invalid".into(),
        method: ResolutionMethod::Dns,
        elapsed_us: 2_300,
        addresses: Vec::new(),
        error: Some("EAI_AGAIN (Temporary failure in name resolution)".into()),
    };
    let v = assert_top(&m, VerdictName::DnsFailure, 0.95);
    assert!(
        v.evidence[0].starts_with("resolving no-such-host.invalid failed after 2.30 ms: EAI_AGAIN"),
        "{v:#?}"
    );
    assert_eq!(classify(&m).len(), 1);
}

#[test]
fn slow_dns_outranks_a_healthy_connect() {
    let mut m = target(vec![established(80); 5]);
    m.resolution.method = ResolutionMethod::Dns;
    m.resolution.host = "slow.example".into();
    m.resolution.elapsed_us = 2_500_000;
    let v = assert_top(&m, VerdictName::DnsFailure, 0.7);
    assert!(v.evidence[0].contains("took 2.50 s"), "{v:#?}");
    let ranked = classify(&m);
    assert_eq!(ranked[1].verdict, VerdictName::Healthy, "{ranked:#?}");
}

#[test]
fn port_exhaustion() {
    let v = assert_top(
        &target(vec![attempt(AttemptOutcome::AddrUnavailable, 0, 5); 5]),
        VerdictName::PortExhaustion,
        0.95,
    );
    assert!(v.evidence[0].contains("EADDRNOTAVAIL"), "{v:#?}");
    assert!(
        v.evidence[1].contains("40000–40003: 4 local ports"),
        "{v:#?}"
    );
}

#[test]
fn deadline_too_short_when_patient_connects_complete() {
    let mut m = target(vec![attempt(AttemptOutcome::Deadline, 0, 100_000); 5]);
    m.connect_deadline_ms = 100;
    m.connect_deadline_source = DeadlineSource::Configured;
    let a = &mut m.addresses[0];
    a.patient_attempts = vec![
        established(200_400),
        established(201_000),
        established(202_000),
    ];
    a.patient_deadline_ms = Some(3300);
    let v = assert_top(&m, VerdictName::DeadlineTooShort, 0.9);
    assert!(
        v.evidence[0].starts_with(
            "5/5 connects to 10.77.1.2:8080 given up at the 100 ms connect deadline with no RST \
             and no ICMP, before any SYN retransmit [kernel]"
        ),
        "{v:#?}"
    );
    assert!(
        v.evidence[1].contains("3/3 patient connects (deadline 3300 ms) completed"),
        "{v:#?}"
    );
    assert!(
        v.next_steps[0].contains("p99 SYN-RTT × 2 = 410 ms"),
        "{v:#?}"
    );
    assert!(
        !classify(&m)
            .iter()
            .any(|v| v.verdict == VerdictName::Filtered),
        "the silence is explained by the deadline"
    );
}

#[test]
fn a_short_deadline_on_a_dead_host_is_still_filtered() {
    let mut m = target(vec![attempt(AttemptOutcome::Deadline, 0, 100_000); 5]);
    m.connect_deadline_ms = 100;
    m.connect_deadline_source = DeadlineSource::Configured;
    m.addresses[0].patient_attempts = vec![attempt(AttemptOutcome::Timeout, 1, 3_000_000); 3];
    m.addresses[0].patient_deadline_ms = Some(3300);
    let v = assert_top(&m, VerdictName::Filtered, 0.9);
    assert!(
        v.evidence[1].contains("3/3 patient connects with a 3300 ms deadline went unanswered"),
        "{v:#?}"
    );
}

#[test]
fn a_tight_deadline_is_flagged_as_an_alternative() {
    let mut m = target(vec![established(90_000); 5]);
    m.connect_deadline_ms = 100;
    m.connect_deadline_source = DeadlineSource::Configured;
    let ranked = classify(&m);
    assert!(
        ranked
            .iter()
            .any(|v| v.verdict == VerdictName::DeadlineTooShort),
        "{ranked:#?}"
    );
}

#[test]
fn the_worst_address_decides_and_every_address_keeps_its_evidence() {
    let mut m = target(vec![established(80); 5]);
    let v6: SocketAddr = "[fd77:0:1::2]:8080".parse().unwrap();
    m.addresses.push(AddressMeasurements::new(
        v6,
        vec![attempt(AttemptOutcome::Unreachable, 0, 1_000); 5],
    ));
    let ranked = classify(&m);
    assert_eq!(ranked[0].verdict, VerdictName::Unreachable, "{ranked:#?}");
    assert!(ranked[0].evidence[0].contains("[fd77:0:1::2]:8080"));
    assert!(
        ranked.iter().all(|v| v.verdict != VerdictName::Healthy),
        "one address down is not healthy: {ranked:#?}"
    );
}

#[test]
fn without_kernel_signals_nothing_claims_the_kernel() {
    let mut attempts = vec![attempt(AttemptOutcome::Timeout, 1, 3_000_000); 5];
    for a in &mut attempts {
        a.source = Source::Userspace;
    }
    let mut m = target(attempts);
    m.kernel_signals = false;
    m.kernel_signals_missing = Some("not root".into());
    let v = assert_top(&m, VerdictName::Filtered, 0.9);
    let text = v.evidence.join("\n");
    assert!(!text.contains("[kernel"), "{text}");
    assert!(!text.contains("no SYN-ACK, no RST, no ICMP"), "{text}");
    assert!(text.contains("[userspace]"), "{text}");
    assert!(text.contains("kernel signals off (not root)"), "{text}");
}

#[test]
fn one_retransmit_in_twenty_is_not_enough_to_call_the_path_lossy() {
    let mut attempts = vec![established(90); 19];
    attempts.push(attempt(AttemptOutcome::Established, 1, 1_000_090));
    let ranked = classify(&target(attempts));
    assert_eq!(ranked[0].verdict, VerdictName::Healthy, "{ranked:#?}");
    assert_eq!(ranked[1].verdict, VerdictName::LossyPath, "{ranked:#?}");
}

#[test]
fn every_name_is_the_contract() {
    let names: Vec<&str> = VerdictName::ALL.iter().map(|v| v.as_str()).collect();
    assert_eq!(
        names,
        [
            "healthy",
            "refused",
            "filtered",
            "unreachable",
            "overloaded",
            "lossy_path",
            "slow_backend",
            "dns_failure",
            "port_exhaustion",
            "deadline_too_short"
        ]
    );
    for v in VerdictName::ALL {
        assert_eq!(
            serde_json::to_value(v).unwrap(),
            serde_json::Value::String(v.as_str().to_owned())
        );
    }
}

#[test]
fn summaries_count_outcomes() {
    let s = Summary::of(&[
        established(100),
        attempt(AttemptOutcome::Established, 2, 2_000_000),
        attempt(AttemptOutcome::Refused, 0, 50),
    ]);
    assert_eq!((s.attempts, s.established, s.refused), (3, 2, 1));
    assert_eq!(s.established_after_syn_retransmits, 1);
    let p = s.syn_rtt_us.unwrap();
    assert_eq!((p.min, p.p50, p.max), (100, 100, 2_000_000));
}
