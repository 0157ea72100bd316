//! Privileged (root: network namespaces, cgroups, eBPF): the metrics and `/status` of the real
//! `gateway run` binary with the kernel observer attached, in the fault lab, as faults are
//! injected. Each test panics without root rather than skip.
//!
//! - A refusing endpoint (RST) next to a healthy one: the kernel's outcome, errno and
//!   `SO_ERROR` are counted, the endpoint is ejected with reason `refused`, and every
//!   handshake to the healthy one lands in its kernel SYN-RTT histogram.
//! - A host that dies under an established connection (every packet dropped): the request
//!   fails as `upstream_host_died`, and the RTOs the kernel fired on that connection are
//!   counted when it closes.

mod admin_support;

use admin_support::*;
use gateway_lab::{Fault, HttpBehaviour, Lab, LabSpec};

const PORT: u16 = 8080;

#[test]
fn privileged_refusals_and_handshakes_are_counted_from_kernel_evidence() {
    require_root("privileged_refusals_and_handshakes_are_counted_from_kernel_evidence");
    let lab = Lab::new(LabSpec {
        upstreams: 2,
        client_cgroup: false,
    })
    .expect("lab");
    let (up, down) = (&lab.upstreams()[0], &lab.upstreams()[1]);
    let _server = up
        .serve_http(PORT, HttpBehaviour::immediate())
        .expect("http server");
    let _refuse = down.apply(Fault::Refuse { port: PORT }).expect("fault");
    let (good, bad) = (up.addr_v4(PORT), down.addr_v4(PORT));
    // No idle pool: every request makes a fresh connect, so every request is a handshake.
    let gw = LabGateway::start(
        &lab,
        "refused",
        &format!(
            "[router.upstream]\nendpoints = [\"{bad}\", \"{good}\"]\n\n\
             [router.upstream.limits]\nmax_idle_per_endpoint = 0\n\n\
             [router.upstream.health]\nejection_ms = 60000\n"
        ),
    );
    let (g, b) = (good.to_string(), bad.to_string());
    let ep = |text: &str, name: &str, extra: &[(&str, &str)], e: &str| -> f64 {
        let mut labels = vec![("cluster", "default"), ("endpoint", e)];
        labels.extend_from_slice(extra);
        value(text, name, &labels)
    };

    let before = gw.admin(metrics);
    assert_eq!(
        value(&before, "gateway_observer_kernel_signals", &[]),
        1.0,
        "{before}"
    );
    assert_eq!(
        value(&before, "gateway_observer_mode", &[("mode", "kernel")]),
        1.0
    );
    assert_eq!(
        value(&before, "gateway_observer_mode", &[("mode", "userspace")]),
        0.0
    );
    assert_eq!(
        ep(&before, "gateway_upstream_syn_rtt_seconds_count", &[], &g),
        0.0
    );
    assert_eq!(
        ep(
            &before,
            "gateway_endpoint_health_state",
            &[("state", "healthy")],
            &b
        ),
        1.0
    );

    let got = gw.get("/", 10, 1);
    assert!(got.iter().all(|(s, _)| *s == 200), "{got:?}");
    let m = gw.admin(|a| {
        wait_for("10 requests in /metrics", || {
            let m = metrics(a);
            let n = value(&m, "gateway_requests_total", &[("status", "200")]);
            if n == 10.0 { Ok(m) } else { Err(m) }
        })
    });
    // The refusing endpoint: the kernel saw an RST, the gateway read ECONNREFUSED through
    // SO_ERROR, and ejected it at once.
    assert_eq!(
        ep(
            &m,
            "gateway_upstream_attempts_total",
            &[("outcome", "refused")],
            &b
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        ep(
            &m,
            "gateway_upstream_connect_failures_total",
            &[("errno", "ECONNREFUSED")],
            &b
        ),
        1.0,
        "{m}"
    );
    assert!(
        value(
            &m,
            "gateway_socket_errors_total",
            &[("errno", "ECONNREFUSED")]
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        ep(
            &m,
            "gateway_endpoint_ejections_total",
            &[("reason", "refused")],
            &b
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        ep(
            &m,
            "gateway_endpoint_health_state",
            &[("state", "ejected")],
            &b
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        ep(
            &m,
            "gateway_endpoint_health_state",
            &[("state", "healthy")],
            &b
        ),
        0.0,
        "{m}"
    );
    // The healthy endpoint: one handshake per request, each with its kernel SYN-RTT.
    let established = ep(
        &m,
        "gateway_upstream_attempts_total",
        &[("outcome", "established")],
        &g,
    );
    assert_eq!(established, 10.0, "{m}");
    let syn = ep(&m, "gateway_upstream_syn_rtt_seconds_count", &[], &g);
    assert_eq!(
        syn, established,
        "every handshake has a kernel SYN-RTT: {m}"
    );
    assert!(
        ep(&m, "gateway_upstream_syn_rtt_seconds_sum", &[], &g) / syn < 0.01,
        "a lab handshake takes well under 10 ms: {m}"
    );
    assert_eq!(
        ep(&m, "gateway_upstream_syn_retransmits_total", &[], &g),
        0.0
    );

    // More traffic, more handshakes: the histogram keeps counting.
    let got = gw.get("/", 8, 4);
    assert!(got.iter().all(|(s, _)| *s == 200), "{got:?}");
    let m = gw.admin(|a| {
        wait_for("18 handshakes in the SYN-RTT histogram", || {
            let m = metrics(a);
            let labels = [("cluster", "default"), ("endpoint", g.as_str())];
            if value(&m, "gateway_upstream_syn_rtt_seconds_count", &labels) == 18.0 {
                Ok(m)
            } else {
                Err(m)
            }
        })
    });
    assert!(
        ep(&m, "gateway_upstream_connect_deadline_seconds", &[], &g) > 0.0,
        "{m}"
    );

    // /status says the same, with the kernel's words.
    let s = gw.admin(status);
    assert_eq!(s["observer"]["mode"], "kernel", "{s:#}");
    assert_eq!(s["observer"]["kernel_signals"], true);
    let cgroup = s["observer"]["cgroup"]
        .as_str()
        .expect("the observer's cgroup");
    assert!(
        cgroup.contains("gateway-admin-refused-"),
        "the configured cgroup: {cgroup}"
    );
    assert_eq!(s["observer"]["events_lost"], 0);
    let bad_ep = endpoint(&s, "default", bad);
    assert_eq!(bad_ep["state"], "ejected");
    assert_eq!(bad_ep["reason"], "refused");
    let ejection = bad_ep["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "ejected")
        .unwrap_or_else(|| panic!("an ejection: {bad_ep:#}"));
    let detail = ejection["detail"].as_str().unwrap();
    assert!(
        detail.contains("kernel: refused, 1 SYN sent, RST received, ECONNREFUSED"),
        "kernel evidence in the ejection: {detail}"
    );
    let good_ep = endpoint(&s, "default", good);
    assert_eq!(good_ep["state"], "healthy");
    assert!(
        good_ep["syn_rtt"]["samples"].as_u64().unwrap() >= 18,
        "{good_ep:#}"
    );
    let p50 = good_ep["syn_rtt"]["p50_us"].as_u64().expect("p50");
    assert!(p50 > 0 && p50 < 10_000, "{good_ep:#}");
}

#[test]
fn privileged_rtos_of_a_dead_hosts_connection_are_counted() {
    require_root("privileged_rtos_of_a_dead_hosts_connection_are_counted");
    let lab = Lab::new(LabSpec {
        upstreams: 1,
        client_cgroup: false,
    })
    .expect("lab");
    let up = &lab.upstreams()[0];
    let _server = up
        .serve_http(PORT, HttpBehaviour::immediate())
        .expect("http server");
    let addr = up.addr_v4(PORT);
    let gw = LabGateway::start(
        &lab,
        "rto",
        &format!(
            "[router.upstream]\nendpoints = [\"{addr}\"]\n\n\
             [router.upstream.timeouts]\nresponse_timeout_ms = 10000\n\n\
             [router.upstream.health]\nejection_ms = 60000\nmax_ejected_percent = 100\n"
        ),
    );
    let a = addr.to_string();
    let labels = |extra: &[(&'static str, &'static str)]| {
        let mut l = vec![("cluster", "default"), ("endpoint", a.as_str())];
        l.extend_from_slice(extra);
        l
    };
    // A pooled connection first, then the host goes silent under it.
    assert_eq!(gw.get("/", 1, 1), vec![(200, String::new())]);
    let _dead = up.apply(Fault::Blackhole { port: PORT }).expect("fault");
    let got = gw.get("/", 1, 1);
    assert_eq!(
        got,
        vec![(502, "upstream_host_died".to_owned())],
        "{}",
        gw.log()
    );
    let m = gw.admin(|admin| {
        wait_for("RTOs counted for the dead connection", || {
            let m = metrics(admin);
            if value(&m, "gateway_upstream_rtos_total", &labels(&[])) >= 1.0 {
                Ok(m)
            } else {
                Err(m)
            }
        })
    });
    assert_eq!(
        value(
            &m,
            "gateway_endpoint_ejections_total",
            &labels(&[("reason", "host_died")])
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "gateway_endpoint_health_state",
            &labels(&[("state", "ejected")])
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "gateway_requests_total",
            &[("cluster", "default"), ("status", "502")]
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn privileged_unanswered_syns_count_as_aborted_connects_and_connect_timeouts() {
    require_root("privileged_unanswered_syns_count_as_aborted_connects_and_connect_timeouts");
    let lab = Lab::new(LabSpec {
        upstreams: 2,
        client_cgroup: false,
    })
    .expect("lab");
    let (up, down) = (&lab.upstreams()[0], &lab.upstreams()[1]);
    let _good_server = up
        .serve_http(PORT, HttpBehaviour::immediate())
        .expect("http server");
    let _bad_server = down
        .serve_http(PORT, HttpBehaviour::immediate())
        .expect("http server");
    let _silent = down
        .apply(Fault::SynBlackhole { port: PORT })
        .expect("fault");
    let (good, bad) = (up.addr_v4(PORT), down.addr_v4(PORT));
    // Cluster `main` retries an unanswered connect on the healthy endpoint; cluster `bad` has
    // nothing else, so its client sees the 504 and the kernel's record in it.
    let gw = LabGateway::start(
        &lab,
        "syn-blackhole",
        &format!(
            "[[routes]]\nname = \"main\"\npath_prefix = \"/\"\ncluster = \"main\"\n\n\
             [[routes]]\nname = \"bad\"\npath_prefix = \"/only-bad\"\ncluster = \"bad\"\n\n\
             [clusters.main]\nendpoints = [\"{bad}\", \"{good}\"]\n\n\
             [clusters.main.timeouts]\nconnect_timeout_ms = 300\n\n\
             [clusters.main.health]\nejection_ms = 60000\n\n\
             [clusters.bad]\nendpoints = [\"{bad}\"]\n\n\
             [clusters.bad.timeouts]\nconnect_timeout_ms = 300\n"
        ),
    );
    let got = gw.get("/", 6, 1);
    assert!(
        got.iter().all(|(s, _)| *s == 200),
        "retried on the healthy endpoint: {got:?}"
    );
    let lonely = gw.get_bodies("/only-bad", 1, 1);
    let (code, error, body) = &lonely[0];
    assert_eq!((*code, error.as_str()), (504, "connect_timeout"), "{body}");
    assert!(
        body.contains(&format!(
            "connect timeout to {bad} after 300 ms; kernel: aborted, 1 SYN sent, no SYN-ACK, no RST"
        )),
        "the 504 carries the kernel's record of the abandoned connect: {body}"
    );
    let b = bad.to_string();
    let labels = |extra: &[(&'static str, &'static str)]| {
        let mut l = vec![("cluster", "main"), ("endpoint", b.as_str())];
        l.extend_from_slice(extra);
        l
    };
    let m = gw.admin(|admin| {
        wait_for("the unanswered connects in /metrics", || {
            let m = metrics(admin);
            let n = value(
                &m,
                "gateway_requests_total",
                &[("cluster", "main"), ("status", "200")],
            );
            if n == 6.0 { Ok(m) } else { Err(m) }
        })
    });
    // The gateway closed the socket at its deadline; the kernel calls that `aborted`.
    let aborted = value(
        &m,
        "gateway_upstream_attempts_total",
        &labels(&[("outcome", "aborted")]),
    );
    assert!(aborted >= 1.0, "{m}");
    assert_eq!(
        value(
            &m,
            "gateway_upstream_connect_failures_total",
            &labels(&[("errno", "ETIMEDOUT")])
        ),
        aborted,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "gateway_timeouts_total",
            &[("cluster", "main"), ("phase", "connect")]
        ),
        aborted,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "gateway_retries_total",
            &[("cluster", "main"), ("reason", "connect_failed")]
        ),
        aborted,
        "each unanswered connect was retried on the healthy endpoint: {m}"
    );
    assert_eq!(
        value(
            &m,
            "gateway_upstream_attempts_total",
            &labels(&[("outcome", "established")])
        ),
        0.0,
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "gateway_requests_total",
            &[("route", "bad"), ("cluster", "bad"), ("status", "504")]
        ),
        1.0,
        "{m}"
    );
    // /status: the active probe's failure carries the kernel's record too.
    let s = gw.admin(status);
    let bad_ep = endpoint(&s, "main", bad);
    assert!(
        bad_ep["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"]
                .as_str()
                .unwrap()
                .contains("kernel: aborted, 1 SYN sent, no SYN-ACK, no RST")),
        "{bad_ep:#}"
    );
}
