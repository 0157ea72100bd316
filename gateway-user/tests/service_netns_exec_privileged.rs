//! Privileged (root: network namespaces, eBPF): `gateway observe` and `gateway diagnose` run
//! under `ip netns exec`, which puts them in a mount namespace of their own with a fresh /sys
//! and no cgroup mounts. They mount cgroup v2 privately there and keep kernel signals on
//! instead of falling back to userspace timing. The namespaces are the fault lab's (one
//! upstream), removed when the test ends.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use gateway_lab::{Lab, LabSpec};
use gateway_testkit::{gateway_bin, observe::ObserveProcess, root::require_root};

const PORT: u16 = 8080;

#[test]
fn privileged_observe_under_ip_netns_exec_keeps_kernel_signals() {
    require_root();
    let lab = Lab::new(LabSpec::new(1)).expect("the fault lab");
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let target = up.addr_v4(PORT);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", lab.client().name()])
        .arg(gateway_bin!().path())
        .args(["observe", "--json", "--duration", "20"]);
    let obs = ObserveProcess::spawn(cmd);
    assert!(
        obs.log_contains("mounted it in a private one"),
        "cgroup v2 was not hidden, so this test proves nothing: {}",
        obs.log()
    );
    // A connect made inside the namespace, observed with its SYN-RTT: kernel signals.
    let record = loop {
        let _ = lab
            .client()
            .run(move || std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)))
            .unwrap();
        // Host-wide: other labs (parallel test runs) use the same private addresses, so
        // only this process's own connects count.
        if let Some(v) = obs.next_record(Duration::from_millis(500))
            && v["dst"] == target.to_string()
            && v["pid"] == std::process::id()
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no record for {target}: {}",
            obs.log()
        );
    };
    assert_eq!(record["outcome"], "established", "{record}");
    assert!(record["syn_rtt_us"].as_u64().is_some(), "{record}");
    // Nothing leaked into the test's own mount namespace.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup") && l.contains("cgroup2")), "{mounts}");
}

#[test]
fn privileged_diagnose_under_ip_netns_exec_keeps_kernel_signals() {
    require_root();
    let lab = Lab::new(LabSpec::new(1)).expect("the fault lab");
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let target = up.addr_v4(PORT).to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", lab.client().name()])
        .arg(gateway_bin!().path())
        .args(["diagnose", &target, "--json", "--count", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let m = &report["measurements"];
    assert_eq!(m["kernel_signals"], true, "{report:#}");
    assert_eq!(report["verdict"], "healthy", "{report:#}");
    assert!(out.status.success());
}
