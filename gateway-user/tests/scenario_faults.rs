//! Privileged scenario tests of the kernel-driven decisions (issue 4): the real gateway with
//! the eBPF observer attached, three upstreams, open-loop load at 200 req/s, and a fault on one
//! upstream mid-run. Each asserts what a client and an operator would notice: client-visible
//! failures, latency after the fault, how fast the bad endpoint stopped getting traffic, and
//! what the gateway logged. Run with `--test-threads=1` (./dev test does).

mod scenario_support;

use std::time::Duration;

use gateway_lab::{Fault, HttpBehaviour};
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
    let s = Scenario::start(name, HttpBehaviour::immediate(), NO_POOL, 2000, "");
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

#[test]
fn privileged_whole_host_blackhole_loses_no_get() {
    // Keep-alive on: requests in flight on pooled connections stall when the host dies.
    let s = Scenario::start("hostbh", HttpBehaviour::immediate(), 2, 2000, "");
    let up = s.lab.upstream(1).unwrap();
    let mut guard = None;
    let mut fault = 0.0;
    let samples = s.run_load(RATE, RUN, |t| {
        if guard.is_none() && t >= FAULT_AT {
            guard = Some(up.apply(Fault::Blackhole { port: PORT }).expect("fault"));
            fault = secs(std::time::SystemTime::now());
        }
    });
    drop(guard);
    report("whole-host blackhole", &samples);
    for l in s
        .access_log()
        .iter()
        .filter(|l| l["total_ms"].as_f64().unwrap_or(0.0) > 500.0)
        .take(3)
    {
        eprintln!("slow request: {l}");
    }
    assert_eq!(
        failures(&samples).len(),
        0,
        "GET failures: {:?}",
        failures(&samples).first()
    );
    let (after, line) = ejected_after(&s, &bad_endpoint(&s), fault).expect("ejected");
    assert!(
        after < 1.0,
        "ejected {after:.3}s after the host died: {line}"
    );
    let late: Vec<&Sample> = samples.iter().filter(|x| x.at > FAULT_AT).collect();
    assert!(
        quantile(&late, 0.99) < Duration::from_secs(1),
        "p99 after the fault {:?}",
        quantile(&late, 0.99)
    );
    // Requests stranded on the dead host were moved by kernel evidence, not by a timer.
    let moved = s
        .access_log()
        .into_iter()
        .filter(|l| {
            l["attempt_errors"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e == "upstream_host_died"))
        })
        .count();
    eprintln!("requests retried after upstream_host_died: {moved}");
}

#[test]
fn privileged_slow_backend_is_not_a_network_failure() {
    let s = Scenario::start("slow", HttpBehaviour::immediate(), 2, 1000, "");
    let mut slowed = false;
    let samples = s.run_load(RATE / 4, Duration::from_secs(20), |t| {
        if !slowed && t >= 5.0 {
            s.servers[1].set_behaviour(HttpBehaviour::slow(Duration::from_secs(3)));
            slowed = true;
        }
    });
    report("slow backend", &samples);
    let bad = bad_endpoint(&s);
    for (_, line) in s.log_lines(&["endpoint ejected", &format!("upstream={bad}")]) {
        assert!(
            line.contains("slow_backend"),
            "ejected as a network failure: {line}"
        );
    }
    let timeouts: Vec<serde_json::Value> = s
        .access_log()
        .into_iter()
        .filter(|l| l["error"] == "response_timeout")
        .collect();
    assert!(!timeouts.is_empty(), "the response timeout fired");
    for l in &timeouts {
        let detail = l["detail"].as_str().unwrap_or("");
        assert!(
            detail.contains("slow_backend") && detail.contains("ACKed the request"),
            "{l}"
        );
    }
}

/// Issue 15, part 2: one of three upstreams answers every request after 3 s from t = 10 s
/// to t = 40 s, at 200 req/s, with `lb_policy = "peak_ewma"`. The goals, each
/// asserted: at most 20 requests slower than 1 s after the fault (nginx and HAProxy: ~1,990
/// over 30 s); the slow endpoint under 2 % of the requests from 2 s after the onset; the
/// healthy pool's p99 within 1.5× its pre-fault value (plus 5 ms of slack for a shared 2-vCPU
/// machine, whose scheduler alone moves a sub-millisecond p99 by that much; a regression that
/// sends requests to the slow endpoint costs seconds); back to its share within 10 s of
/// recovering. It is marked slow, never ejected as a network failure. Takes about 60 s.
#[test]
fn privileged_slow_backend_gets_a_trickle_and_its_share_back() {
    let s = Scenario::start_with(
        "slowewma",
        HttpBehaviour::immediate(),
        2,
        10_000,
        "lb_policy = \"peak_ewma\"",
        "",
    );
    let (onset, fast_again) = (10.0, 40.0);
    let (mut slowed, mut recovered) = (false, None);
    let samples = s.run_load(RATE, Duration::from_secs(55), |t| {
        if !slowed && t >= onset {
            s.servers[1].set_behaviour(HttpBehaviour::slow(Duration::from_secs(3)));
            slowed = true;
        }
        if recovered.is_none() && t >= fast_again {
            s.servers[1].set_behaviour(HttpBehaviour::immediate());
            recovered = Some(secs(std::time::SystemTime::now()));
        }
    });
    let bad = "upstream-2";
    let within = |a: f64, b: f64| samples.iter().filter(move |x| x.at >= a && x.at < b);
    let late = within(onset, 1e9)
        .filter(|x| x.latency > Duration::from_secs(1))
        .count();
    let to_bad = within(onset + 2.0, fast_again)
        .filter(|x| x.served_by == bad)
        .count();
    let share = to_bad as f64 / within(onset + 2.0, fast_again).count() as f64;
    let healthy = |a, b| -> Vec<&Sample> { within(a, b).filter(|x| x.served_by != bad).collect() };
    let (p99_before, p99_during) = (
        quantile(&healthy(2.0, onset), 0.99),
        quantile(&healthy(onset + 2.0, fast_again), 0.99),
    );
    // Each upstream's share over the 5 s that start 10 s after it is fast again.
    let back: Vec<&Sample> = within(fast_again + 10.0, fast_again + 15.0).collect();
    let share_of = |name: &str| {
        back.iter().filter(|x| x.served_by == name).count() as f64 * 100.0 / back.len() as f64
    };
    let shares_back = ["upstream-1", bad, "upstream-3"].map(share_of);
    let addr = bad_endpoint(&s);
    let noticed = s
        .log_lines(&["endpoint no longer slow", &format!("upstream={addr}")])
        .iter()
        .map(|(t, _)| secs(*t) - recovered.unwrap_or(f64::MAX))
        .find(|d| *d > 0.0);
    eprintln!(
        "slow backend (peak_ewma): {late} requests slower than 1 s after the onset; slow \
         endpoint share from 2 s after the onset {:.2} % ({to_bad} requests); healthy p99 \
         {p99_before:?} before, {p99_during:?} during; recovery noticed after {noticed:?} s; \
         shares 10-15 s after recovery (u1, u2, u3) {shares_back:.1?} %; {} failures",
        share * 100.0,
        failures(&samples).len()
    );
    assert_eq!(
        failures(&samples).len(),
        0,
        "{:?}",
        failures(&samples).first()
    );
    assert!(
        late <= 20,
        "{late} requests slower than 1 s after the onset"
    );
    assert!(share < 0.02, "slow endpoint share {:.2} %", share * 100.0);
    assert!(
        p99_during <= (p99_before * 3 / 2).max(p99_before + Duration::from_millis(5)),
        "healthy p99 {p99_during:?} during, {p99_before:?} before"
    );
    assert!(
        noticed.is_some_and(|d| d <= 10.0),
        "recovery noticed after {noticed:?} s"
    );
    // Back among the choices: a trickle is under 1 %. Under power of two choices "normal" is
    // not a third each: costs differ by each endpoint's recent peaks.
    assert!(
        shares_back[1] >= 10.0,
        "shares {shares_back:?} % from 10 s after recovering"
    );
    let marked = s.log_lines(&["endpoint slow", &format!("upstream={addr}")]);
    assert!(!marked.is_empty(), "the gateway said it was slow");
    assert!(
        !s.log_lines(&["endpoint no longer slow", &format!("upstream={addr}")])
            .is_empty(),
        "and that it recovered"
    );
    assert!(
        s.log_lines(&["endpoint ejected", &format!("upstream={addr}")])
            .is_empty(),
        "a slow endpoint is not ejected"
    );
}

#[test]
fn privileged_recovered_endpoint_returns_within_the_probe_schedule() {
    let s = Scenario::start("recovery", HttpBehaviour::immediate(), NO_POOL, 2000, "");
    let up = s.lab.upstream(1).unwrap();
    let (fault_on, fault_off) = (5.0, 15.0);
    let mut guard = None;
    let mut removed = 0.0;
    let samples = s.run_load(RATE, Duration::from_secs(35), |t| {
        if guard.is_none() && t >= fault_on && t < fault_off {
            guard = Some(up.apply(Fault::SynBlackhole { port: PORT }).expect("fault"));
        }
        if t >= fault_off && guard.is_some() {
            guard.take();
            removed = secs(std::time::SystemTime::now());
        }
    });
    report("recovery", &samples);
    assert_eq!(failures(&samples).len(), 0);
    let back = s.log_lines(&[
        "endpoint healthy again",
        &format!("upstream={}", bad_endpoint(&s)),
    ]);
    let recovered = back
        .iter()
        .map(|(t, _)| secs(*t) - removed)
        .find(|d| *d > 0.0)
        .expect("recovered after the fault ended");
    // Documented schedule: the ejection running when the fault ends (at most max_ejection_ms,
    // 30 s; here the back-off reached 8 s), one failing probe's connect (connect_timeout_ms,
    // 2 s) and `rise` = 2 probes 500 ms apart.
    let last_ejection_ms: f64 = s
        .log_lines(&[
            "endpoint ejected",
            &format!("upstream={}", bad_endpoint(&s)),
        ])
        .iter()
        .filter_map(|(_, l)| {
            l.split("ejection_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .fold(0.0, f64::max);
    let bound = last_ejection_ms / 1000.0 + 2.0 + 1.0 + 0.5;
    eprintln!("recovered {recovered:.2}s after the fault ended (bound {bound:.1}s)");
    assert!(
        recovered <= bound,
        "recovered {recovered:.2}s after the fault ended, schedule allows {bound:.1}s"
    );
    assert!(
        samples
            .iter()
            .any(|x| x.at > fault_off && x.served_by == "upstream-2"),
        "traffic returned"
    );
}

#[test]
fn privileged_healthy_control_run_has_no_false_positives() {
    let s = Scenario::start("control", HttpBehaviour::immediate(), 2, 2000, "");
    let samples = s.run_load(RATE, Duration::from_secs(60), |_| {});
    report("healthy control", &samples);
    assert_eq!(failures(&samples).len(), 0);
    assert!(
        s.log_lines(&["endpoint ejected"]).is_empty(),
        "{:?}",
        s.log_lines(&["endpoint ejected"])
    );
    assert!(
        s.log_lines(&["endpoint suspect"]).is_empty(),
        "{:?}",
        s.log_lines(&["endpoint suspect"])
    );
    let log = s.access_log();
    let hedged = log.iter().filter(|l| l["hedged"] == true).count();
    assert!(
        hedged * 10 <= log.len(),
        "hedges {hedged} of {} requests exceed the 10 % budget",
        log.len()
    );
    eprintln!("control: {hedged} hedges in {} requests", log.len());
}
