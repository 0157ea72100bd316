//! A request with nowhere else to go (a cluster of one endpoint) is not given up on the
//! kernel's first sign of trouble, which is meant for a retry elsewhere: a connect past its
//! measured deadline runs on to `connect_timeout_ms`, where the kernel's SYN retransmit may
//! establish it, and a stall on an established connection is waited out until it lasts
//! (`decide::evidence::STALL_ALONE`, 3 s). Both used to fail the request at
//! once: a black-box audit had 57 of 200 requests fail on a path losing 30 % of its packets,
//! against 5 of 200 straight to the upstream. A brief outage shorter than TCP's retransmit
//! timers stands in for the loss here, so that the outcome is certain. Real binary, eBPF
//! observer, fault lab. The same when the retry budget is spent: a retry elsewhere would be
//! refused.

use std::time::{Duration, Instant};

use gateway_lab::{Fault, HttpBehaviour, Lab, LabSpec};
use gateway_testkit::{
    admin::{metrics, value, wait_for},
    gateway_bin,
    lab_gateway::LabGateway,
    root::require_root,
};

const PORT: u16 = 8080;

/// One upstream behind a single-endpoint cluster; `extra`: more of its TOML.
fn start<'a>(lab: &'a Lab, name: &str, extra: &str) -> LabGateway<'a> {
    let addr = lab.upstreams()[0].addr_v4(PORT);
    LabGateway::start(
        gateway_bin!(),
        lab,
        name,
        &format!(
            "[router.upstream]\nendpoints = [\"{addr}\"]\n\n\
             [router.upstream.timeouts]\nconnect_timeout_ms = 5000\nresponse_timeout_ms = 10000\n\n{extra}"
        ),
    )
}

/// One GET through the gateway while `fault` holds on the upstream for `lasting` from just
/// before it is sent (lifted on a thread, however long the GET takes).
fn get_through(
    gw: &LabGateway<'_>,
    up: &gateway_lab::Upstream,
    fault: Fault,
    lasting: Duration,
) -> gateway_testkit::lab_gateway::Reply {
    let guard = up.apply(fault).expect("fault");
    let lift = std::thread::spawn(move || {
        std::thread::sleep(lasting);
        drop(guard);
    });
    let mut got = gw.send("GET", "/", 1, 1);
    lift.join().unwrap();
    got.remove(0)
}

fn lab() -> Lab {
    require_root();
    Lab::new(LabSpec {
        upstreams: 1,
        client_cgroup: false,
    })
    .expect("lab")
}

#[test]
fn privileged_a_lone_endpoints_connect_runs_past_its_deadline_to_the_syn_retransmit() {
    let lab = lab();
    let up = &lab.upstreams()[0];
    let _server = up
        .serve_http(PORT, HttpBehaviour::immediate())
        .expect("http server");
    // No idle pool: every request connects.
    let gw = start(
        &lab,
        "lone-connect",
        "[router.upstream.limits]\nmax_idle_per_endpoint = 0\n",
    );
    let endpoint = up.addr_v4(PORT).to_string();
    let labels = [("cluster", "default"), ("endpoint", endpoint.as_str())];
    // The measuring probes make the deadline adaptive: well under the 5 s timeout.
    let deadline = gw.admin(|a| {
        wait_for("a measured connect deadline", || {
            let m = metrics(a);
            let d = value(&m, "gateway_upstream_connect_deadline_seconds", &labels);
            if d < 1.0 { Ok(d) } else { Err(m) }
        })
    });
    // SYNs dropped for 0.4 s: the first is lost, the kernel's retransmit 1 s later is answered.
    let t0 = Instant::now();
    let r = &get_through(
        &gw,
        up,
        Fault::SynBlackhole { port: PORT },
        Duration::from_millis(400),
    );
    assert_eq!(
        r.status,
        200,
        "the connect ran on past its {:.0} ms deadline to the SYN retransmit (took {:?}): {} {}\n{}",
        deadline * 1000.0,
        t0.elapsed(),
        r.header("x-gateway-error"),
        r.body,
        gw.log()
    );
    assert!(
        r.took >= Duration::from_millis(900),
        "answered after the retransmit, 1 s after the first SYN: {:?}",
        r.took
    );
}

#[test]
fn privileged_a_lone_endpoints_brief_stall_is_waited_out_not_called_a_death() {
    let lab = lab();
    let up = &lab.upstreams()[0];
    let _server = up
        .serve_http(PORT, HttpBehaviour::immediate())
        .expect("http server");
    let gw = start(&lab, "lone-stall", "");
    // A pooled connection first.
    assert_eq!(gw.get("/", 1, 1), vec![(200, String::new())]);
    // Every packet dropped for 0.7 s: the request on the pooled connection sees one or two
    // RTOs (at about 0.2 and 0.6 s), and TCP's retransmit after the outage is answered.
    let r = &get_through(
        &gw,
        up,
        Fault::Blackhole { port: PORT },
        Duration::from_millis(700),
    );
    assert_eq!(
        r.status,
        200,
        "a stall TCP recovered from is not a death with nowhere else to go: {} {}\n{}",
        r.header("x-gateway-error"),
        r.body,
        gw.log()
    );
    assert!(
        r.took >= Duration::from_millis(600),
        "the request did wait through the outage: {:?}",
        r.took
    );
    // A stall that lasts is still reported, not waited out to the 10 s response timeout.
    let _dead = up.apply(Fault::Blackhole { port: PORT }).expect("fault");
    let got = gw.send("GET", "/", 1, 1);
    let r = &got[0];
    assert_eq!(
        (r.status, r.header("x-gateway-error")),
        (502, "upstream_host_died"),
        "{}",
        r.body
    );
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(6)).contains(&r.took),
        "given up once stalled for 3 s: {:?} {} {}",
        r.took,
        r.header("x-gateway-evidence"),
        r.body
    );
}

/// A connect past its deadline is not given up on when the cluster's retry budget leaves no
/// room for a retry elsewhere (here none at all: `budget_percent = 0`,
/// `min_retry_concurrency = 0`, as a budget spent under load): it runs on to the SYN
/// retransmit, as a lone endpoint's does. The budget was not looked at: the connect was cut at
/// its deadline, and the retry refused (`retry budget spent`), which failed the request.
#[test]
fn privileged_a_connect_runs_past_its_deadline_when_the_retry_budget_is_spent() {
    let (lab, _servers) = two_upstreams();
    let ups = lab.upstreams();
    let a = ups[0].addr_v4(PORT);
    // No idle pool: every request connects.
    let gw = two_without_a_retry_budget(
        &lab,
        "budget-spent",
        "[router.upstream.limits]\nmax_idle_per_endpoint = 0\n",
    );
    let endpoint = a.to_string();
    let labels = [("cluster", "default"), ("endpoint", endpoint.as_str())];
    let deadline = gw.admin(|m| {
        wait_for("a measured connect deadline", || {
            let m = metrics(m);
            let d = value(&m, "gateway_upstream_connect_deadline_seconds", &labels);
            if d < 1.0 { Ok(d) } else { Err(m) }
        })
    });
    // SYNs to the first upstream dropped for 0.4 s: its first SYN is lost, the kernel's
    // retransmit 1 s later is answered.
    let guard = ups[0]
        .apply(Fault::SynBlackhole { port: PORT })
        .expect("fault");
    let lift = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(guard);
    });
    // Both at once: one to each endpoint.
    let got = gw.send("GET", "/", 2, 2);
    lift.join().unwrap();
    for r in &got {
        assert_eq!(
            r.status,
            200,
            "past its {:.0} ms deadline, the connect ran on to the SYN retransmit: {} {}\n{}",
            deadline * 1000.0,
            r.header("x-gateway-error"),
            r.body,
            gw.log()
        );
    }
    let slow = got.iter().max_by_key(|r| r.took).unwrap();
    assert!(
        slow.took >= Duration::from_millis(900),
        "one request waited for the retransmit: {got:?}"
    );
    // Answered by the upstream that met the fault: the connect ran on, nothing was retried.
    assert_eq!(slow.body, "upstream-1", "{got:?}");
}

/// A lab of two upstreams, each serving `PORT`.
fn two_upstreams() -> (Lab, Vec<gateway_lab::HttpServer>) {
    require_root();
    let lab = Lab::new(LabSpec {
        upstreams: 2,
        client_cgroup: false,
    })
    .expect("lab");
    let servers = lab
        .upstreams()
        .iter()
        .map(|u| {
            u.serve_http(PORT, HttpBehaviour::immediate())
                .expect("http server")
        })
        .collect();
    (lab, servers)
}

/// Two upstreams, round robin, and no retry budget at all (as one spent under load) nor
/// hedging; `name` names the run, `extra` is more of its TOML.
fn two_without_a_retry_budget<'a>(lab: &'a Lab, name: &str, extra: &str) -> LabGateway<'a> {
    let ups = lab.upstreams();
    let (a, b) = (ups[0].addr_v4(PORT), ups[1].addr_v4(PORT));
    LabGateway::start(
        gateway_bin!(),
        lab,
        name,
        &format!(
            "[router.upstream]\nendpoints = [\"{a}\", \"{b}\"]\nlb_policy = \"round_robin\"\n\n\
             [router.upstream.timeouts]\nconnect_timeout_ms = 5000\nresponse_timeout_ms = 10000\n\n\
             [router.upstream.retry]\nbudget_percent = 0\nmin_retry_concurrency = 0\nhedge = false\n\n\
             {extra}"
        ),
    )
}

/// A request kept on a dead host's connection for want of a retry (the budget) still tells
/// the endpoint's health at once, so that new requests stop going there: it is ejected as
/// `host_died` at the first look that sees the death, not when the request gives up after
/// the stall lasted 3 s (`STALL_ALONE`), as it was once the budget kept such requests.
#[test]
fn privileged_a_dead_host_is_ejected_at_once_though_no_retry_can_take_its_request() {
    let (lab, _servers) = two_upstreams();
    let ups = lab.upstreams();
    let gw = two_without_a_retry_budget(&lab, "budget-host-died", "");
    // Pooled connections to both.
    assert!(gw.send("GET", "/", 4, 2).iter().all(|r| r.status == 200));
    let endpoint = ups[0].addr_v4(PORT).to_string();
    let labels = [
        ("cluster", "default"),
        ("endpoint", endpoint.as_str()),
        ("reason", "host_died"),
    ];
    let _dead = ups[0]
        .apply(Fault::Blackhole { port: PORT })
        .expect("fault");
    let t0 = Instant::now();
    let ejected = std::thread::scope(|s| {
        // One of the two meets the dead host.
        let requests = s.spawn(|| gw.send("GET", "/", 2, 2));
        let ejected = gw.admin(|a| {
            wait_for("the host_died ejection", || {
                let m = metrics(a);
                if value(&m, "gateway_endpoint_ejections_total", &labels) >= 1.0 {
                    Ok(t0.elapsed())
                } else {
                    Err(m)
                }
            })
        });
        requests.join().unwrap();
        ejected
    });
    eprintln!("host_died ejection {ejected:?} after the fault");
    assert!(
        ejected < Duration::from_secs(2),
        "ejected {ejected:?} after the host died\n{}",
        gw.log()
    );
}
