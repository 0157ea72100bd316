//! Privileged scenario tests of the kernel-driven decisions (issue 4): the real gateway with
//! the eBPF observer attached, three upstreams, open-loop load at 200 req/s, and a fault on one
//! upstream mid-run. Each asserts what a client and an operator would notice: client-visible
//! failures, latency after the fault, how fast the bad endpoint stopped getting traffic, and
//! what the gateway logged. Run with `--test-threads=1` (./dev test does).

mod scenario_support;

use std::time::Duration;

use gateway::lab::{Fault, HttpBehaviour};
use scenario_support::*;

const RATE: u32 = 200;
const RUN: Duration = Duration::from_secs(30);
const FAULT_AT: f64 = 10.0;
/// Connect faults: every request opens a new upstream connection, so every request to the bad
/// endpoint meets the fault (with keep-alive, pooled connections would hide a SYN blackhole).
const NO_POOL: usize = 0;

fn bad_endpoint(s: &Scenario) -> String {
    s.lab.upstream(1).unwrap().addr_v4(PORT).to_string()
}

/// Runs a connect-fault scenario: `fault` on upstream 2 at `FAULT_AT`.
fn connect_fault(name: &str, fault: Fault) -> (Scenario, Vec<Sample>, f64) {
    let s = Scenario::start(name, HttpBehaviour::immediate(), NO_POOL, "");
    let up = s.lab.upstream(1).unwrap();
    let mut guard = None;
    let mut fault_wall = 0.0;
    let samples = s.run_load(RATE, RUN, |t| {
        if guard.is_none() && t >= FAULT_AT {
            guard = Some(up.apply(fault.clone()).expect("fault"));
            fault_wall = secs(std::time::SystemTime::now());
        }
    });
    drop(guard);
    (s, samples, fault_wall)
}

fn report(name: &str, samples: &[Sample]) {
    let after: Vec<&Sample> = samples.iter().filter(|x| x.at > FAULT_AT).collect();
    let by: std::collections::BTreeMap<&str, usize> =
        after.iter().fold(Default::default(), |mut m, x| {
            *m.entry(x.served_by.as_str()).or_default() += 1;
            m
        });
    eprintln!(
        "{name}: {} requests, {} failures; after the fault p50 {:?} p99 {:?} max {:?}; served by {by:?}",
        samples.len(),
        failures(samples).len(),
        quantile(&after, 0.5),
        quantile(&after, 0.99),
        quantile(&after, 1.0)
    );
}

/// Seconds from the fault to the gateway's first "endpoint ejected" line for `endpoint`.
fn ejected_after(s: &Scenario, endpoint: &str, fault_wall: f64) -> Option<(f64, String)> {
    s.log_lines(&["endpoint ejected", &format!("upstream={endpoint}")])
        .first()
        .map(|(t, l)| (secs(*t) - fault_wall, l.clone()))
}

#[test]
fn privileged_syn_blackhole_is_ejected_fast_and_hidden_from_clients() {
    let (s, samples, fault) = connect_fault("synbh", Fault::SynBlackhole { port: PORT });
    report("syn blackhole", &samples);
    let bad = bad_endpoint(&s);
    assert_eq!(
        failures(&samples).len(),
        0,
        "client-visible failures: {:?}",
        &failures(&samples)[..failures(&samples).len().min(5)]
    );
    let suspect = s.log_lines(&[
        "endpoint suspect",
        &format!("upstream={bad}"),
        "syn_unanswered",
    ]);
    let (after, line) = ejected_after(&s, &bad, fault).expect("the blackholed endpoint is ejected");
    assert!(line.contains("syn_unanswered"), "{line}");
    let first_suspect = secs(suspect.first().expect("suspect first").0) - fault;
    // The first unanswered SYN left at most one connect deadline before the suspect line.
    assert!(
        after - first_suspect < 1.0,
        "ejected {after:.3}s after the fault, first suspect at {first_suspect:.3}s"
    );
    assert!(after < 1.0, "ejected {after:.3}s after the fault");
    let late: Vec<&Sample> = samples.iter().filter(|x| x.at > FAULT_AT + 0.5).collect();
    assert!(
        quantile(&late, 0.99) < Duration::from_millis(300),
        "p99 after the fault {:?}",
        quantile(&late, 0.99)
    );
}

#[test]
fn privileged_refused_is_ejected_at_once() {
    let (s, samples, fault) = connect_fault("refused", Fault::Refuse { port: PORT });
    report("refused", &samples);
    assert_eq!(
        failures(&samples).len(),
        0,
        "{:?}",
        failures(&samples).first()
    );
    let (after, line) = ejected_after(&s, &bad_endpoint(&s), fault).expect("ejected");
    assert!(
        line.contains("reason=\"refused\"") || line.contains("reason=refused"),
        "{line}"
    );
    assert!(after < 0.5, "ejected {after:.3}s after the first RST");
}

#[test]
fn privileged_icmp_unreachable_is_ejected_at_once() {
    let (s, samples, fault) = connect_fault("icmp", Fault::HostUnreachable { port: PORT });
    report("icmp", &samples);
    assert_eq!(
        failures(&samples).len(),
        0,
        "{:?}",
        failures(&samples).first()
    );
    let (after, line) = ejected_after(&s, &bad_endpoint(&s), fault).expect("ejected");
    assert!(line.contains("unreachable"), "{line}");
    assert!(
        after < 0.5,
        "ejected {after:.3}s after the first ICMP error"
    );
}

#[test]
fn privileged_syn_ack_delay_is_hedged_under_300ms() {
    let (s, samples, _fault) = connect_fault(
        "synackdelay",
        Fault::SynAckDelay {
            port: PORT,
            delay: Duration::from_millis(200),
        },
    );
    report("syn-ack delay", &samples);
    assert_eq!(
        failures(&samples).len(),
        0,
        "{:?}",
        failures(&samples).first()
    );
    let late: Vec<&Sample> = samples.iter().filter(|x| x.at > FAULT_AT).collect();
    assert!(
        quantile(&late, 0.99) < Duration::from_millis(300),
        "p99 after the fault {:?}",
        quantile(&late, 0.99)
    );
    let hedged = s
        .access_log()
        .iter()
        .filter(|l| l["hedged"] == true)
        .count();
    assert!(hedged > 0, "hedging took part");
}
