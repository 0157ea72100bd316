//! Privileged (root: network namespaces, eBPF): `gateway observe` and `gateway diagnose` run
//! under `ip netns exec`, which puts them in a mount namespace of their own with a fresh /sys
//! and no cgroup mounts. They mount cgroup v2 privately there and keep kernel signals on
//! instead of falling back to userspace timing. The namespaces are the fault lab's (one
//! upstream), removed when the test ends.

mod service_support;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gateway_lab::{Lab, LabSpec};
use service_support::*;

const PORT: u16 = 8080;

#[test]
fn privileged_observe_under_ip_netns_exec_keeps_kernel_signals() {
    require_root();
    let lab = Lab::new(LabSpec::new(1)).expect("the fault lab");
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let target = up.addr_v4(PORT);
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.client().name(),
            gateway_bin(),
            "observe",
            "--json",
            "--duration",
            "20",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = Reap(child.id());
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen
        .iter()
        .any(|l: &String| l.contains("observer attached"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("observe did not attach under ip netns exec: {seen:#?}"),
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("mounted it in a private one")),
        "cgroup v2 was not hidden, so this test proves nothing: {seen:#?}"
    );
    // A connect made inside the namespace, observed with its SYN-RTT: kernel signals.
    let record = loop {
        let _ = lab
            .client()
            .run(move || std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)))
            .unwrap();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500))
            && line.starts_with('{')
        {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            // Host-wide: other labs (parallel test runs) use the same private addresses, so
            // only this process's own connects count.
            if v["dst"] == target.to_string() && v["pid"] == std::process::id() {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no record for {target}: {seen:#?}"
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
        .args([
            "netns",
            "exec",
            lab.client().name(),
            gateway_bin(),
            "diagnose",
            &target,
            "--json",
            "--count",
            "3",
        ])
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

/// SIGTERM, then SIGKILL, for a child this test started, on drop (also on panic).
struct Reap(u32);

impl Drop for Reap {
    fn drop(&mut self) {
        // SAFETY: kill(2)/waitpid(2) on our own child.
        unsafe {
            libc::kill(self.0 as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut status = 0;
            while libc::waitpid(self.0 as i32, &mut status, libc::WNOHANG) == 0 {
                if Instant::now() >= deadline {
                    libc::kill(self.0 as i32, libc::SIGKILL);
                    libc::waitpid(self.0 as i32, &mut status, 0);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
