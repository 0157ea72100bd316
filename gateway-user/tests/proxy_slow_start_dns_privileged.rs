//! Slow start for an address that DNS adds (a backend scaled up), end to end: the real binary
//! with its own `/etc/hosts` (a mount namespace of its own, where a file of the test is bound
//! over it), nginx as the upstreams on 127.0.0.1 and 127.0.0.2, curl as the client.
//!
//! `up.test` first names 127.0.0.1 only. Two clusters resolve it every 100 ms, one with slow
//! start and one without (the control). Once the test adds 127.0.0.2 to the file and both
//! clusters have re-resolved, 100 requests one after another to each:
//!
//! - with slow start, the new address takes a small share (its ramp starts at 10 % of its
//!   weight), and `/status` shows it warming (`slow_start_percent`) while the old one is not;
//! - without, it takes half at once.
//!
//! Privileged: `unshare --mount` and the bind mount need root. The namespace dies with the
//! gateway; nothing outside it changes.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{endpoint, status},
    config::write_config,
    gateway_bin,
    peers::nginx_listening,
    ports::free_port,
    process::GatewayProcess,
    root::require_root,
    tempdir::temp_dir,
};

/// nginx on `port` of both addresses, answering with the address that took the request.
fn nginx_conf(dir: &Path, addrs: &[SocketAddr]) -> std::path::PathBuf {
    let conf = dir.join("nginx.conf");
    let servers: String = addrs
        .iter()
        .map(|a| {
            format!(" server {{ listen {a}; location / {{ return 200 \"$server_addr\"; }} }}\n")
        })
        .collect();
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n{servers}}}\n",
            d = dir.display(),
        ),
    )
    .unwrap();
    conf
}

/// curl: `n` GETs of `url` one after another on one connection; the address that answered
/// each (or `status:...` for anything but a 200).
fn curl(url: &str, n: usize) -> Vec<String> {
    let mut c = Command::new("curl");
    c.arg("-s");
    for _ in 0..n {
        c.arg(url);
    }
    let out = c.args(["-w", " %{http_code}\n"]).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.rsplit_once(' ') {
            Some((addr, "200")) => addr.to_owned(),
            _ => format!("status:{l}"),
        })
        .collect()
}

/// Waits until `/status` lists both addresses in `cluster`.
fn wait_for_both(admin: SocketAddr, cluster: &str, addrs: &[SocketAddr]) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(admin);
        let listed = s["clusters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == cluster))
            .and_then(|c| c["endpoints"].as_array())
            .map_or(0, |eps| {
                eps.iter()
                    .filter(|e| addrs.iter().any(|a| e["address"] == a.to_string()))
                    .count()
            });
        if listed == addrs.len() {
            return;
        }
        assert!(
            Instant::now() < until,
            "cluster {cluster} did not re-resolve to {addrs:?} within 10 s: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_address_dns_adds_takes_a_growing_share_not_half_at_once_privileged() {
    require_root();
    let dir = temp_dir("slow-start-dns");
    let port = free_port();
    let old = SocketAddr::from(([127, 0, 0, 1], port));
    let new = SocketAddr::from(([127, 0, 0, 2], port));
    let _nginx = nginx_listening(&dir, &nginx_conf(&dir, &[old, new]), &[old, new]);
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 up.test\n").unwrap();
    let cluster = |name: &str, slow_start: &str| {
        format!(
            "[[routes]]\npath_prefix = \"/{name}/\"\ncluster = \"{name}\"\n\
             [clusters.{name}]\nendpoints = [\"up.test:{port}\"]\ndns_refresh_ms = 100\n\
             [clusters.{name}.health]\n{slow_start}\n"
        )
    };
    let cfg = write_config(
        &dir,
        &format!(
            "{}{}[observer]\nmode = \"off\"\n",
            cluster("ramp", "slow_start_ms = 60000"),
            cluster("plain", "")
        ),
    );
    // The gateway sees the test's file as /etc/hosts, in a mount namespace of its own, which
    // the kernel removes when the gateway (exec'd in place of unshare and sh) exits.
    let run = gateway_bin!().run(&cfg);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(&hosts)
        .arg(run.get_program())
        .args(run.get_args());
    for (k, v) in run.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let gw = GatewayProcess::spawn(cmd);
    let url = |c: &str| format!("http://{}/{c}/", gw.addr);
    // Before: every request to the one address there is.
    for c in ["ramp", "plain"] {
        let before = curl(&url(c), 10);
        assert!(before.iter().all(|a| a == "127.0.0.1"), "{c}: {before:?}");
    }

    // The backend scales up: DNS names a second address, in place (the bound file is the
    // same inode).
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 up.test\n127.0.0.2 up.test\n",
    )
    .unwrap();
    for c in ["ramp", "plain"] {
        wait_for_both(gw.admin, c, &[old, new]);
    }
    let s = status(gw.admin);
    let warming = &endpoint(&s, "ramp", new)["slow_start_percent"];
    assert!(
        warming.as_u64().is_some_and(|p| p < 50),
        "the new address should be warming: {warming}"
    );
    assert!(
        endpoint(&s, "ramp", old)["slow_start_percent"].is_null(),
        "the address that was there should not ramp: {s:#}"
    );

    let share = |c: &str| {
        let answers = curl(&url(c), 100);
        assert!(
            answers.iter().all(|a| a == "127.0.0.1" || a == "127.0.0.2"),
            "{c}: {answers:?}"
        );
        answers.iter().filter(|a| *a == "127.0.0.2").count()
    };
    let ramped = share("ramp");
    let control = share("plain");
    eprintln!("the new address took {ramped} of 100 with slow start, {control} without");
    // At 10 % of its weight, it wins about 5 of 100 (the 1 % tails: 1 and 11; the window is a
    // minute, so the ramp stays near its floor while the requests run).
    assert!(
        (1..=15).contains(&ramped),
        "with slow start the new address took {ramped} of 100"
    );
    // Without, the round robin gives it every other request.
    assert!(
        (40..=60).contains(&control),
        "without slow start the new address took {control} of 100"
    );
}
