//! Privileged: needs root. The gateway against faults that loopback cannot express, built with
//! the fault lab (`gateway_lab`: network namespaces, veths, iptables rules in the upstream's
//! namespace). The gateway and its client run in the lab's client namespace; nothing outside the
//! lab is touched. Without root every test panics saying so; none is skipped.
//!
//! Run: `cargo test -p gateway-user --test proxy_privileged_blackhole -- --test-threads=1`

use std::time::{Duration, Instant};

use gateway_lab::{Fault, HttpBehaviour, Lab, LabSpec};
use gateway_testkit::{
    http::{client, get},
    inprocess::{gateway, log_lines},
    root::require_root,
};
use http::StatusCode;

const PORT: u16 = 8080;

fn lab(upstreams: usize) -> Lab {
    require_root();
    Lab::new(LabSpec {
        upstreams,
        client_cgroup: false,
    })
    .expect("building the lab")
}

/// The acceptance check: a single endpoint whose SYNs are dropped gives 504
/// `connect_timeout` at the configured connect timeout, within 10%.
#[test]
fn privileged_blackholed_single_endpoint_is_504_connect_timeout_on_time() {
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
    let lab = lab(1);
    let up = lab.upstream(0).unwrap();
    let _server = up.serve_http(PORT, HttpBehaviour::immediate()).unwrap();
    let _fault = up.apply(Fault::SynBlackhole { port: PORT }).unwrap();
    let endpoint = up.addr_v4(PORT);
    lab.client()
        .block_on(async move {
            // The common layout from the issue, with a shorter timeout to keep the test quick.
            let gw = gateway(
                "blackhole",
                &format!(
                    "[router.upstream]\nendpoints = [\"{endpoint}\"]\n[router.upstream.timeouts]\nconnect_timeout_ms = {}\n",
                    CONNECT_TIMEOUT.as_millis()
                ),
            )
            .await;
            let c = client();
            for i in 0..3 {
                let start = Instant::now();
                let got = get(&c, gw.addr, "/").await;
                let took = start.elapsed();
                eprintln!("request {i}: {} {} after {took:?}", got.status, got.header("x-gateway-error"));
                assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "request {i}: {}", got.body);
                assert_eq!(got.header("x-gateway-error"), "connect_timeout");
                assert_eq!(got.header("x-gateway-endpoint"), endpoint.to_string());
                assert_eq!(got.header("x-gateway-attempts"), "1");
                assert!(
                    got.body.contains(&format!("connect timeout to {endpoint} after 1500 ms")),
                    "{}",
                    got.body
                );
                // Not before the timer, and not much after it: the gateway runs in this
                // process, which a loaded machine can hold up; without the timer the kernel
                // would give up after its SYN retries, two minutes on.
                let (lo, hi) = (CONNECT_TIMEOUT.mul_f64(0.9), CONNECT_TIMEOUT + Duration::from_millis(500));
                assert!(
                    took >= lo && took <= hi,
                    "request {i}: answered after {took:?}, expected {CONNECT_TIMEOUT:?} (-10 %, +500 ms)"
                );
            }
            let lines = log_lines(&gw.log, 3);
            for l in &lines {
                assert_eq!(l["error"], "connect_timeout");
                assert!(l["cookies"][0].as_u64().unwrap() > 0, "{l}");
            }
        })
        .unwrap();
}

/// With a healthy second endpoint, the blackholed one costs one connect timeout and the client
/// still gets its answer.
#[test]
fn privileged_blackholed_endpoint_is_retried_on_a_healthy_one() {
    let lab = lab(2);
    let (bad, good) = (lab.upstream(0).unwrap(), lab.upstream(1).unwrap());
    let _s1 = bad.serve_http(PORT, HttpBehaviour::immediate()).unwrap();
    let _s2 = good.serve_http(PORT, HttpBehaviour::immediate()).unwrap();
    let _fault = bad.apply(Fault::SynBlackhole { port: PORT }).unwrap();
    let (bad_addr, good_addr) = (bad.addr_v4(PORT), good.addr_v4(PORT));
    lab.client()
        .block_on(async move {
            let gw = gateway(
                "blackhole-retry",
                &format!(
                    "[router.upstream]\nendpoints = [\"{bad_addr}\", \"{good_addr}\"]\n[router.upstream.timeouts]\nconnect_timeout_ms = 300\n"
                ),
            )
            .await;
            let c = client();
            for _ in 0..4 {
                let got = get(&c, gw.addr, "/").await;
                assert_eq!(got.status, StatusCode::OK, "{}", got.body);
                assert_eq!(got.body, "upstream-2");
            }
            let lines = log_lines(&gw.log, 4);
            let retried: Vec<_> = lines.iter().filter(|l| l["retries"] == 1).collect();
            assert!(!retried.is_empty(), "{lines:?}");
            for l in retried {
                assert_eq!(l["endpoints"][0], bad_addr.to_string());
                assert_eq!(l["attempt_errors"][0], "connect_timeout");
                assert_eq!(l["endpoints"][1], good_addr.to_string());
            }
        })
        .unwrap();
}

/// ICMP host unreachable from the path: 502 `connect_unreachable`, at once.
#[test]
fn privileged_unreachable_endpoint_is_502_connect_unreachable() {
    let lab = lab(1);
    let up = lab.upstream(0).unwrap();
    let _fault = up.apply(Fault::HostUnreachable { port: PORT }).unwrap();
    let endpoint = up.addr_v4(PORT);
    lab.client()
        .block_on(async move {
            let gw = gateway(
                "unreachable",
                &format!("[router.upstream]\nendpoints = [\"{endpoint}\"]\n"),
            )
            .await;
            let start = Instant::now();
            let got = get(&client(), gw.addr, "/").await;
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
            assert_eq!(got.header("x-gateway-error"), "connect_unreachable");
            assert_eq!(got.header("x-gateway-endpoint"), endpoint.to_string());
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "took {:?}",
                start.elapsed()
            );
        })
        .unwrap();
}
