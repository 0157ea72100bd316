//! Privileged tests of the `gateway observe` command as a user runs it: attached at the cgroup
//! v2 root, it reports connects of any process on the host as JSON lines and metrics, and leaves
//! nothing attached after SIGTERM or SIGKILL. Plus its errors without privileges or with a bad
//! `--cgroup`. Traffic goes to loopback only. Run with `--test-threads=1`.

use std::{
    net::{SocketAddr, TcpListener},
    process::Command,
    time::{Duration, Instant},
};

use gateway_testkit::{
    connect_probe, gateway_bin,
    http::get_once,
    observe::ObserveProcess,
    observer::bpf_map_ids,
    ports::{free_port, refused_addr},
    root::require_root,
    service::{NOBODY, with_exact_caps},
};

/// `bpftool -j ARGS`, parsed. A bpftool that fails or prints something else fails the test:
/// an unreadable answer must never read as "nothing attached". `None` for the bare newline
/// bpftool 7 prints, not `[]`, for a cgroup with nothing attached.
fn bpftool(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (./dev setup installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    }))
}

/// The ids in a list bpftool printed.
fn ids(list: Option<serde_json::Value>) -> Vec<u64> {
    list.map_or_else(Vec::new, |list| {
        list.as_array()
            .expect("bpftool printed a list")
            .iter()
            .map(|p| p["id"].as_u64().expect("a program id"))
            .collect()
    })
}

/// IDs of the BPF programs loaded on the host, as bpftool lists them.
fn loaded_program_ids() -> Vec<u64> {
    ids(Some(
        bpftool(&["prog", "show"]).expect("bpftool prog show: a list"),
    ))
}

/// IDs of the programs attached to the cgroup v2 root (where `gateway observe` attaches), from
/// one run of bpftool: this used to run it twice, and a parallel test's observer could detach
/// in between ("printed no JSON", 2 runs in 7).
fn root_cgroup_program_ids() -> Vec<u64> {
    let root = gateway_lab::cgroup2_mount().expect("cgroup v2 is mounted");
    ids(bpftool(&["cgroup", "show", &root.display().to_string()]))
}

/// The BPF programs `pid` holds open (`prog_id` in /proc/PID/fdinfo), by the kernel's own
/// account: other processes on the host (another gateway, another test run) may load programs
/// with the same names at the same time, so names alone prove nothing.
fn programs_held_by(pid: u32) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fdinfo: {e}"))
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The observer's programs while it runs: five, loaded (connect4/6, sock_ops, getsockopt; on
/// this kernel, 6.12 or later, no connect-return tracepoint; and the raw tracepoint
/// `tcp_receive_reset`), the first four attached at the root.
fn assert_attached(pid: u32) -> Vec<u64> {
    let ours = programs_held_by(pid);
    assert_eq!(ours.len(), 5, "programs held by gateway observe: {ours:?}");
    let loaded = loaded_program_ids();
    assert!(
        ours.iter().all(|id| loaded.contains(id)),
        "bpftool lists {ours:?}: {loaded:?}"
    );
    let attached = root_cgroup_program_ids();
    let cgroup_ones = ours.iter().filter(|id| attached.contains(id)).count();
    assert_eq!(
        cgroup_ones, 4,
        "connect4, connect6, sock_ops and getsockopt attached at the root: ours {ours:?}, attached {attached:?}"
    );
    let other = ours
        .iter()
        .find(|id| !attached.contains(id))
        .expect("a fifth");
    let prog = bpftool(&["prog", "show", "id", &other.to_string()]).expect("bpftool prog show id");
    assert_eq!(prog["type"], "raw_tracepoint", "{prog:#}");
    ours
}

/// `gateway observe ARGS`, attached.
fn observe(args: &[&str]) -> ObserveProcess {
    let mut cmd = gateway_bin!().command();
    cmd.arg("observe").args(args);
    ObserveProcess::spawn(cmd)
}

/// `GET path` on `addr`: the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    get_once(addr, path, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
        .1
}

#[test]
fn privileged_observe_json_sees_any_process_and_serves_metrics() {
    require_root();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let obs = observe(&[
        "--json",
        "--metrics",
        &metrics.to_string(),
        "--join-window-ms",
        "100",
    ]);

    // A process that is not a child of the observer, in whatever cgroup the test runs in.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap();
    let closed = refused_addr();
    let refused = connect_probe!().run_here("go", closed);
    assert_eq!(refused.result, "ECONNREFUSED");
    let ok = connect_probe!().run_here("tokio", open);
    assert_eq!(ok.result, "ok");

    let r = obs.record(refused.cookie);
    assert_eq!(r["outcome"], "refused");
    assert_eq!(r["dst"], closed.to_string());
    assert_eq!(r["pid"], refused.pid);
    assert_eq!(r["comm"], "connect-probe");
    assert_eq!(r["errno"], "ECONNREFUSED");
    assert_eq!(r["so_error"], "ECONNREFUSED");
    assert!(r["cgroup_id"].as_u64().unwrap() > 0);
    assert!(r["ts_unix_ns"].as_u64().unwrap() > 1_700_000_000_000_000_000);
    let e = obs.record(ok.cookie);
    assert_eq!(e["outcome"], "established");
    assert_eq!(e["so_error"], "0");
    assert!(e["syn_rtt_us"].as_u64().unwrap() < 5_000);
    assert_eq!(e["errno"], serde_json::Value::Null);

    let text = http_get(metrics, "/metrics");
    let want = [
        format!("gateway_connect_attempts_total{{dst=\"{closed}\",outcome=\"refused\"}} 1"),
        format!("gateway_connect_attempts_total{{dst=\"{open}\",outcome=\"established\"}} 1"),
        "gateway_socket_errors_total{errno=\"ECONNREFUSED\",comm=\"connect-probe\"}".to_owned(),
        format!("gateway_connect_syn_rtt_seconds_count{{dst=\"{open}\"}} 1"),
        "gateway_observer_events_lost_total 0".to_owned(),
    ];
    for w in want {
        assert!(text.contains(&w), "metrics lack {w}:\n{text}");
    }
}

#[test]
fn privileged_sigterm_detaches_everything() {
    require_root();
    let mut obs = observe(&["--json"]);
    let ours = assert_attached(obs.child.id());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(obs.child.id() as i32, libc::SIGTERM) };
    let status = obs.child.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    wait_until_detached(&ours);
}

#[test]
fn privileged_sigkill_leaves_nothing_attached() {
    require_root();
    let mut obs = observe(&[]);
    let ours = assert_attached(obs.child.id());
    obs.child.kill().unwrap();
    obs.child.wait().unwrap();
    wait_until_detached(&ours);
}

fn wait_until_detached(ours: &[u64]) {
    // Programs are freed once the last fd closes, after an RCU grace period.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let loaded = loaded_program_ids();
        let attached = root_cgroup_program_ids();
        let left: Vec<&u64> = ours
            .iter()
            .filter(|id| loaded.contains(id) || attached.contains(id))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "still loaded after exit: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn privileged_unprivileged_user_gets_a_clear_error() {
    require_root();
    // setpriv drops to nobody with no capabilities at all.
    let mut cmd = gateway_bin!().command();
    cmd.args(["observe", "--duration", "1"]);
    let out = with_exact_caps(&cmd, NOBODY, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("needs root, or CAP_BPF + CAP_PERFMON"),
        "{err}"
    );
}

#[test]
fn privileged_unknown_cgroup_is_a_clear_error() {
    require_root();
    let out = gateway_bin!()
        .command()
        .args(["observe", "--cgroup", "no/such/cgroup", "--duration", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cgroup no/such/cgroup does not exist"),
        "{err}"
    );
}

/// Runs `gateway ARGS` in a private mount namespace after `setup` (shell commands that hide or
/// unmount something there, never in the host's own mount namespace).
fn in_private_mounts(setup: &str, args: &str) -> std::process::Output {
    let script = format!(
        "set -e; {setup}; exec {} {args}",
        gateway_bin!().path().display()
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap()
}

#[test]
fn privileged_kernel_without_btf_is_a_clear_error() {
    require_root();
    let out = in_private_mounts(
        "mount -t tmpfs none /sys/kernel/btf",
        "observe --duration 1",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("kernel BTF is missing") && err.contains("CONFIG_DEBUG_INFO_BTF"),
        "{err}"
    );
}

/// Without cgroup v2 in its mount namespace (as under `ip netns exec`), the observer mounts
/// it in a private mount namespace of its own and attaches; when even that is impossible
/// (no CAP_SYS_ADMIN for unshare/mount), the error says what happened and what to do.
#[test]
fn privileged_missing_cgroup2_is_mounted_privately() {
    require_root();
    let out = in_private_mounts(
        "for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts); do umount $m; done",
        "observe --duration 1",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("cgroup v2 was not visible in this mount namespace")
            && err.contains("observer attached"),
        "{err}"
    );
}

#[test]
fn privileged_missing_cgroup2_that_cannot_be_mounted_is_a_clear_error() {
    require_root();
    // No cgroup2, and no CAP_SYS_ADMIN to unshare a mount namespace and mount it.
    let script = format!(
        "set -e; for m in $(awk '$3 == \"cgroup2\" {{print $2}}' /proc/self/mounts); do umount $m; done; \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups \
         --inh-caps=-all,+bpf,+perfmon,+net_admin --ambient-caps=-all,+bpf,+perfmon,+net_admin \
         --bounding-set=-all,+bpf,+perfmon,+net_admin -- {} observe --duration 1",
        gateway_bin!().path().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cgroup v2 is not mounted in this mount namespace")
            && err.contains("unshare(CLONE_NEWNS)")
            && err.contains("nsenter --net="),
        "{err}"
    );
}

#[test]
fn privileged_missing_bpffs_is_mounted_by_the_observer() {
    require_root();
    let out = in_private_mounts(
        "umount /sys/fs/bpf 2>/dev/null || true",
        "observe --duration 0.5 --json",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("mounted bpffs"), "{err}");
}

/// `--metrics-max-destinations N`: the first N distinct destinations keep their own `dst`
/// label; connects to any later one are counted under `dst="other"`. Observed in the lab's
/// client cgroup only, so that no other process on the host takes a label first.
#[test]
fn privileged_metrics_cap_destination_labels_and_count_the_rest_as_other() {
    require_root();
    let lab = gateway_lab::Lab::new(gateway_lab::LabSpec::new(1)).expect("building the lab");
    let cgroup = lab.client_cgroup().expect("the lab has a client cgroup");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let obs = observe(&[
        "--json",
        "--cgroup",
        &cgroup.path().display().to_string(),
        "--metrics",
        &metrics.to_string(),
        "--metrics-max-destinations",
        "2",
        "--join-window-ms",
        "100",
    ]);
    // Four closed ports on the upstream (RST), one after the other, then the first again.
    let up = lab.upstream(0).unwrap();
    let dsts: Vec<SocketAddr> = (0..4).map(|i| up.addr_v4(9001 + i)).collect();
    for d in dsts.iter().chain([&dsts[0]]) {
        let p = connect_probe!().run_in(&lab, "go", *d, &[]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].result, "ECONNREFUSED", "{d}: {p:?}");
        // Recorded before the next connect, so that the order of first sight is ours.
        assert_eq!(obs.record(p[0].cookie)["dst"], d.to_string());
    }
    let text = http_get(metrics, "/metrics");
    let attempts = |dst: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "gateway_connect_attempts_total{{dst=\"{dst}\",outcome=\"refused\"}} "
                ))
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(
        attempts(&dsts[0].to_string()).as_deref(),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        attempts(&dsts[1].to_string()).as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(attempts("other").as_deref(), Some("2"), "{text}");
    for d in &dsts[2..] {
        assert!(
            !text.contains(&format!("dst=\"{d}\"")),
            "{d} is beyond the cap and has no label of its own:\n{text}"
        );
    }
    drop(obs);
}

/// `--no-destination-table` (for `--json` and `--quiet`, which never show the table): the same
/// records and per-destination metrics, and in the kernel a one-entry `DEST_STATS` that no
/// connect touches, where the default keeps a counted entry per destination. The live table
/// cannot go without it.
#[test]
fn privileged_no_destination_table_keeps_the_records_and_no_kernel_table() {
    require_root();
    let lab = gateway_lab::Lab::new(gateway_lab::LabSpec::new(1)).expect("building the lab");
    let cgroup = lab.client_cgroup().expect("the lab has a client cgroup");
    let dst = lab.upstream(0).unwrap().addr_v4(9001);
    for table in [false, true] {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (metrics_arg, cgroup_arg) = (metrics.to_string(), cgroup.path().display().to_string());
        let mut args = vec!["--json", "--cgroup", &cgroup_arg, "--metrics", &metrics_arg];
        if !table {
            args.push("--no-destination-table");
        }
        let obs = observe(&args);
        for _ in 0..3 {
            let p = connect_probe!().run_in(&lab, "go", dst, &[]);
            assert_eq!(p[0].result, "ECONNREFUSED", "{p:?}");
            assert_eq!(obs.record(p[0].cookie)["outcome"], "refused");
        }
        let text = http_get(metrics, "/metrics");
        let want = format!("gateway_connect_attempts_total{{dst=\"{dst}\",outcome=\"refused\"}} 3");
        assert!(text.contains(&want), "table={table}: {text}");
        assert_eq!(
            text.contains("gateway_observer_destinations_tracked"),
            table,
            "{text}"
        );
        let (max_entries, held) = dest_stats_of(obs.pid());
        if table {
            assert_eq!(max_entries, 16_384);
            assert_eq!(held.len(), 1, "{held:?}");
            let refused = &held[0]["formatted"]["value"]["attempts"][2];
            assert_eq!(*refused, 3, "attempts by outcome, refused = 2: {held:?}");
        } else {
            assert_eq!((max_entries, held.len()), (1, 0), "{held:?}");
        }
    }
    let out = gateway_bin!()
        .command()
        .args(["observe", "--no-destination-table", "--duration", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--no-destination-table needs --json or --quiet"),
        "{err}"
    );
}

/// `DEST_STATS` of the observer `pid` (found by the `map_id`s in its /proc fdinfo): its
/// `max_entries` and its entries.
fn dest_stats_of(pid: u32) -> (u64, Vec<serde_json::Value>) {
    for id in bpf_map_ids(pid).iter().map(ToString::to_string) {
        let m = bpftool(&["map", "show", "id", &id]).expect("a map");
        if m["name"] == "DEST_STATS" {
            let held = bpftool(&["map", "dump", "id", &id]).unwrap_or_default();
            let held = held.as_array().cloned().unwrap_or_default();
            return (m["max_entries"].as_u64().unwrap(), held);
        }
    }
    panic!("observer {pid} holds no DEST_STATS")
}

/// One `connect-probe` connect to `addr`, from inside `cgroup`: its cookie.
fn probe_in_cgroup(cgroup: &gateway_lab::CgroupGuard, addr: SocketAddr) -> u64 {
    use gateway_lab::NetnsCommandExt as _;
    let out = Command::new(connect_probe!().path())
        .arg("go")
        .arg(addr.to_string())
        .in_cgroup(cgroup)
        .output()
        .expect("running connect-probe");
    let text = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("connect-probe printed no JSON ({e}): {text}"));
    assert_eq!(line["result"], "ECONNREFUSED", "{line}");
    line["cookie"].as_u64().expect("cookie")
}

#[test]
fn privileged_observe_attributes_each_connect_to_its_unit_container_and_pod() {
    require_root();
    const ID: &str = "3f9a0c1b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90";
    const POD_ID: &str = "aa9a0c1b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90";
    const UID: &str = "7d2c1f0e-9a8b-4c3d-8e7f-6a5b4c3d2e1f";
    // Cgroups laid out as systemd, Docker and the kubelet (systemd driver) name theirs, under
    // one of the test's own (dropped last: children go first).
    let base = gateway_lab::CgroupGuard::new("attr").expect("a cgroup of the test's own");
    let unit = gateway_lab::CgroupGuard::create(base.path().join("payments.service")).unwrap();
    let docker =
        gateway_lab::CgroupGuard::create(base.path().join(format!("docker-{ID}.scope"))).unwrap();
    let pod = gateway_lab::CgroupGuard::create(base.path().join(format!(
        "kubepods-burstable-pod{}.slice",
        UID.replace('-', "_")
    )))
    .unwrap();
    let pod_container =
        gateway_lab::CgroupGuard::create(pod.path().join(format!("cri-containerd-{POD_ID}.scope")))
            .unwrap();
    let mount = gateway_lab::cgroup2_mount().unwrap();
    let rel = |g: &gateway_lab::CgroupGuard| {
        format!("/{}", g.path().strip_prefix(&mount).unwrap().display())
    };
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let obs = observe(&[
        "--json",
        "--cgroup",
        &base.path().display().to_string(),
        "--metrics",
        &metrics.to_string(),
        "--metrics-by",
        "unit",
        "--join-window-ms",
        "100",
    ]);
    let closed = refused_addr();
    let r = obs.record(probe_in_cgroup(&unit, closed));
    assert_eq!(r["cgroup"], rel(&unit), "{r}");
    assert_eq!(r["systemd_unit"], "payments.service", "{r}");
    assert_eq!(r["container_id"], serde_json::Value::Null, "{r}");
    assert_eq!(r["pod_uid"], serde_json::Value::Null, "{r}");
    assert_eq!(r["outcome"], "refused", "{r}");
    let r = obs.record(probe_in_cgroup(&docker, closed));
    assert_eq!(r["cgroup"], rel(&docker), "{r}");
    assert_eq!(r["container_id"], ID, "{r}");
    assert_eq!(r["systemd_unit"], format!("docker-{ID}.scope"), "{r}");
    let r = obs.record(probe_in_cgroup(&pod_container, closed));
    assert_eq!(r["cgroup"], rel(&pod_container), "{r}");
    assert_eq!(r["pod_uid"], UID, "{r}");
    assert_eq!(r["container_id"], POD_ID, "{r}");
    // The same connects by unit, as asked for with --metrics-by unit.
    let text = http_get(metrics, "/metrics");
    for service in [
        "payments.service".to_owned(),
        format!("docker-{ID}.scope"),
        format!("cri-containerd-{POD_ID}.scope"),
    ] {
        let want = format!(
            "gateway_connect_attempts_by_service_total{{service=\"{service}\",outcome=\"refused\"}} 1"
        );
        assert!(text.contains(&want), "metrics lack {want}:\n{text}");
    }
    drop(obs);
    drop((pod_container, pod, docker, unit, base));
}
