//! The admin API of an in-process gateway running on userspace timing (no privileges): what
//! `/status`, `/readyz` and `/metrics` say as faults are injected (a refusing endpoint, a
//! cluster with nothing left to route to, a drain), and that the admin listener stays on
//! loopback unless told otherwise.

use std::time::Duration;

use gateway_testkit::{
    admin::{
        admin_get, admin_request, catalogued, endpoint, metrics, sample, status, value, wait_for,
        wait_in_flight,
    },
    gateway_bin,
    http::{client, get},
    inprocess::{InProcess, gateway},
    ports::refused_addr,
    tempdir::temp_dir,
    upstream::Upstream,
};
use http::StatusCode;

/// One healthy upstream and one refusing port in the default cluster; refusals eject at once
/// and the ejection outlasts the test.
async fn good_and_refused(label: &str) -> (Upstream, std::net::SocketAddr, InProcess) {
    let good = Upstream::start("good").await;
    let refused = refused_addr();
    let gw = gateway(
        label,
        &format!(
            "[router.upstream]\nendpoints = [\"{refused}\", \"{}\"]\n\n\
             [router.upstream.health]\nejection_ms = 60000\n",
            good.addr
        ),
    )
    .await;
    (good, refused, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_endpoint_state_reason_and_evidence() {
    let (good, refused, gw) = good_and_refused("admin-status").await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let c = client();
    for _ in 0..10 {
        let got = get(&c, gw.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    }
    let s = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_s"].as_f64().is_some(), "{s:#}");
    assert_eq!(s["draining"], false);
    assert_eq!(s["ready"], true, "{s:#}");
    assert_eq!(s["observer"]["mode"], "userspace");
    assert_eq!(s["observer"]["kernel_signals"], false);
    // The reason is whatever the signal source says; the real fallback and its reason are
    // checked end to end in admin_metrics_privileged.rs.
    assert!(s["observer"]["reason"].is_string(), "{s:#}");
    assert_eq!(s["observer"]["cgroup"], serde_json::Value::Null);

    let bad = endpoint(&s, "default", refused);
    assert_eq!(bad["state"], "ejected", "{bad:#}");
    assert_eq!(bad["reason"], "refused");
    let now = s["now_unix_ms"].as_u64().unwrap();
    let until = bad["ejected_until_unix_ms"]
        .as_u64()
        .expect("ejected_until");
    assert!(
        until > now + 50_000,
        "ejected for ejection_ms = 60000: {bad:#}"
    );
    assert!(bad["since_unix_ms"].as_u64().unwrap() <= now);
    let recent = bad["recent"].as_array().unwrap();
    let ejected = recent
        .iter()
        .find(|e| e["event"] == "ejected")
        .unwrap_or_else(|| panic!("an ejection event: {bad:#}"));
    assert_eq!(ejected["reason"], "refused");
    assert!(
        ejected["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("connection refused by {refused}")),
        "{ejected:#}"
    );

    let ok = endpoint(&s, "default", good.addr);
    assert_eq!(ok["state"], "healthy", "{ok:#}");
    assert_eq!(ok["reason"], serde_json::Value::Null);
    assert_eq!(ok["ejected_until_unix_ms"], serde_json::Value::Null);
    assert_eq!(ok["connect_deadline_source"], "configured");
    assert!(ok["connect_deadline_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["syn_rtt"]["samples"].as_u64().unwrap() >= 1, "{ok:#}");
    assert!(ok["syn_rtt"]["p50_us"].as_u64().is_some(), "{ok:#}");
    assert_eq!(ok["in_flight"], 0);
    let cluster = &s["clusters"][0];
    assert_eq!(cluster["routable"], 1, "{cluster:#}");
    assert_eq!(cluster["lb_policy"], "round_robin");
}

/// A sample of endpoint `e` of the default cluster.
fn ep(text: &str, name: &str, extra: &[(&str, &str)], e: &str) -> f64 {
    let mut labels = vec![("cluster", "default"), ("endpoint", e)];
    labels.extend_from_slice(extra);
    value(text, name, &labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_refusing_endpoint() {
    let (good, refused, gw) = good_and_refused("admin-metrics").await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let before = tokio::task::spawn_blocking(move || metrics(admin))
        .await
        .unwrap();
    let (r, g) = (refused.to_string(), good.addr.to_string());
    assert_eq!(
        ep(
            &before,
            "gateway_endpoint_health_state",
            &[("state", "healthy")],
            &r
        ),
        1.0,
        "{before}"
    );
    assert_eq!(
        ep(
            &before,
            "gateway_upstream_attempts_total",
            &[("outcome", "refused")],
            &r
        ),
        0.0
    );
    assert_eq!(value(&before, "gateway_observer_kernel_signals", &[]), 0.0);
    assert_eq!(
        value(&before, "gateway_observer_mode", &[("mode", "userspace")]),
        1.0
    );

    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, gw.addr, "/").await.status, StatusCode::OK);
    }
    let _ = get(&c, gw.addr, "/delay/1").await;
    let after = tokio::task::spawn_blocking(move || {
        wait_for("the request counters of 11 requests", || {
            let m = metrics(admin);
            let n = value(
                &m,
                "gateway_requests_total",
                &[
                    ("route", "default"),
                    ("cluster", "default"),
                    ("status", "200"),
                ],
            );
            if n == 11.0 { Ok(m) } else { Err(m) }
        })
    })
    .await
    .unwrap();
    let v = |name: &str, extra: &[(&str, &str)], e: &str| ep(&after, name, extra, e);
    assert_eq!(
        v(
            "gateway_upstream_attempts_total",
            &[("outcome", "refused")],
            &r
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        v(
            "gateway_upstream_connect_failures_total",
            &[("errno", "ECONNREFUSED")],
            &r
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        v(
            "gateway_endpoint_ejections_total",
            &[("reason", "refused")],
            &r
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        v("gateway_endpoint_health_state", &[("state", "ejected")], &r),
        1.0,
        "{after}"
    );
    assert_eq!(
        v("gateway_endpoint_health_state", &[("state", "healthy")], &r),
        0.0,
        "{after}"
    );
    assert_eq!(
        v("gateway_endpoint_health_state", &[("state", "healthy")], &g),
        1.0,
        "{after}"
    );
    assert!(
        v(
            "gateway_upstream_attempts_total",
            &[("outcome", "established")],
            &g
        ) >= 1.0,
        "{after}"
    );
    // The refused attempt was retried on the good endpoint, invisibly to the client.
    assert_eq!(
        value(
            &after,
            "gateway_retries_total",
            &[("cluster", "default"), ("reason", "connect_failed")]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            "gateway_request_duration_seconds_count",
            &[("route", "default"), ("cluster", "default")]
        ),
        11.0
    );
    // No kernel: no SYN-RTT samples, no SO_ERROR reads counted; the deadline is the configured
    // connect timeout.
    assert_eq!(
        v("gateway_upstream_syn_rtt_seconds_count", &[], &g),
        0.0,
        "{after}"
    );
    assert!(
        catalogued("gateway_socket_errors_total").is_some()
            && sample(&after, "gateway_socket_errors_total", &[]).is_none(),
        "{after}"
    );
    assert!(
        v("gateway_upstream_connect_deadline_seconds", &[], &g) > 0.0,
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_counted_by_phase() {
    let slow = Upstream::start("slow").await;
    let gw = gateway(
        "admin-timeouts",
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\n\n\
             [router.upstream.timeouts]\nresponse_timeout_ms = 100\n",
            slow.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().unwrap();
    let got = get(&client(), gw.addr, "/delay/400").await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{}", got.body);
    let m = tokio::task::spawn_blocking(move || {
        wait_for("a response timeout in /metrics", || {
            let m = metrics(admin);
            let labels = [("cluster", "default"), ("phase", "response")];
            if value(&m, "gateway_timeouts_total", &labels) == 1.0 {
                Ok(m)
            } else {
                Err(m)
            }
        })
    })
    .await
    .unwrap();
    assert_eq!(
        value(
            &m,
            "gateway_timeouts_total",
            &[("cluster", "default"), ("phase", "connect")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "gateway_requests_total",
            &[("cluster", "default"), ("status", "504")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_with_the_reason_when_a_cluster_has_nothing_to_route_to() {
    let good = Upstream::start("good").await;
    let dead = refused_addr();
    let gw = gateway(
        "admin-readyz",
        &format!(
            r#"[[routes]]
name = "api"
path_prefix = "/api"
cluster = "api"

[[routes]]
name = "dead"
path_prefix = "/dead"
cluster = "dead"

[clusters.api]
endpoints = ["{}"]

[clusters.dead]
endpoints = ["{dead}"]

[clusters.dead.health]
ejection_ms = 60000
max_ejected_percent = 100
"#,
            good.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().unwrap();
    let r = tokio::task::spawn_blocking(move || admin_get(admin, "/readyz"))
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

    let got = get(&client(), gw.addr, "/dead/x").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
    let r = tokio::task::spawn_blocking(move || admin_get(admin, "/readyz"))
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.body,
        "not ready\ncluster `dead`: no routable endpoint (1 endpoint(s), all ejected)\n"
    );
    let s = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    assert_eq!(s["ready"], false);
    assert_eq!(
        s["not_ready"][0],
        "cluster `dead`: no routable endpoint (1 endpoint(s), all ejected)"
    );
    // The healthy cluster still serves; readiness is about the whole gateway.
    assert_eq!(
        get(&client(), gw.addr, "/api/x").await.status,
        StatusCode::OK
    );
    let h = tokio::task::spawn_blocking(move || admin_get(admin, "/healthz"))
        .await
        .unwrap();
    assert_eq!(h.status, 200, "healthz is about serving, not upstreams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_draining_once_shutdown_begins() {
    let slow = Upstream::start("slow").await;
    let gw = gateway(
        "admin-drain",
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", slow.addr),
    )
    .await;
    let admin = gw.handle.admin_addr().unwrap();
    let addr = gw.addr;
    // A request in flight keeps the drain going while the admin API is asked.
    let in_flight = tokio::spawn(async move { get(&client(), addr, "/delay/1500").await });
    let slow_addr = slow.addr;
    tokio::task::spawn_blocking(move || wait_in_flight(admin, "default", slow_addr))
        .await
        .unwrap();
    let drained = tokio::spawn(gw.handle.shutdown(Duration::from_secs(5)));
    let (ready, health, s) = tokio::task::spawn_blocking(move || {
        let s = wait_for("/status to say draining", || {
            let s = status(admin);
            if s["draining"] == true {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        });
        (admin_get(admin, "/readyz"), admin_get(admin, "/healthz"), s)
    })
    .await
    .unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body, "not ready\ndraining: shutdown has begun\n");
    assert_eq!((health.status, health.body.as_str()), (503, "draining\n"));
    assert_eq!(s["draining"], true);
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    assert!(!drained.await.unwrap().forced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_read_only_and_names_its_paths() {
    let up = Upstream::start("up").await;
    let gw = gateway(
        "admin-paths",
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    )
    .await;
    let admin = gw.handle.admin_addr().unwrap();
    let (post, missing, page) = tokio::task::spawn_blocking(move || {
        (
            admin_request(admin, "POST", "/status"),
            admin_get(admin, "/nope"),
            admin_get(admin, "/"),
        )
    })
    .await
    .unwrap();
    assert_eq!(post.status, 405, "{}", post.body);
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("/status"), "{}", missing.body);
    assert_eq!(page.status, 200);
    assert_eq!(page.content_type, "text/html; charset=utf-8");
    assert!(page.body.starts_with("<!doctype html>"), "{}", page.body);
    assert!(
        page.body.contains(&format!(
            "data-endpoint=\"{}\" data-state=\"healthy\"",
            up.addr
        )),
        "{}",
        page.body
    );
}

fn config_with_admin(dir: &std::path::Path, admin: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[router]\nlisten = [\"127.0.0.1:0\"]\n\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n\n[admin]\n{admin}\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn the_admin_listener_refuses_a_non_loopback_address_unless_allowed() {
    let dir = temp_dir("admin-loopback");
    let refused = config_with_admin(&dir, "listen = \"0.0.0.0:9901\"");
    for cmd in [&["check-config"][..], &["run", "--config"][..]] {
        let out = gateway_bin!()
            .command()
            .args(cmd)
            .arg(&refused)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} accepted 0.0.0.0: {err}");
        assert!(
            err.contains("key `admin.listen`: admin address 0.0.0.0:9901 is not loopback; set `[admin] allow_remote = true` to expose it"),
            "{cmd:?}: {err}"
        );
    }
    // Allowed when asked for (validated only: this test binds nothing beyond loopback).
    let allowed = config_with_admin(&dir, "listen = \"0.0.0.0:9901\"\nallow_remote = true");
    let out = gateway_bin!()
        .command()
        .arg("check-config")
        .arg(&allowed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
