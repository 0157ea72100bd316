//! SIGHUP reload: new config taken at once, a bad config refused with the old one kept, and no
//! request lost under load while reloading. Runs the built binary; one test drives the same
//! reload in-process to check a request in flight finishes on the generation it started on.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use gateway_testkit::{
    admin::wait_in_flight,
    config::{base_config, write_config},
    gateway_bin,
    http::{client, empty, get},
    inprocess::gateway,
    process::GatewayProcess,
    tempdir::temp_dir,
    upstream::Upstream,
};
use http::StatusCode;

fn upstream_config(addr: std::net::SocketAddr) -> String {
    format!("[router.upstream]\nendpoints = [\"{addr}\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_config_and_refuses_a_bad_one() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = temp_dir("reload");
    let cfg = write_config(&dir, &upstream_config(a.addr));
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let c = client();
    assert_eq!(get(&c, gw.addr, "/").await.body, "a");

    write_config(&dir, &upstream_config(b.addr));
    gw.signal(libc::SIGHUP);
    gw.expect_log("config reloaded", Duration::from_secs(5));
    assert_eq!(get(&c, gw.addr, "/").await.body, "b");

    // A typo: refused, with file, line and key; the running config stays.
    write_config(
        &dir,
        &format!(
            "{}[router.upstream.timeouts]\nconect_timeout_ms = 1\n",
            upstream_config(a.addr)
        ),
    );
    gw.signal(libc::SIGHUP);
    gw.expect_log("reload refused", Duration::from_secs(5));
    let log = gw.text();
    assert!(
        log.contains("gateway.toml:") && log.contains("router.upstream.timeouts.conect_timeout_ms"),
        "{log}"
    );
    assert_eq!(get(&c, gw.addr, "/").await.body, "b");
}

/// Returns once `n` more requests than now have been served.
async fn served_more(ok: &AtomicUsize, n: usize) {
    let from = ok.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < from + n {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress: {} requests served",
            ok.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_no_request() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = temp_dir("reload-load");
    let cfg = write_config(&dir, &upstream_config(a.addr));
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = gw.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        // Half the clients keep connections alive, half open a new one per request.
        let c = if i % 2 == 0 {
            client()
        } else {
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http()
        };
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{addr}/delay/5"))
                    .body(empty())
                    .unwrap();
                match c.request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(format!("error {e:?}")),
                }
            }
        }));
    }
    // Each reload comes once the clients have been served some more requests since the last
    // one (progress, not a fixed pause), and so does the end of the run.
    for round in 0..12 {
        served_more(&ok, 20).await;
        let extra = match round % 3 {
            0 => upstream_config(b.addr),
            1 => format!(
                "{}[router.upstream.timeouts]\nconect_timeout_ms = 1\n",
                upstream_config(a.addr)
            ),
            _ => upstream_config(a.addr),
        };
        write_config(&dir, &extra);
        gw.signal(libc::SIGHUP);
        // One reload at a time: signals sent back to back may be delivered as one.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = gw.text();
            let done =
                log.matches("config reloaded").count() + log.matches("reload refused").count();
            if done > round {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reload {round} not reported: {log}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    served_more(&ok, 20).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} request(s) failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let served = ok.load(Ordering::Relaxed);
    assert!(served > 100, "only {served} requests served");
    assert!(
        a.hits() > 0 && b.hits() > 0,
        "traffic followed the reloads: a {}, b {}",
        a.hits(),
        b.hits()
    );
    let log = gw.text();
    assert_eq!(log.matches("config reloaded").count(), 8, "{log}");
    assert_eq!(log.matches("reload refused").count(), 4, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_finishes_on_its_generation() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    a.set_delay(Duration::from_millis(300));
    let gw = gateway("reload-inflight", &upstream_config(a.addr)).await;
    let c = client();
    let (c1, addr) = (c.clone(), gw.addr);
    let slow = tokio::spawn(async move { get(&c1, addr, "/").await });
    // The request is on generation 1 once the gateway has it in flight to `a`.
    let (admin, upstream) = (gw.handle.admin_addr().unwrap(), a.addr);
    tokio::task::spawn_blocking(move || wait_in_flight(admin, "default", upstream))
        .await
        .unwrap();
    let text = format!("{}\n{}", base_config(&gw.log), upstream_config(b.addr));
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert_eq!(get(&c, gw.addr, "/").await.body, "b");
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::OK);
    assert_eq!(slow.body, "a");
}

/// `[observer]` is read at start only (the observer attaches before the workers' sockets
/// exist): a reload that changes it says so, where it was ignored in silence (an operator
/// setting `mode = "off"` in an incident believed it off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_change_on_reload_needs_a_restart_and_says_so() {
    let a = Upstream::start("a").await;
    let gw = gateway("reload-observer", &upstream_config(a.addr)).await;
    let text = format!(
        "{}\n{}\n[observer]\nmode = \"off\"\n",
        base_config(&gw.log),
        upstream_config(a.addr)
    );
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert_eq!(
        report.needs_restart,
        ["observer.mode / observer.cgroup / observer.max_connections"],
        "{report:?}"
    );
}

/// A reload that changes a cluster (an endpoint added, as a scale-up does) keeps what the
/// gateway learnt about each host. Before, the changed cluster started afresh: its ejected
/// endpoint was healthy again and took requests until it failed anew (here, a retry each; a
/// blackholed host costs each its connect timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_cluster_keeps_its_ejected_endpoint_out() {
    use gateway_testkit::{
        admin::{endpoint, status},
        inprocess::log_lines,
        ports::refused_addr,
    };
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let refused = refused_addr();
    let cluster = |eps: &[std::net::SocketAddr]| {
        let list: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
        format!(
            "[router.upstream]\nendpoints = [{}]\n[router.upstream.health]\nejection_ms = 60000\n",
            list.join(", ")
        )
    };
    let gw = gateway("reload-keeps-health", &cluster(&[refused, a.addr])).await;
    let (c, admin) = (client(), gw.handle.admin_addr().unwrap());
    for _ in 0..4 {
        assert_eq!(get(&c, gw.addr, "/").await.status, StatusCode::OK);
    }
    let before = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    let ejected = endpoint(&before, "default", refused);
    assert_eq!(ejected["state"], "ejected", "{ejected:#}");

    let text = format!(
        "{}\n{}",
        base_config(&gw.log),
        cluster(&[refused, a.addr, b.addr])
    );
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    let after = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    let still = endpoint(&after, "default", refused);
    assert_eq!(still["state"], "ejected", "{still:#}");
    // The same ejection: its end, shown in wall-clock time from the monotonic clock, moves
    // by a millisecond between reads.
    let until = |v: &serde_json::Value| v["ejected_until_unix_ms"].as_i64().unwrap();
    assert!(
        (until(still) - until(ejected)).abs() <= 5,
        "the same ejection: {still:#} {ejected:#}"
    );
    let served = log_lines(&gw.log, 4).len();
    for _ in 0..30 {
        assert_eq!(get(&c, gw.addr, "/").await.status, StatusCode::OK);
    }
    let lines = log_lines(&gw.log, served + 30);
    let retried: Vec<_> = lines[served..]
        .iter()
        .filter(|l| l["retries"] != 0)
        .collect();
    assert!(
        retried.is_empty(),
        "sent to the ejected endpoint: {retried:?}"
    );
}

/// A reload retires only the clusters it replaced: a cluster it left as it was keeps probing,
/// so its ejected endpoint comes back once it answers again. (Were it retired too, its
/// probes would stop and the endpoint stay out for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_a_reload_leaves_as_it_was_keeps_probing() {
    use gateway_testkit::{
        admin::{endpoint, status, wait_for},
        ports::refused_addr,
    };
    let good = Upstream::start("good").await;
    let other = Upstream::start("other").await;
    let down = refused_addr();
    let config = |b: &[std::net::SocketAddr]| {
        let list: Vec<String> = b.iter().map(|e| format!("\"{e}\"")).collect();
        format!(
            "[clusters.a]\nendpoints = [\"{down}\", \"{}\"]\n[clusters.a.health]\n\
             ejection_ms = 300\nprobe_interval_ms = 100\n\
             [clusters.b]\nendpoints = [{}]\n\
             [[routes]]\npath_prefix = \"/\"\ncluster = \"a\"\n\
             [[routes]]\npath_prefix = \"/b/\"\ncluster = \"b\"\n",
            good.addr,
            list.join(", ")
        )
    };
    let gw = gateway("reload-kept-probes", &config(&[other.addr])).await;
    let (c, admin) = (client(), gw.handle.admin_addr().unwrap());
    for _ in 0..4 {
        assert_eq!(get(&c, gw.addr, "/").await.status, StatusCode::OK);
    }
    let text = format!(
        "{}\n{}",
        base_config(&gw.log),
        config(&[other.addr, good.addr])
    );
    let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
        .unwrap()
        .settings;
    let report = gw.handle.reload(settings).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    // The endpoint answers again: cluster `a`'s probes bring it back.
    let _listening = std::net::TcpListener::bind(down).unwrap();
    tokio::task::spawn_blocking(move || {
        wait_for("the kept cluster's probes bring its endpoint back", || {
            let s = status(admin);
            let state = endpoint(&s, "a", down)["state"].clone();
            (state == "healthy").then_some(()).ok_or(format!("{state}"))
        })
    })
    .await
    .unwrap();
}

/// `max_connections` holds across a reload that changes the cluster: the connections the
/// replaced cluster's requests still hold count against it. Each such reload allowed as many
/// again (an audit saw 8 connections open under a limit of 2 after three reloads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_across_a_reload() {
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (o, m, a) = (open.clone(), most.clone(), accepted.clone());
    // Requests being answered at once: each holds one of the gateway's connections from its
    // head to its answer (open connections would count a closed one until its FIN is read).
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (o, m, a) = (o.clone(), m.clone(), a.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut first = true;
                // Each request on the connection: its head, 400 ms, then the answer.
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // Connections that carry requests (the health probes' connect and close).
                    if std::mem::take(&mut first) {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    m.fetch_max(o.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let cluster = |policy: &str| {
        format!(
            "[router.upstream]\nendpoints = [\"{up}\"]\nlb_policy = \"{policy}\"\n\
             [router.upstream.limits]\nmax_connections = 2\n"
        )
    };
    let gw = gateway("reload-max-conns", &cluster("round_robin")).await;
    let c = client();
    let fire = |n: usize| {
        (0..n)
            .map(|_| {
                let (c, addr) = (c.clone(), gw.addr);
                tokio::spawn(async move { get(&c, addr, "/").await.status })
            })
            .collect::<Vec<_>>()
    };
    let mut all = fire(3);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for policy in ["least_request", "round_robin", "least_request"] {
        let text = format!("{}\n{}", base_config(&gw.log), cluster(policy));
        let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .settings;
        assert!(gw.handle.reload(settings).await.needs_restart.is_empty());
        all.extend(fire(2));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in all {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
    server.abort();
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "{} requests at once under max_connections = 2",
        most.load(Ordering::SeqCst)
    );
    // The reloads left how connections are made as it was: the new clusters took the two
    // connections over, and opened none.
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "connections that carried requests"
    );
}
