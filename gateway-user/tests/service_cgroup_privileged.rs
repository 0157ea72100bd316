//! Privileged (root: cgroups, eBPF, setpriv): where `gateway run` puts its observer cgroup.
//! Each test starts the built binary inside a cgroup the test made (standing for a systemd
//! unit's or a container's cgroup) and checks that the observer cgroup is a child of it, never
//! a new one at the root; that one left behind by SIGKILL is removed at the next start; that
//! a cgroup the process may not write is a clear error that says how to delegate it; and that
//! `[observer] max_connections` sizes the kernel's table of connect records.

use std::{net::SocketAddr, path::Path, time::Duration};

use gateway_lab::{CgroupGuard, NetnsCommandExt as _};
use gateway_testkit::{
    config, gateway_bin,
    http::get_once,
    observer::bpf_map_ids,
    ports::free_port,
    process::{GatewayProcess, run_to_exit},
    root::require_root,
    service::{NOBODY, cgroup_of, with_exact_caps},
    tempdir::TempDir,
    upstream::BlockingUpstream as Upstream,
};

/// The config's path, and the admin and proxy listeners' addresses.
fn write_config(
    dir: &Path,
    upstream: SocketAddr,
    mode: &str,
) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    let (listen, admin) = (free_port(), free_port());
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        config::with_ports(
            listen,
            admin,
            upstream,
            &dir.join("access.log"),
            "drain_delay_ms = 0",
            &format!("[observer]\nmode = \"{mode}\""),
        ),
    )
    .unwrap();
    // Readable by the unprivileged runs too.
    for p in [dir, path.as_path()] {
        let mut perm = std::fs::metadata(p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(p, perm).unwrap();
    }
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    (path, local(admin), local(listen))
}

fn observer_dirs(unit: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(unit)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn privileged_observer_cgroup_is_a_child_of_the_own_cgroup_and_goes_on_exit() {
    require_root();
    let up = Upstream::start();
    let unit = CgroupGuard::new("own-unit").expect("a test cgroup");
    let dir = TempDir::new("cg-own");
    let (config, admin, _) = write_config(dir.path(), up.addr, "kernel");
    let mut cmd = gateway_bin!().run(&config);
    cmd.in_cgroup(&unit);
    let mut gw = GatewayProcess::spawn(cmd);
    let pid = gw.pid();
    let expected = unit.path().join(format!("gateway-{pid}"));
    assert_eq!(cgroup_of(pid), expected, "{}", gw.text());
    assert!(
        !gateway_lab::cgroup2_mount()
            .unwrap()
            .join(format!("gateway-{pid}"))
            .exists(),
        "a cgroup at the root"
    );
    assert!(
        get_once(admin, "/healthz", Duration::from_secs(2))
            .unwrap()
            .1
            .contains("signals: kernel")
    );
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).expect("exited").success());
    assert!(
        !expected.exists(),
        "the observer cgroup outlived the process"
    );
    assert_eq!(observer_dirs(unit.path()), Vec::<String>::new());
}

/// `[observer] max_connections` sizes the kernel's table of connect records (`SOCK_STATE`,
/// rounded up to a power of two), as `gateway observe --max-connections` does; and the proxy,
/// which never reads per-destination totals, keeps no table of them: `DEST_STATS` is one entry
/// and stays empty while requests go upstream (`gateway observe` keeps one, 16,384 entries by
/// default).
#[test]
fn privileged_observer_max_connections_sizes_the_kernel_table() {
    require_root();
    let up = Upstream::start();
    let unit = CgroupGuard::new("table-unit").expect("a test cgroup");
    let dir = TempDir::new("cg-table");
    let (config, admin, listen) = write_config(dir.path(), up.addr, "kernel");
    // `[observer]` is the config's last table.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\nmax_connections = 1000\n");
    std::fs::write(&config, text).unwrap();
    let mut cmd = gateway_bin!().run(&config);
    cmd.in_cgroup(&unit);
    let gw = GatewayProcess::spawn(cmd);
    // (name, id, max_entries) of each map the gateway holds.
    let tables: Vec<(String, u64, u64)> = bpf_map_ids(gw.pid())
        .into_iter()
        .map(|id| {
            let m = bpftool(&["map", "show", "id", &id.to_string()]);
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                id,
                m["max_entries"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let table = |name: &str| {
        tables
            .iter()
            .find(|t| t.0 == name)
            .unwrap_or_else(|| panic!("no {name}: {tables:?}\n{}", gw.text()))
    };
    assert_eq!(table("SOCK_STATE").2, 1024, "{tables:?}");
    assert_eq!(table("CONN_STATS").2, 1000, "{tables:?}");
    assert_eq!(table("DEST_STATS").2, 1, "{tables:?}");
    for _ in 0..3 {
        let (status, _) = get_once(listen, "/", Duration::from_secs(5)).expect("an answer");
        assert_eq!(status, 200, "{}", gw.text());
    }
    // The kernel saw the upstream connect (its SYN-RTT is measured only there) ...
    let (_, metrics) = get_once(admin, "/metrics", Duration::from_secs(5)).expect("metrics");
    let syn_rtts: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("gateway_upstream_syn_rtt_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(syn_rtts >= 1.0, "{metrics}");
    // ... and counted it into no table.
    let held = bpftool(&["map", "dump", "id", &table("DEST_STATS").1.to_string()]);
    assert_eq!(held, serde_json::json!([]), "{}", gw.text());
}

/// bpftool's JSON answer to `args`.
fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (./dev setup installs it)");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn privileged_a_cgroup_left_by_a_killed_gateway_is_removed_at_the_next_start() {
    require_root();
    let up = Upstream::start();
    let unit = CgroupGuard::new("stale-unit").expect("a test cgroup");
    let dir = TempDir::new("cg-stale");
    let (config, ..) = write_config(dir.path(), up.addr, "kernel");
    let start = || {
        let mut cmd = gateway_bin!().run(&config);
        cmd.in_cgroup(&unit);
        GatewayProcess::spawn(cmd)
    };
    let mut first = start();
    let killed = first.pid();
    first.signal(libc::SIGKILL);
    first.wait(Duration::from_secs(5)).expect("killed");
    let stale = format!("gateway-{killed}");
    assert_eq!(
        observer_dirs(unit.path()),
        vec![stale.clone()],
        "SIGKILL leaves the cgroup behind"
    );

    let second = start();
    second.expect_log(
        "removed a cgroup left behind by a gateway that no longer runs",
        Duration::from_secs(5),
    );
    assert_eq!(
        observer_dirs(unit.path()),
        vec![format!("gateway-{}", second.pid())]
    );
}

#[test]
fn privileged_an_unwritable_own_cgroup_is_a_clear_error() {
    require_root();
    let up = Upstream::start();
    // Root-owned and not delegated: the unprivileged gateway may not create a child there.
    let unit = CgroupGuard::new("not-delegated").expect("a test cgroup");
    let dir = TempDir::new("cg-denied");
    let (config, ..) = write_config(dir.path(), up.addr, "kernel");
    let mut cmd = with_exact_caps(
        &gateway_bin!().run(&config),
        NOBODY,
        &["bpf", "perfmon", "net_admin"],
    );
    cmd.in_cgroup(&unit);
    // mode = kernel refuses to start.
    let (exit, text) = run_to_exit(cmd, Duration::from_secs(20));
    assert!(!exit.success());
    assert!(
        text.contains(&format!(
            "creating the observer cgroup {}/gateway-",
            unit.path().display()
        )) && text.contains("Permission denied")
            && text.contains("Delegate=yes"),
        "{text}"
    );
    assert_eq!(observer_dirs(unit.path()), Vec::<String>::new());
}

/// An absolute `[observer] cgroup` outside the cgroup v2 filesystem (a typo, or `/sys/fs/cgroup`
/// on a hybrid host, where it is a tmpfs) is refused before anything is made there: the
/// gateway, as root, created the directory and wrote its pid into a `cgroup.procs` file in it
/// (in `/etc`, say) before it found out.
#[test]
fn privileged_an_observer_cgroup_outside_cgroup2_is_refused_and_nothing_written() {
    require_root();
    let up = Upstream::start();
    let dir = TempDir::new("cgroup-outside");
    let (path, _, _) = write_config(dir.path(), up.addr, "kernel");
    let outside = dir.path().join("not-a-cgroup");
    std::fs::create_dir(&outside).unwrap();
    let missing = outside.join("child");
    let base = std::fs::read_to_string(&path).unwrap();
    for target in [&outside, &missing] {
        let text = base.replace(
            "[observer]\n",
            &format!("[observer]\ncgroup = \"{}\"\n", target.display()),
        );
        std::fs::write(&path, text).unwrap();
        let (exit, text) = run_to_exit(gateway_bin!().run(&path), Duration::from_secs(20));
        assert!(!exit.success(), "{text}");
        assert!(
            text.contains(&format!(
                "{} is not a cgroup v2 directory",
                target.display()
            )),
            "{text}"
        );
        assert!(!missing.exists(), "created {}", missing.display());
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote into {}",
            outside.display()
        );
    }
}
