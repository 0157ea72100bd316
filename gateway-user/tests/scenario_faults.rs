//! Privileged scenario tests of the kernel-driven decisions (issue 4): the real gateway with
//! the eBPF observer attached, three upstreams, open-loop load at 200 req/s, and a fault on one
//! upstream that goes on mid-run and off again. Each asserts what a client and an operator
//! would notice: client-visible failures, latency after the fault, how fast the bad endpoint
//! stopped getting traffic, what the gateway logged, and how fast the endpoint came back once
//! the fault was over. Run with `--test-threads=1` (./dev test does).
//!
//! Every bound below is derived from the documented defaults (README, "decisions driven by
//! the kernel") and the scenario's own config, never from what the gateway logged about itself.

use std::time::Duration;

use gateway_lab::{Fault, HttpBehaviour};
use gateway_testkit::{
    gateway_bin,
    scenario::{Change, PORT, Sample, Scenario, failures, quantile, secs},
};

const RATE: u32 = 200;
/// Requests to one endpoint arrive this often under round robin over three.
const SPACING: f64 = 3.0 / RATE as f64;
/// The fault goes on here at the earliest: without keep-alive, every endpoint has had far
/// more than the 8 clean handshakes its adaptive connect deadline needs by then (with it, the
/// run also waits until `/status` says the deadline is measured).
const FAULT_AT: f64 = 3.0;
/// Connect faults: every request opens a new upstream connection, so every request to the bad
/// endpoint meets the fault (with keep-alive, pooled connections would hide a SYN blackhole).
const NO_POOL: usize = 0;
/// `connect_timeout_ms` of every scenario (`gateway_testkit::scenario`): the longest a probe's
/// connect can take.
const CONNECT_TIMEOUT: f64 = 2.0;
/// The adaptive deadline of a lab endpoint: its SYN-RTT is well under a millisecond, so
/// p99 × 3 + 10 ms is below `connect_deadline_floor_ms` (50 ms), the floor.
const DEADLINE: f64 = 0.050;

/// The documented health schedule (README): the n-th ejection in a row lasts `ejection_ms`
/// (1 s) × 2ⁿ⁻¹, capped at `max_ejection_ms` (30 s); then a probe every `probe_interval_ms`
/// (500 ms), and `rise` (2) successes bring the endpoint back. The scenarios run on these
/// defaults.
const EJECTION: f64 = 1.0;
const MAX_EJECTION: f64 = 30.0;
const PROBE_INTERVAL: f64 = 0.5;
const RISE: f64 = 2.0;
/// p99 latency after a connect fault stays under half the connect timeout, which is what a
/// request to the bad endpoint would wait without the adaptive deadline (a busy machine adds
/// its own delays to every request; the deadline itself is checked on the gateway's clock).
const P99_AFTER_FAULT: Duration = Duration::from_secs(1);
/// What the schedule leaves out: the gateway's 100 ms health tick (twice: the ejection's end,
/// and the last probe), a lab probe's own connect, and reading the log line.
const SLACK: f64 = 0.4;
/// The run ends once upstream 2 has answered this many requests after the fault ended.
const TAIL: u64 = 20;

/// The longest recovery the documented schedule allows once a fault of `fault_for` seconds is
/// over, when evidence of the fault can still arrive up to `late` seconds after it ended (a
/// probe's connect started just before the end, or a request's response timeout). That last
/// failure starts the next ejection, which runs in full, and then `rise` probes succeed,
/// `probe_interval` apart. The n-th ejection in a row cannot start before the n-1 before it
/// ran (1 + 2 + … + 2ⁿ⁻² s after the fault began), and it started at most `late` after the
/// fault ended, so the longest one possible is the largest `ejection_ms` × 2ʲ ≤
/// `fault_for + late + ejection_ms`.
fn recovery_bound(fault_for: f64, late: f64) -> f64 {
    let mut longest = EJECTION;
    while longest * 2.0 <= (fault_for + late + EJECTION).min(MAX_EJECTION) {
        longest *= 2.0;
    }
    late + longest + (RISE - 1.0) * PROBE_INTERVAL + SLACK
}

fn bad_endpoint(s: &Scenario) -> String {
    s.lab.upstream(1).unwrap().addr_v4(PORT).to_string()
}

/// What goes wrong on upstream 2.
#[derive(Clone)]
enum Inject {
    Net(Fault),
    /// The backend answers after this long.
    Slow(Duration),
}

/// One fault run on upstream 2.
struct Plan {
    rate: u32,
    inject: Inject,
    /// The fault goes on at `FAULT_AT` at the earliest, and, when this is set, only once
    /// upstream 2's connect deadline is measured (keep-alive hides handshakes: then the
    /// measuring probes, one per 100 ms tick, bring the eight it needs).
    wait_for_measured_deadline: bool,
    /// Seconds the fault stays on.
    fault_for: f64,
    /// The run ends once upstream 2 has answered this many requests after the fault...
    tail: u64,
    /// ...or at the latest this many seconds after the fault ended.
    give_up: f64,
}

struct Run {
    s: Scenario,
    samples: Vec<Sample>,
    on: Change,
    off: Change,
}

fn run(s: Scenario, plan: Plan) -> Run {
    use std::sync::Mutex;
    let up = s.lab.upstream(1).unwrap();
    let server = &s.servers[1];
    let bad = bad_endpoint(&s);
    let on: Mutex<Option<Change>> = Mutex::new(None);
    let off: Mutex<Option<(Change, u64)>> = Mutex::new(None);
    let guard = Mutex::new(None);
    let (mut asked_on, mut asked_off) = (None, false);
    // Wall-clock time of the load run's start: the first tick comes with the first request.
    let mut start = None;
    let limit = Duration::from_secs_f64(60.0 + plan.fault_for + plan.give_up);
    // Faults go on and off on threads of their own: iptables takes tens of milliseconds, and
    // the load generator's runtime must not stall meanwhile (its requests in flight would
    // look slow).
    let samples = std::thread::scope(|scope| {
        s.run_load(plan.rate, limit, |t| {
            let start = *start.get_or_insert_with(|| secs(std::time::SystemTime::now()));
            if asked_on.is_none()
                && t >= FAULT_AT
                && (!plan.wait_for_measured_deadline || s.deadline_measured_here(&bad))
            {
                asked_on = Some(t);
                let (on, guard, inject) = (&on, &guard, &plan.inject);
                scope.spawn(move || {
                    let (c, g) = Change::record(t, start, || match inject {
                        Inject::Net(f) => Some(up.apply(f.clone()).expect("fault")),
                        Inject::Slow(d) => {
                            server.set_behaviour(HttpBehaviour::slow(*d));
                            None
                        }
                    });
                    *guard.lock().unwrap() = g;
                    *on.lock().unwrap() = Some(c);
                });
            }
            assert!(
                asked_on.is_some() || t < 30.0,
                "upstream 2's connect deadline never became measured"
            );
            let done_on = *on.lock().unwrap();
            if let Some(o) = done_on
                && !asked_off
                && t >= o.t + plan.fault_for
            {
                asked_off = true;
                let (off, guard) = (&off, &guard);
                scope.spawn(move || {
                    let (c, ()) = Change::record(t, start, || {
                        guard.lock().unwrap().take();
                        server.set_behaviour(HttpBehaviour::immediate());
                    });
                    *off.lock().unwrap() = Some((c, server.requests()));
                });
            }
            match *off.lock().unwrap() {
                // Upstream 2 receives requests again: the gateway sends it traffic once more.
                Some((o, answered)) => {
                    server.requests() < answered + plan.tail && t < o.t + plan.give_up
                }
                None => true,
            }
        })
    });
    let on = on.into_inner().unwrap().expect("the fault went on");
    let (off, _) = off.into_inner().unwrap().expect("the fault went off");
    Run {
        samples,
        on,
        off,
        s,
    }
}

impl Run {
    fn report(&self, name: &str) {
        let after = self.after_fault();
        let by: std::collections::BTreeMap<&str, usize> =
            after.iter().fold(Default::default(), |mut m, x| {
                *m.entry(x.served_by.as_str()).or_default() += 1;
                m
            });
        eprintln!(
            "{name}: {} requests, {} failures; fault {:.1}..{:.1} s; after the fault p50 {:?} p99 {:?} max {:?}; served by {by:?}",
            self.samples.len(),
            failures(&self.samples).len(),
            self.on.t,
            self.off.t,
            quantile(&after, 0.5),
            quantile(&after, 0.99),
            quantile(&after, 1.0)
        );
        let mut slowest: Vec<&&Sample> = after.iter().collect();
        slowest.sort_by_key(|x| std::cmp::Reverse(x.latency));
        for x in slowest.iter().take(5) {
            eprintln!(
                "  slowest: sent at {:.3} s, {:?}, {} {}",
                x.at, x.latency, x.status, x.served_by
            );
        }
    }

    /// How long the fault was on, at most (from just before it went on to just after it went
    /// off).
    fn fault_for(&self) -> f64 {
        self.off.after - self.on.before
    }

    /// Every request sent once the fault was on.
    fn after_fault(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|x| x.at >= self.on.t).collect()
    }

    fn assert_no_failures(&self) {
        let f = failures(&self.samples);
        assert!(
            f.is_empty(),
            "{} client-visible failures: {:?}",
            f.len(),
            &f[..f.len().min(5)]
        );
    }

    /// Requests whose first attempt went to upstream 2 and failed with `error`, as the access
    /// log has them: there are some, and their median time in the gateway (first attempt and
    /// the one that answered) is within `lo_ms..hi_ms`. The median, so that a busy machine's
    /// outliers do not decide.
    fn assert_first_attempts(&self, error: &str, lo_ms: f64, hi_ms: f64) -> f64 {
        let bad = bad_endpoint(&self.s);
        let mut ms: Vec<f64> = self
            .s
            .access_log()
            .iter()
            .filter(|l| l["endpoints"][0] == bad.as_str() && l["attempt_errors"][0] == error)
            .map(|l| l["total_ms"].as_f64().expect("total_ms"))
            .collect();
        assert!(!ms.is_empty(), "no request met upstream 2's {error}");
        ms.sort_by(f64::total_cmp);
        let median = ms[ms.len() / 2];
        assert!(
            (lo_ms..hi_ms).contains(&median),
            "{} requests met upstream 2's {error}: median {median:.1} ms, expected {lo_ms}..{hi_ms} ms",
            ms.len()
        );
        median
    }

    /// The gateway's "endpoint ejected" lines for upstream 2, as (seconds after the fault went
    /// on, line). None may come before the fault, and no other endpoint may be ejected.
    fn ejections(&self) -> Vec<(f64, String)> {
        let bad = bad_endpoint(&self.s);
        let all = self.s.log_lines(&["endpoint ejected"]);
        for (t, l) in &all {
            assert!(
                l.contains(&format!("upstream={bad}")),
                "a healthy endpoint was ejected: {l}"
            );
            assert!(
                secs(*t) >= self.on.before,
                "ejected {:.3} s before the fault: {l}",
                self.on.before - secs(*t)
            );
        }
        all.into_iter()
            .map(|(t, l)| (secs(t) - self.on.before, l))
            .collect()
    }

    /// The first ejection of upstream 2 came within `within` seconds of the fault, with `reason`.
    fn assert_ejected(&self, reasons: &[&str], within: f64) -> Vec<(f64, String)> {
        let ej = self.ejections();
        let (after, line) = ej.first().expect("the bad endpoint is ejected");
        assert!(
            reasons
                .iter()
                .any(|r| line.contains(&format!("reason=\"{r}\""))
                    || line.contains(&format!("reason={r}"))),
            "ejected for {reasons:?}: {line}"
        );
        let late = self.on.after - self.on.before;
        assert!(
            *after <= within + late,
            "ejected {after:.3} s after the fault, the documented rule allows {within:.3} s: {line}"
        );
        ej
    }

    /// The n-th ejection in a row lasted `ejection_ms` × 2ⁿ⁻¹ (as logged: `ejection_ms=`).
    fn assert_backoff(&self, ej: &[(f64, String)]) {
        let logged: Vec<u64> = ej
            .iter()
            .map(|(_, l)| {
                l.split("ejection_ms=")
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or_else(|| panic!("no ejection_ms in {l}"))
            })
            .collect();
        let documented: Vec<u64> = (0..logged.len())
            .map(|n| ((EJECTION * 1000.0) as u64 * (1 << n)).min((MAX_EJECTION * 1000.0) as u64))
            .collect();
        assert_eq!(logged, documented, "the back-off of successive ejections");
    }

    /// While the fault was on, upstream 2 answered no request. Requests sent in the last
    /// 100 ms before the fault went off may reach upstream 2 after it did.
    fn assert_silent_during_the_fault(&self) {
        let during: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|x| {
                x.at >= self.on.t_done && x.at < self.off.t - 0.1 && x.served_by == "upstream-2"
            })
            .collect();
        assert!(
            during.is_empty(),
            "upstream 2 answered {} requests sent while it was failing: {:?}",
            during.len(),
            &during[..during.len().min(3)]
        );
    }

    /// After the fault, upstream 2 answered requests again within `bound` seconds
    /// (client-visible recovery); returns when, in seconds after the fault ended.
    fn assert_client_recovery(&self, bound: f64) -> f64 {
        let back = self
            .samples
            .iter()
            .find(|x| x.at >= self.off.t && x.served_by == "upstream-2")
            .map(|x| x.at - self.off.t_done)
            .expect("upstream 2 answered requests again after the fault");
        assert!(
            back <= bound,
            "upstream 2 answered again {back:.2} s after the fault ended; the documented schedule allows {bound:.2} s"
        );
        back
    }

    /// Every return from an ejection kept the documented schedule: the n-th ejection in a row
    /// lasted `ejection_ms` × 2ⁿ⁻¹, then `rise` probes `probe_interval` apart succeeded. Timed
    /// from when the gateway logged the ejection to when it logged the endpoint healthy, so it
    /// holds whatever the gateway says the ejection lasts. Returns how many it checked.
    fn assert_recoveries_follow_the_schedule(&self) -> usize {
        let bad = format!("upstream={}", bad_endpoint(&self.s));
        let (mut n, mut ejected_at, mut checked) = (0, None, 0);
        for (t, line) in self.s.log_lines(&[&bad]) {
            let t = secs(t);
            if line.contains("endpoint ejected") {
                n += 1;
                ejected_at = Some(t);
            } else if line.contains("endpoint suspect") {
                ejected_at = None;
            } else if line.contains("endpoint healthy again")
                && let Some(e) = ejected_at.take()
            {
                let ejection = (EJECTION * 2f64.powi(n - 1)).min(MAX_EJECTION);
                let least = ejection + (RISE - 1.0) * PROBE_INTERVAL;
                let took = t - e;
                assert!(
                    took >= least - 0.02 && took <= least + SLACK,
                    "healthy {took:.3} s after ejection {n}: the schedule says {least:.1} s ({ejection} s ejected, then {RISE} probes {PROBE_INTERVAL} s apart): {line}"
                );
                checked += 1;
            }
        }
        checked
    }

    /// The gateway logged upstream 2 healthy again within `bound` seconds of the fault's end,
    /// and not before `rise` probes `probe_interval` apart could have succeeded.
    fn assert_logged_recovery(&self, bound: f64) -> f64 {
        let bad = bad_endpoint(&self.s);
        let (t, line) = self
            .s
            .log_lines(&["endpoint healthy again", &format!("upstream={bad}")])
            .into_iter()
            .find(|(t, _)| secs(*t) >= self.off.before)
            .expect("the gateway logged the endpoint healthy again after the fault");
        let earliest = secs(t) - self.off.before;
        let latest = secs(t) - self.off.after;
        assert!(
            earliest >= (RISE - 1.0) * PROBE_INTERVAL,
            "healthy {earliest:.3} s after the fault ended: faster than {RISE} probes {PROBE_INTERVAL} s apart ({line})"
        );
        assert!(
            latest <= bound,
            "healthy {latest:.2} s after the fault ended; the documented schedule allows {bound:.2} s ({line})"
        );
        latest
    }
}

/// A connect fault on upstream 2 for `fault_for` seconds, every request on a new connection:
/// no client-visible failure, ejected within `eject_within` for one of `reasons`, the requests
/// that met the fault answered in `first_attempt` (its error, and the range of their median
/// time in ms), p99 latency after the fault under half the connect timeout, the back-off as
/// documented, nothing served by upstream 2 during the fault, and back within the schedule,
/// where a failing probe takes at most `failing_probe` seconds.
fn connect_fault(
    name: &str,
    fault: Fault,
    fault_for: f64,
    reasons: &[&str],
    eject_within: f64,
    failing_probe: f64,
    first_attempt: (&str, f64, f64),
) -> Run {
    let s = Scenario::start(
        gateway_bin!(),
        name,
        HttpBehaviour::immediate(),
        NO_POOL,
        2000,
        "",
    );
    let r = run(
        s,
        Plan {
            rate: RATE,
            inject: Inject::Net(fault),
            wait_for_measured_deadline: true,
            fault_for,
            tail: TAIL,
            give_up: recovery_bound(fault_for + 0.5, failing_probe) + 1.0,
        },
    );
    r.report(name);
    r.assert_no_failures();
    let ej = r.assert_ejected(reasons, eject_within);
    r.assert_backoff(&ej);
    // A request to the bad endpoint waits at most its connect deadline before it is hedged
    // or retried elsewhere (about 50 ms on an idle machine); without the adaptive deadline a
    // SYN would wait for the 2 s connect timeout. The bound leaves room for a busy machine.
    let p99 = quantile(&r.after_fault(), 0.99);
    assert!(p99 < P99_AFTER_FAULT, "p99 after the fault {p99:?}");
    let (error, lo, hi) = first_attempt;
    let median = r.assert_first_attempts(error, lo, hi);
    r.assert_silent_during_the_fault();
    assert!(r.assert_recoveries_follow_the_schedule() >= 1);
    let bound = recovery_bound(r.fault_for(), failing_probe);
    let logged = r.assert_logged_recovery(bound);
    let client = r.assert_client_recovery(bound);
    eprintln!(
        "{name}: ejected {:.3} s after the fault ({} ejections); requests that met it took {median:.1} ms (median); healthy again {logged:.2} s and serving {client:.2} s after it ended (bound {bound:.2} s)",
        ej[0].0,
        ej.len()
    );
    r
}

#[test]
fn privileged_syn_blackhole_is_ejected_fast_hidden_from_clients_and_recovers() {
    // The first connect after the fault misses its deadline (suspect), the next one in flight
    // too (ejected): two deadlines and the round-robin spacing.
    let r = connect_fault(
        "synbh",
        Fault::SynBlackhole { port: PORT },
        4.0,
        &["syn_unanswered"],
        2.0 * SPACING + DEADLINE + SLACK / 2.0,
        CONNECT_TIMEOUT,
        // Cut at the 50 ms deadline, never before; not the 2 s connect timeout.
        (
            "connect_timeout",
            DEADLINE * 1000.0,
            5.0 * DEADLINE * 1000.0,
        ),
    );
    let bad = bad_endpoint(&r.s);
    let suspect = r.s.log_lines(&[
        "endpoint suspect",
        &format!("upstream={bad}"),
        "syn_unanswered",
    ]);
    let first_suspect = secs(suspect.first().expect("suspect first").0) - r.on.before;
    assert!(
        first_suspect >= DEADLINE,
        "suspect {first_suspect:.3} s after the fault"
    );
}

// Refused and unreachable: 2.5 s of fault end inside the second ejection (1 s, a probe
// refused at once, then 2 s), so the first probe after it succeeds.
#[test]
fn privileged_refused_is_ejected_at_once_and_recovers() {
    let r = connect_fault(
        "refused",
        Fault::Refuse { port: PORT },
        2.5,
        &["refused"],
        SPACING + SLACK / 2.0,
        SLACK / 4.0,
        // The RST ends the attempt before any deadline could.
        ("connect_refused", 0.0, DEADLINE * 1000.0),
    );
    // Stopping the scenario stops the gateway before its lab: SIGTERM, not the lab's SIGKILL,
    // so the gateway removes the cgroup it made.
    let cgroup = r.s.cgroup();
    assert!(
        cgroup.ends_with(format!("gateway-scenario-refused-{}", r.s.gateway.pid())),
        "{}",
        cgroup.display()
    );
    drop(r);
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
}

#[test]
fn privileged_icmp_unreachable_is_ejected_at_once_and_recovers() {
    connect_fault(
        "icmp",
        Fault::HostUnreachable { port: PORT },
        2.5,
        &["unreachable"],
        SPACING + SLACK / 2.0,
        SLACK / 4.0,
        ("connect_unreachable", 0.0, DEADLINE * 1000.0),
    );
}

#[test]
fn privileged_syn_ack_delay_is_hedged_and_the_endpoint_takes_its_share_again() {
    const DELAY: Duration = Duration::from_millis(200);
    // A SYN-ACK later than the deadline looks like a lost SYN: two misses in a row eject
    // (README). A probe's connect waits for the delayed SYN-ACK and succeeds, so evidence
    // of the fault can come at most a deadline and the delay after it ended.
    let late = DEADLINE + DELAY.as_secs_f64();
    let fault_for = 3.0;
    let s = Scenario::start(
        gateway_bin!(),
        "synackdelay",
        HttpBehaviour::immediate(),
        NO_POOL,
        2000,
        "",
    );
    let r = run(
        s,
        Plan {
            rate: RATE,
            inject: Inject::Net(Fault::SynAckDelay {
                port: PORT,
                delay: DELAY,
            }),
            wait_for_measured_deadline: true,
            fault_for,
            // About 1.5 s of upstream 2's share of the traffic after it is back.
            tail: 100,
            give_up: recovery_bound(fault_for + 0.5, late) + 2.0,
        },
    );
    r.report("syn-ack delay");
    r.assert_no_failures();
    // Without the adaptive deadline a third of the requests would wait for the delayed
    // SYN-ACK (so p90 would be the delay); with it, those that meet it are hedged at the
    // 50 ms deadline, well before the SYN-ACK.
    let p90 = quantile(&r.after_fault(), 0.9);
    assert!(p90 < DELAY, "p90 after the fault {p90:?}");
    r.assert_first_attempts(
        "connect_timeout",
        DEADLINE * 1000.0,
        DELAY.as_secs_f64() * 1000.0,
    );
    let log = r.s.access_log();
    let hedged: Vec<&serde_json::Value> = log.iter().filter(|l| l["hedged"] == true).collect();
    assert!(!hedged.is_empty(), "hedging took part");
    let bad = bad_endpoint(&r.s);
    for l in &hedged {
        assert_eq!(
            l["endpoints"][0],
            bad.as_str(),
            "hedged away from the slow SYN-ACK: {l}"
        );
        assert_eq!(l["attempt_errors"][0], "connect_timeout", "{l}");
        assert_eq!(l["status"], 200, "{l}");
    }
    let ej = r.assert_ejected(&["syn_unanswered"], 2.0 * SPACING + DEADLINE + SLACK / 2.0);
    r.assert_backoff(&ej);
    assert!(r.assert_recoveries_follow_the_schedule() >= 1);
    let bound = recovery_bound(r.fault_for(), late);
    let back = r.assert_client_recovery(bound);
    // Once back, it takes its round-robin third again.
    let after: Vec<&Sample> = r
        .samples
        .iter()
        .filter(|x| x.at >= r.off.t_done + back + 0.2)
        .collect();
    let share = after.iter().filter(|x| x.served_by == "upstream-2").count() as f64
        / after.len().max(1) as f64;
    eprintln!(
        "syn-ack delay: serving again {back:.2} s after the delay ended (bound {bound:.2} s), then {share:.2} of {} requests",
        after.len()
    );
    assert!(
        after.len() >= 100 && (0.28..=0.39).contains(&share),
        "upstream 2 served {share:.2} of {} requests once back",
        after.len()
    );
}

#[test]
fn privileged_whole_host_blackhole_loses_no_get_and_recovers() {
    // Keep-alive on: requests in flight on pooled connections stall when the host dies.
    let s = Scenario::start(
        gateway_bin!(),
        "hostbh",
        HttpBehaviour::immediate(),
        2,
        2000,
        "",
    );
    let r = whole_host_blackhole(s);
    let bound = recovery_bound(r.fault_for(), CONNECT_TIMEOUT);
    r.report("whole-host blackhole");
    let log = r.s.access_log();
    for l in log
        .iter()
        .filter(|l| l["total_ms"].as_f64().unwrap_or(0.0) > 500.0)
        .take(3)
    {
        eprintln!("slow request: {l}");
    }
    r.assert_no_failures();
    // New connects miss their deadline (syn_unanswered, within 0.1 s); a request stranded on
    // a pooled connection sees RTOs with its bytes unACKed (host_died): the first RTO comes
    // at least 200 ms (TCP_RTO_MIN) after a tail-loss probe, and the gateway looks every
    // 200 ms: about 0.6 s.
    let ej = r.assert_ejected(&["syn_unanswered", "host_died"], 0.8);
    r.assert_backoff(&ej);
    // Requests stranded on the dead host were moved by kernel evidence, not by the 2 s
    // response timer.
    assert_moved_on_host_died(&r, &log, "requests");
    assert!(
        !log.iter().any(|l| l["attempt_errors"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e == "response_timeout"))),
        "no request waited for the response timer"
    );
    // New connects to the dead host are hedged at their measured deadline; only the few
    // requests stranded on pooled connections wait for the kernel's RTOs.
    r.assert_first_attempts(
        "connect_timeout",
        DEADLINE * 1000.0,
        5.0 * DEADLINE * 1000.0,
    );
    let after = r.after_fault();
    assert!(
        quantile(&after, 0.99) < P99_AFTER_FAULT,
        "p99 after the fault {:?}",
        quantile(&after, 0.99)
    );
    assert!(
        quantile(&after, 1.0) < Duration::from_secs(1),
        "max latency after the fault {:?}",
        quantile(&after, 1.0)
    );
    r.assert_silent_during_the_fault();
    assert!(r.assert_recoveries_follow_the_schedule() >= 1);
    let logged = r.assert_logged_recovery(bound);
    let client = r.assert_client_recovery(bound);
    eprintln!(
        "hostbh: healthy again {logged:.2} s and serving {client:.2} s after the fault ended (bound {bound:.2} s)"
    );
}

#[test]
fn privileged_whole_host_blackhole_loses_no_post() {
    // As above, with POSTs (1 KiB bodies): not idempotent, so a POST stranded on a pooled
    // connection to the dead host may be sent again only because the kernel shows that none
    // of its bytes were ACKed (issue 15: nginx and HAProxy each fail 2 after 30 s here).
    let s = Scenario::start(
        gateway_bin!(),
        "hostbhpost",
        HttpBehaviour::immediate(),
        2,
        2000,
        "",
    )
    .posting(1024);
    let r = whole_host_blackhole(s);
    r.report("whole-host blackhole, POST");
    r.assert_no_failures();
    r.assert_ejected(&["syn_unanswered", "host_died"], 0.8);
    let log = r.s.access_log();
    assert!(
        log.iter().all(|l| l["method"] == "POST"),
        "the load was POSTs"
    );
    assert_moved_on_host_died(&r, &log, "POSTs");
}

/// The whole host behind upstream 2 goes dark (every packet dropped, established connections
/// too) for 3 s, under the scenario's load, once its connect deadline is measured.
fn whole_host_blackhole(s: Scenario) -> Run {
    let fault_for = 3.0;
    run(
        s,
        Plan {
            rate: RATE,
            inject: Inject::Net(Fault::Blackhole { port: PORT }),
            wait_for_measured_deadline: true,
            fault_for,
            tail: TAIL,
            give_up: recovery_bound(fault_for + 0.5, CONNECT_TIMEOUT) + 1.0,
        },
    )
}

/// Requests stranded on a pooled connection to the dead host (`upstream_host_died` among
/// their attempts' errors): there is at least one, and each was answered 200 after a first
/// attempt on the bad endpoint, well before the 2000 ms response timeout.
fn assert_moved_on_host_died(r: &Run, log: &[serde_json::Value], what: &str) {
    let moved: Vec<&serde_json::Value> = log
        .iter()
        .filter(|l| {
            l["attempt_errors"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e == "upstream_host_died"))
        })
        .collect();
    eprintln!(
        "{what} sent again after upstream_host_died: {}",
        moved.len()
    );
    assert!(
        !moved.is_empty(),
        "one of the {what} stranded on a pooled connection to the dead host is sent again"
    );
    for l in &moved {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["endpoints"][0], bad_endpoint(&r.s).as_str(), "{l}");
        assert!(
            l["total_ms"].as_f64().unwrap() < 1000.0,
            "moved on kernel evidence, well before the 2000 ms response timeout: {l}"
        );
    }
}

#[test]
fn privileged_slow_backend_is_ejected_as_slow_backend_not_a_network_failure_and_recovers() {
    const RESPONSE_TIMEOUT: f64 = 1.0;
    const RATE_SLOW: u32 = RATE / 4;
    let s = Scenario::start(
        gateway_bin!(),
        "slow",
        HttpBehaviour::immediate(),
        2,
        1000,
        "",
    );
    let fault_for = 3.0;
    // Requests sent before the backend was fast again time out up to a response timeout
    // after; the last of them can start an ejection then.
    let r = run(
        s,
        Plan {
            rate: RATE_SLOW,
            inject: Inject::Slow(Duration::from_secs(3)),
            wait_for_measured_deadline: false,
            fault_for,
            tail: TAIL,
            give_up: recovery_bound(fault_for + 0.5, RESPONSE_TIMEOUT) + 1.0,
        },
    );
    let bound = recovery_bound(r.fault_for(), RESPONSE_TIMEOUT);
    r.report("slow backend");
    // Five response timeouts in a row eject: the fifth request to the slow endpoint was sent
    // within five round-robin spacings of the fault, and timed out a response timeout later;
    // never before one response timeout.
    let spacing = 3.0 / RATE_SLOW as f64;
    let ej = r.assert_ejected(
        &["slow_backend"],
        RESPONSE_TIMEOUT + 5.0 * spacing + SLACK / 2.0,
    );
    assert!(
        ej[0].0 >= RESPONSE_TIMEOUT,
        "ejected {:.3} s after the backend turned slow, before a single response timeout",
        ej[0].0
    );
    for (_, line) in &ej {
        assert!(
            line.contains("slow_backend"),
            "ejected as a network failure: {line}"
        );
    }
    r.assert_backoff(&ej);
    let timeouts: Vec<serde_json::Value> =
        r.s.access_log()
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
    r.assert_silent_during_the_fault();
    assert!(r.assert_recoveries_follow_the_schedule() >= 1);
    let client = r.assert_client_recovery(bound);
    eprintln!("slow: serving again {client:.2} s after the backend was fast (bound {bound:.2} s)");
}

/// Issue 15, part 2: one of three upstreams answers every request after 3 s from t = 10 s
/// to t = 40 s, at 200 req/s, with `lb_policy = "peak_ewma"`. The goals, each
/// asserted: at most 20 requests slower than 1 s after the fault (nginx and HAProxy: ~1,990
/// over 30 s), counted among those the gateway sent to the slow endpoint (the host's own
/// stalls make requests to healthy ones late too, and are printed apart); the slow endpoint under 2 % of the requests from 2 s after the onset; the
/// healthy pool's p99 within 1.5× its pre-fault value (plus [`P99_SLACK`] and the longest stall
/// of the host itself while the fault was on, [`HostStalls`]: a shared 2-vCPU machine moves a
/// millisecond p99 by tens of milliseconds, and at times by seconds, whatever the gateway does;
/// a regression that sends requests to the slow endpoint costs 3 s each); back to its share
/// within 10 s of
/// recovering. It is marked slow, never ejected as a network failure. Takes about 60 s.
#[test]
fn privileged_slow_backend_gets_a_trickle_and_its_share_back() {
    const P99_SLACK: Duration = Duration::from_millis(50);
    let s = Scenario::start_with(
        gateway_bin!(),
        "slowewma",
        HttpBehaviour::immediate(),
        2,
        10_000,
        "lb_policy = \"peak_ewma\"",
        "",
    );
    let (onset, fast_again) = (10.0, 40.0);
    let (mut slowed, mut recovered) = (false, None);
    let canary = HostStalls::start();
    let samples = s.run_load(RATE, Duration::from_secs(55), |t| {
        if !slowed && t >= onset {
            s.servers[1].set_behaviour(HttpBehaviour::slow(Duration::from_secs(3)));
            slowed = true;
        }
        if recovered.is_none() && t >= fast_again {
            s.servers[1].set_behaviour(HttpBehaviour::immediate());
            recovered = Some(secs(std::time::SystemTime::now()));
        }
        true
    });
    let stalls = canary.stop();
    let bad = "upstream-2";
    let within = |a: f64, b: f64| samples.iter().filter(move |x| x.at >= a && x.at < b);
    let late = within(onset, 1e9)
        .filter(|x| x.latency > Duration::from_secs(1))
        .count();
    let addr = bad_endpoint(&s);
    // The late requests the slow backend made late: those the gateway sent there (first or as
    // a retry), by its access log. The others, late on a healthy endpoint, are the host's own
    // stalls (a load of 8-10 on 2 vCPUs: clients, gateway and upstreams wait for a CPU).
    let late_at_slow = s
        .access_log()
        .iter()
        .filter(|l| {
            l["total_ms"].as_f64().is_some_and(|ms| ms > 1000.0)
                && l["endpoints"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e == addr.as_str()))
        })
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
    // The host's own stalls while the fault was on: what a thread asking for 10 ms of sleep
    // got beyond that, at most. A stall delays every request through the gateway alike.
    let stall = stalls.longest(onset + 2.0, fast_again);
    // Each upstream's share over the 5 s that start 10 s after it is fast again.
    let back: Vec<&Sample> = within(fast_again + 10.0, fast_again + 15.0).collect();
    let share_of = |name: &str| {
        back.iter().filter(|x| x.served_by == name).count() as f64 * 100.0 / back.len() as f64
    };
    let shares_back = ["upstream-1", bad, "upstream-3"].map(share_of);
    let noticed = s
        .log_lines(&["endpoint no longer slow", &format!("upstream={addr}")])
        .iter()
        .map(|(t, _)| secs(*t) - recovered.unwrap_or(f64::MAX))
        .find(|d| *d > 0.0);
    eprintln!(
        "slow backend (peak_ewma): {late} requests slower than 1 s after the onset, \
         {late_at_slow} of them sent to the slow endpoint; slow \
         endpoint share from 2 s after the onset {:.2} % ({to_bad} requests); healthy p99 \
         {p99_before:?} before, {p99_during:?} during (longest host stall {stall:?}); recovery noticed after {noticed:?} s; \
         shares 10-15 s after recovery (u1, u2, u3) {shares_back:.1?} %; {} failures",
        share * 100.0,
        failures(&samples).len()
    );
    if !failures(&samples).is_empty() || late > 20 || shares_back[1] < 10.0 {
        // What the host and the gateway were doing: late and failed requests per second, and
        // the gateway's log, kept for a look after the test.
        let mut per_s = std::collections::BTreeMap::<u64, (usize, usize, usize)>::new();
        for x in &samples {
            let e = per_s.entry(x.at as u64).or_default();
            e.0 += 1;
            e.1 += usize::from(x.latency > Duration::from_secs(1));
            e.2 += usize::from(x.status != 200);
        }
        let busy: Vec<_> = per_s.iter().filter(|(_, v)| v.1 + v.2 > 0).collect();
        // Where each second's requests went once the backend was fast again (u1, u2, u3).
        let mut after = std::collections::BTreeMap::<u64, [usize; 3]>::new();
        for x in within(fast_again - 1.0, fast_again + 15.0) {
            let i = ["upstream-1", bad, "upstream-3"]
                .iter()
                .position(|n| x.served_by == *n);
            if let Some(i) = i {
                after.entry(x.at as u64).or_default()[i] += 1;
            }
        }
        eprintln!("requests per second by upstream around the recovery: {after:?}");
        let keep = gateway_testkit::tempdir::temp_dir("slowewma-failed");
        let _ = std::fs::write(keep.join("gateway.log"), s.gateway.text());
        let _ = std::fs::copy(&s.access_log, keep.join("access.log"));
        eprintln!(
            "seconds with late or failed requests (sent, late, failed): {busy:?}; gateway log \
             and access log kept in {}",
            keep.display()
        );
    }
    assert_eq!(
        failures(&samples).len(),
        0,
        "{:?}",
        failures(&samples).first()
    );
    assert!(
        late_at_slow <= 20,
        "{late_at_slow} requests sent to the slow endpoint took more than 1 s ({late} late in all)"
    );
    assert!(share < 0.02, "slow endpoint share {:.2} %", share * 100.0);
    assert!(
        p99_during <= (p99_before * 3 / 2).max(p99_before + P99_SLACK) + stall,
        "healthy p99 {p99_during:?} during, {p99_before:?} before, longest host stall {stall:?}"
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

/// A thread that sleeps 10 ms at a time and records how much longer each sleep took: the
/// host's scheduling stalls (on a shared 2-vCPU machine at a load of 8-10 they reach seconds,
/// and delay every request alike, whatever the gateway decides).
struct HostStalls {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Stalls>,
}

/// (seconds since the start, how much longer than asked a sleep took).
struct Stalls(Vec<(f64, Duration)>);

impl HostStalls {
    fn start() -> HostStalls {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            const TICK: Duration = Duration::from_millis(10);
            let start = std::time::Instant::now();
            let mut v = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                std::thread::sleep(TICK);
                v.push((
                    t.duration_since(start).as_secs_f64(),
                    t.elapsed().saturating_sub(TICK),
                ));
            }
            Stalls(v)
        });
        HostStalls { stop, thread }
    }

    fn stop(self) -> Stalls {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the stall canary")
    }
}

impl Stalls {
    /// The longest stall that began within `a..b` seconds of the start.
    fn longest(&self, a: f64, b: f64) -> Duration {
        self.0
            .iter()
            .filter(|(t, _)| (a..b).contains(t))
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    }
}

/// No fault at all: nothing may be ejected, suspected or failed. Zero events in n requests
/// bound their rate below 3/n at 95 % confidence (the rule of three): 400 req/s for 30 s
/// sends the same 12,000 requests as the former 200 req/s for 60 s, so the check keeps its
/// power in half the time, and at twice the load. Keep-alive on, as in production.
#[test]
fn privileged_healthy_control_run_has_no_false_positives() {
    const CONTROL_RATE: u32 = 2 * RATE;
    const CONTROL_RUN: Duration = Duration::from_secs(30);
    let s = Scenario::start(
        gateway_bin!(),
        "control",
        HttpBehaviour::immediate(),
        2,
        2000,
        "",
    );
    let samples = s.run_load(CONTROL_RATE, CONTROL_RUN, |_| true);
    let all: Vec<&Sample> = samples.iter().collect();
    eprintln!(
        "healthy control: {} requests, p50 {:?} p99 {:?} max {:?}",
        samples.len(),
        quantile(&all, 0.5),
        quantile(&all, 0.99),
        quantile(&all, 1.0)
    );
    assert_eq!(samples.len(), 12_000);
    assert_eq!(
        failures(&samples).len(),
        0,
        "{:?}",
        failures(&samples).first()
    );
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
    // One access-log line per request (the writer flushes once its queue is empty).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = s.access_log();
        if log.len() >= samples.len() || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(log.len(), samples.len(), "one access-log line per request");
    let hedged = log.iter().filter(|l| l["hedged"] == true).count();
    let retried = log.iter().filter(|l| l["retries"] != 0).count();
    eprintln!(
        "control: {hedged} hedges, {retried} retries in {} requests",
        log.len()
    );
    assert_eq!(
        (hedged, retried),
        (0, 0),
        "nothing to hedge or retry on a healthy lab"
    );
}
