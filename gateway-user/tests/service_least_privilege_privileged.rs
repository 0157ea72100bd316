//! Privileged (root sets the stage, then drops it): the documented least-privilege set really
//! works. `gateway run` and `gateway observe` start as user 65534 (nobody) with exactly the
//! capabilities the units grant, through `setpriv` (ambient, inheritable, permitted, effective
//! and bounding sets all equal to the list), and the test checks that kernel signals are on:
//! the observer attached (no tracefs, which is root-only: on this kernel, 6.12 or later, no
//! connect-return hook at all, sock_ops' state callback sees EADDRNOTAVAIL) and the kernel's
//! measurements flowing.
//!
//! | command | capabilities | also needs |
//! |---|---|---|
//! | `gateway run` | CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE | write access to its own cgroup (systemd `Delegate=yes`) |
//! | `gateway observe` | CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN | nothing |

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gateway_lab::{CgroupGuard, NetnsCommandExt as _};
use gateway_testkit::{
    config, gateway_bin,
    http::get_once,
    observe::ObserveProcess,
    ports::{free_port, refused_addr},
    process::GatewayProcess,
    root::require_root,
    service::{
        CAP_BPF, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_PERFMON, NOBODY, cap_eff, cap_mask,
        cgroup_of, delegate, with_exact_caps,
    },
    tempdir::TempDir,
    upstream::BlockingUpstream as Upstream,
};

/// A free loopback port below 1024 (CAP_NET_BIND_SERVICE is part of the set under test).
fn free_low_port() -> u16 {
    (600..1024)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024 on loopback")
}

#[test]
fn privileged_run_as_nobody_with_exactly_the_documented_capabilities_has_kernel_signals() {
    require_root();
    let up = Upstream::start();
    let unit = CgroupGuard::new("least-priv").expect("a test cgroup");
    delegate(unit.path(), NOBODY);
    let dir = TempDir::new("least-priv");
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let (listen, admin) = (free_low_port(), free_port());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config::with_ports(
            listen,
            admin,
            up.addr,
            &dir.path().join("access.log"),
            "drain_delay_ms = 0",
            "[observer]\nmode = \"kernel\"",
        ),
    )
    .unwrap();
    let mut cmd = with_exact_caps(
        &gateway_bin!().run(&config),
        NOBODY,
        &["bpf", "perfmon", "net_admin", "net_bind_service"],
    );
    cmd.in_cgroup(&unit);
    let mut gw = GatewayProcess::spawn(cmd);
    let pid = gw.pid();

    // Exactly the set, as nobody.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("65534")),
        "{status}"
    );
    assert_eq!(
        cap_eff(pid),
        cap_mask(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE]),
        "CapEff"
    );
    assert_eq!(cgroup_of(pid), unit.path().join(format!("gateway-{pid}")));
    gw.expect_log(
        "connect_exit=\"sock_ops state callback\"",
        Duration::from_secs(1),
    );

    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let (code, body) = get_once(admin, "/healthz", Duration::from_secs(2)).unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("signals: kernel"), "{body}");
    // Requests through the port below 1024, and the kernel's SYN-RTT of their upstream
    // connects in the metrics.
    let front = SocketAddr::from(([127, 0, 0, 1], listen));
    for _ in 0..5 {
        assert_eq!(get_once(front, "/", Duration::from_secs(2)).unwrap().0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = get_once(admin, "/metrics", Duration::from_secs(2)).unwrap();
        let rtt_count = metrics
            .lines()
            .find(|l| l.starts_with("gateway_upstream_syn_rtt_seconds_count"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if rtt_count >= 1.0 && metrics.contains("gateway_observer_kernel_signals 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no kernel SYN-RTT in the metrics:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait(Duration::from_secs(10)).expect("exited").success(),
        "{}",
        gw.text()
    );
}

#[test]
fn privileged_observe_as_nobody_with_exactly_the_documented_capabilities_sees_connects() {
    require_root();
    let mut base = gateway_bin!().command();
    base.args(["observe", "--json", "--duration", "20"]);
    let obs = ObserveProcess::spawn(with_exact_caps(
        &base,
        NOBODY,
        &["bpf", "perfmon", "net_admin"],
    ));
    let pid = obs.pid();
    assert!(
        obs.log_contains("connect_exit=\"sock_ops state callback\""),
        "{}",
        obs.log()
    );
    // setpriv execs gateway, so the pid is the observer's.
    assert_eq!(
        cap_eff(pid),
        cap_mask(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN])
    );

    // A refused connect from this (root, unrelated) process: host-wide, the observer sees it.
    let closed = refused_addr();
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let _ = std::net::TcpStream::connect(closed);
        if let Some(v) = obs.next_record(Duration::from_millis(500))
            && v["dst"] == closed.to_string()
        {
            break v;
        }
        assert!(Instant::now() < deadline, "no record for {closed}");
    };
    assert_eq!(record["outcome"], "refused", "{record}");
    assert_eq!(record["errno"], "ECONNREFUSED", "{record}");
    assert_eq!(record["pid"], std::process::id(), "{record}");
}
