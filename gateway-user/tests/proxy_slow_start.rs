//! `health.slow_start_ms` end to end, with nginx as two upstreams and curl as the client. The
//! first upstream answers `503` until it is ejected (`error_status`), then, reloaded, `200`;
//! once its probes bring it back, 100 requests one after another:
//!
//! - in the cluster with slow start it takes a small share (its ramp starts at 10 % of its
//!   weight), and `/status` shows it warming (`slow_start_percent`);
//! - in the same cluster without slow start, the control, it takes half at once.
//!
//! Unprivileged: loopback only; nginx is Debian's (installed by `./dev`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{endpoint, status},
    inprocess::gateway,
    peers::{curl_bodies, nginx_listening},
    ports::free_port,
    tempdir::temp_dir,
};

/// nginx's config: the first port answering `first`, the second `200` with its port.
fn nginx_conf(dir: &Path, ports: [u16; 2], first: &str) -> PathBuf {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n\
             server {{ listen 127.0.0.1:{a}; location / {{ {first} }} }}\n\
             server {{ listen 127.0.0.1:{b}; location / {{ return 200 \"$server_port\"; }} }}\n}}\n",
            d = dir.display(),
            a = ports[0],
            b = ports[1],
        ),
    )
    .unwrap();
    conf
}

/// curl: `n` GETs of `url` one after another on one connection; the body of each (the port
/// that answered), or `status:` and nginx's error page.
fn curl(url: &str, n: usize) -> Vec<String> {
    curl_bodies(url, n, &["-H", "Host: test.local"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_back_from_an_ejection_takes_a_growing_share_not_its_whole_share_at_once() {
    let dir = temp_dir("slow-start-nginx");
    let ports = [free_port(), free_port()];
    let conf = nginx_conf(&dir, ports, "return 503;");
    let addrs = ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    let _nginx = nginx_listening(&dir, &conf, &addrs);
    let cluster = |name: &str, slow_start: &str| {
        format!(
            "[[routes]]\npath_prefix = \"/{name}/\"\ncluster = \"{name}\"\n\
             [clusters.{name}]\nendpoints = [\"{}\", \"{}\"]\n\
             [clusters.{name}.health]\nerror_statuses_to_eject = 2\nejection_ms = 300\n\
             probe_interval_ms = 100\n{slow_start}\n",
            addrs[0], addrs[1]
        )
    };
    let gw = gateway(
        "slow-start",
        &(cluster("warm", "slow_start_ms = 10000") + &cluster("cold", "")),
    )
    .await;
    let (addr, admin) = (gw.addr, gw.handle.admin_addr().unwrap());
    let (a, b) = (ports[0].to_string(), ports[1].to_string());
    tokio::task::spawn_blocking(move || {
        // The first endpoint answers 503 until it is ejected in both clusters.
        for name in ["warm", "cold"] {
            let got = curl(&format!("http://{addr}/{name}/"), 8);
            assert!(got.iter().any(|g| g.starts_with("status:")), "{got:?}");
        }
        let state = |name: &str| {
            let s = status(admin);
            endpoint(&s, name, addrs[0]).clone()
        };
        for name in ["warm", "cold"] {
            let ep = state(name);
            assert!(
                ep["state"] == "ejected" || ep["state"] == "probing",
                "{name}: {ep:#}"
            );
        }
        // Healed; its probes bring it back.
        nginx_conf(&dir, ports, "return 200 \"$server_port\";");
        let pid = std::fs::read_to_string(dir.join("nginx.pid")).unwrap();
        let pid: libc::pid_t = pid.trim().parse().unwrap();
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ["warm", "cold"]
            .iter()
            .any(|n| state(n)["state"] != "healthy")
        {
            assert!(Instant::now() < deadline, "{:#}", status(admin));
            std::thread::sleep(Duration::from_millis(20));
        }
        let warming = state("warm");
        let percent = warming["slow_start_percent"].as_u64();
        assert!(
            percent.is_some_and(|p| (10..40).contains(&p)),
            "{warming:#}"
        );
        assert!(state("cold").get("slow_start_percent").is_none());

        let share = |name: &str| {
            let got = curl(&format!("http://{addr}/{name}/"), 100);
            assert!(got.iter().all(|g| *g == a || *g == b), "{got:?}");
            got.iter().filter(|g| **g == a).count()
        };
        let (warm, cold) = (share("warm"), share("cold"));
        eprintln!(
            "back from its ejection, of 100 requests: {warm} with slow start, {cold} without"
        );
        assert!(
            (40..=60).contains(&cold),
            "without slow start: half at once ({cold})"
        );
        assert!(
            warm <= 30,
            "with slow start: about its 10-20 % of a half ({warm})"
        );
    })
    .await
    .unwrap();
    drop(gw);
}
