//! Privileged (root: overlay mounts, systemd-nspawn, cgroups, eBPF): the Debian package and
//! its units under a real systemd. A Debian 12 container (the root `./dev setup` made with
//! debootstrap, booted with systemd-nspawn; it shares the host's network namespace, so only
//! loopback ports the test picked are used) gets the package with `dpkg -i`, and then:
//!
//! - `systemd-analyze verify` accepts both units;
//! - `systemctl start gateway` returns once the gateway serves (Type=notify), as a dynamic
//!   user with exactly the unit's capabilities, kernel signals on, its observer cgroup inside
//!   the unit's cgroup;
//! - `systemctl reload` applies a config and refuses a bad one; SIGUSR1 reopens the access
//!   log; SIGUSR2 hands over to a new process, which systemd follows as the main process, with
//!   no failed request under load; after `kill -9` systemd restarts it; `systemctl stop`
//!   drains (health 503, still serving for the drain delay) and ends cleanly;
//! - `gateway-observe.service` exports the container's connects with exactly its capabilities.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::{Duration, Instant},
};

use gateway_testkit::{
    deploy::*,
    http::get_once,
    ports::free_port,
    root::require_root,
    service::{CAP_BPF, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_PERFMON, cap_eff, cap_mask, load},
    upstream::BlockingUpstream as Upstream,
};

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_once(addr, path, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// The host pid of the unit's main process (from its observer cgroup, which holds it).
fn host_pid(c: &Container, main_pid: &str) -> u32 {
    let procs = c
        .cgroup_root()
        .join("system.slice/gateway.service")
        .join(format!("gateway-{main_pid}"))
        .join("cgroup.procs");
    std::fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("{}: {e}", procs.display()))
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the main process in its observer cgroup")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn privileged_the_package_and_its_units_under_a_real_systemd() {
    require_root();
    let deb = deb();
    let c = Container::boot("units", &[(deb.as_path(), "/root/gateway.deb")]);

    // Install on a clean root, and the units pass systemd's own checks there.
    c.ok(&["dpkg", "-i", "/root/gateway.deb"]);
    c.ok(&[
        "systemd-analyze",
        "verify",
        // No man(1) in a minimal root; the pages themselves are checked just below.
        "--man=no",
        "/usr/lib/systemd/system/gateway.service",
        "/usr/lib/systemd/system/gateway-observe.service",
    ]);
    for page in [
        "gateway",
        "gateway-run",
        "gateway-observe",
        "gateway-diagnose",
    ] {
        assert!(
            c.path(&format!("/usr/share/man/man1/{page}.1.gz")).exists(),
            "{page}(1)"
        );
    }
    let shipped = c.ok(&["gateway", "check-config", "/etc/gateway/gateway.toml"]);
    assert!(shipped.contains("ok"), "{shipped}");

    // Our config: loopback ports of the test's choosing, an upstream of the test's.
    let (a, b) = (Upstream::start(), Upstream::start());
    let (listen, admin) = (free_port(), free_port());
    let front = SocketAddr::from(([127, 0, 0, 1], listen));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let example = std::fs::read_to_string(c.path("/etc/gateway/gateway.toml")).unwrap();
    let config_for = |up: SocketAddr| {
        example
            .replace("\"0.0.0.0:8080\"", &format!("\"127.0.0.1:{listen}\""))
            .replace("\"127.0.0.1:8081\"", &format!("\"{up}\""))
            .replace("\"127.0.0.1:9901\"", &format!("\"127.0.0.1:{admin}\""))
            .replace("drain_delay_ms = 5000", "drain_delay_ms = 1500")
    };
    let config = c.path("/etc/gateway/gateway.toml");
    std::fs::write(&config, config_for(a.addr)).unwrap();

    // Start: returns once READY=1, i.e. serving.
    c.ok(&["systemctl", "start", "gateway"]);
    assert_eq!(
        get(front, "/").0,
        200,
        "not serving when `systemctl start` returned"
    );
    assert_eq!(c.prop("gateway", "ActiveState"), "active");
    assert!(
        c.prop("gateway", "StatusText")
            .starts_with("serving: listening on")
    );
    let main = c.prop("gateway", "MainPID");
    // Kernel signals on, inside the unit, with exactly its capabilities and no root.
    let (code, health) = get(admin_addr, "/healthz");
    assert_eq!(
        (code, health.contains("signals: kernel")),
        (200, true),
        "{health}\n{}",
        c.journal("gateway")
    );
    let pid = host_pid(&c, &main);
    assert_eq!(
        cap_eff(pid),
        cap_mask(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE])
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert!(
        !uid.split_whitespace().skip(1).any(|u| u == "0"),
        "runs as root: {uid}"
    );
    assert!(
        c.journal("gateway")
            .contains("connect_exit=\"sock_ops state callback\"")
    );
    // The observer cgroup inside the unit's.
    let cg = c.ok(&["cat", &format!("/proc/{main}/cgroup")]);
    assert!(
        cg.lines()
            .any(|l| l == format!("0::/system.slice/gateway.service/gateway-{main}")),
        "{cg}"
    );

    // Reload: a new upstream takes effect; a bad config fails the reload and changes nothing.
    std::fs::write(&config, config_for(b.addr)).unwrap();
    c.ok(&["systemctl", "reload", "gateway"]);
    wait_until("the reload", Duration::from_secs(5), || {
        c.prop("gateway", "StatusText").contains("reloaded")
    });
    let before = b.hits.load(Ordering::SeqCst);
    assert_eq!(get(front, "/after-reload").0, 200);
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        before + 1,
        "the reloaded config is not in use"
    );
    std::fs::write(&config, "[router]\nlisten = []\n").unwrap();
    let refused = run(&mut c.exec(&["systemctl", "reload", "gateway"]));
    assert!(
        !refused.status.success(),
        "a bad config must fail `systemctl reload`"
    );
    assert_eq!(c.prop("gateway", "ActiveState"), "active");
    assert_eq!(get(front, "/still-b").0, 200);
    std::fs::write(&config, config_for(b.addr)).unwrap();

    // SIGUSR1 (logrotate's postrotate): the access log is reopened; the process lives on.
    c.ok(&[
        "mv",
        "/var/log/gateway/access.log",
        "/var/log/gateway/access.log.1",
    ]);
    c.ok(&[
        "systemctl",
        "kill",
        "--signal=USR1",
        "--kill-whom=main",
        "gateway",
    ]);
    wait_until("a new access.log", Duration::from_secs(5), || {
        c.path("/var/log/gateway/access.log").exists()
    });
    assert_eq!(get(front, "/after-usr1").0, 200);
    wait_until(
        "the request in the new access.log",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(c.path("/var/log/gateway/access.log"))
                .is_ok_and(|t| t.contains("/after-usr1"))
        },
    );
    assert_eq!(
        c.prop("gateway", "MainPID"),
        main,
        "SIGUSR1 restarted or killed it"
    );

    // SIGUSR2 under load: a new main process, no failed request, no restart.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(front, 4, 2, stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    c.ok(&[
        "systemctl",
        "kill",
        "--signal=USR2",
        "--kill-whom=main",
        "gateway",
    ]);
    wait_until("a new main process", Duration::from_secs(20), || {
        c.prop("gateway", "MainPID") != main
    });
    let upgraded = c.prop("gateway", "MainPID");
    wait_until("the old process to exit", Duration::from_secs(20), || {
        !c.cgroup_root()
            .join("system.slice/gateway.service")
            .join(format!("gateway-{main}"))
            .exists()
    });
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let report = traffic.join().unwrap();
    println!(
        "upgrade under systemd: {} requests ok, {} failed; main pid {main} -> {upgraded}",
        report.ok, report.failed
    );
    assert_eq!(
        report.failed,
        0,
        "{:?}",
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.ok > 100, "{report:?}");
    assert_eq!(c.prop("gateway", "ActiveState"), "active");
    assert_eq!(c.prop("gateway", "NRestarts"), "0");
    assert!(get(admin_addr, "/healthz").1.contains("signals: kernel"));

    // kill -9 from outside: systemd restarts it, and the killed process's cgroup is gone.
    let victim = host_pid(&c, &upgraded);
    // SAFETY: kill(2) of the container's gateway, which this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_until("a restart", Duration::from_secs(20), || {
        c.prop("gateway", "NRestarts") == "1" && c.prop("gateway", "ActiveState") == "active"
    });
    let restarted = c.prop("gateway", "MainPID");
    let unit_cgroup = c.cgroup_root().join("system.slice/gateway.service");
    let children: Vec<String> = std::fs::read_dir(&unit_cgroup)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(children, vec![format!("gateway-{restarted}")]);
    wait_until("serving after the restart", Duration::from_secs(10), || {
        get_once(admin_addr, "/healthz", Duration::from_secs(1))
            .is_ok_and(|(c, b)| c == 200 && b.contains("signals: kernel"))
    });

    // Stop: health turns 503 at once, the drain delay still serves, then a clean exit.
    let stopper = {
        let mut cmd = c.exec(&["systemctl", "stop", "gateway"]);
        std::thread::spawn(move || run(&mut cmd))
    };
    wait_until("/healthz 503", Duration::from_secs(5), || {
        get_once(admin_addr, "/healthz", Duration::from_secs(1)).is_ok_and(|(c, _)| c == 503)
    });
    assert_eq!(
        get(front, "/during-drain").0,
        200,
        "not serving during the drain delay"
    );
    let stopped = stopper.join().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    assert_eq!(c.prop("gateway", "ActiveState"), "inactive");
    assert_eq!(c.prop("gateway", "Result"), "success");
    assert!(c.journal("gateway").contains("drain delay over"));

    // gateway-observe.service: the container's connects, with exactly its capabilities.
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        c.path("/etc/default/gateway-observe"),
        format!("GATEWAY_OBSERVE_METRICS={metrics}\n"),
    )
    .unwrap();
    c.ok(&["systemctl", "start", "gateway-observe"]);
    assert!(
        c.prop("gateway-observe", "StatusText")
            .starts_with("observing cgroup")
    );
    let closed = free_port();
    let _ = run(&mut c.exec(&[
        "systemd-run",
        "--wait",
        "--quiet",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/127.0.0.1/{closed}"),
    ]));
    let needle = format!("dst=\"127.0.0.1:{closed}\"");
    wait_until(
        "the refused connect in the exporter's metrics",
        Duration::from_secs(10),
        || {
            get_once(metrics, "/metrics", Duration::from_secs(1)).is_ok_and(|(_, m)| {
                m.lines().any(|l| {
                    l.starts_with("gateway_connect_attempts_total")
                        && l.contains(&needle)
                        && l.contains("refused")
                })
            })
        },
    );
    let observe_main = c.prop("gateway-observe", "MainPID");
    let observe_pid = std::fs::read_to_string(
        c.cgroup_root()
            .join("system.slice/gateway-observe.service/cgroup.procs"),
    )
    .unwrap()
    .split_whitespace()
    .next()
    .and_then(|p| p.parse::<u32>().ok())
    .unwrap_or_else(|| panic!("no process for main pid {observe_main}"));
    assert_eq!(
        cap_eff(observe_pid),
        cap_mask(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN])
    );
    c.ok(&["systemctl", "stop", "gateway-observe"]);
    assert_eq!(c.prop("gateway-observe", "Result"), "success");
}
