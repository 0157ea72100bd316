//! Shared harness of the privileged end-to-end tests: a fault lab whose client cgroup is
//! observed by the real eBPF object, and the `connect-probe` client run inside it.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod diagnose;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use gateway::observer::{
    ConnectExitHook, KernelObserver, ObserverOptions,
    records::ConnectRecord,
    stream::{Drained, ObserverStream, StreamOptions},
};
use gateway_lab::{Lab, LabSpec, NetnsCommandExt};
use serde::Deserialize;

/// Fails loudly (never skips) when the test cannot do what it claims to check.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this is a privileged test: it creates network namespaces and cgroups and attaches \
             eBPF programs, so it must run as root (use `./dev test`)"
        );
    }
}

/// One line of `connect-probe` output: what the application saw.
#[derive(Debug, Deserialize, Clone)]
pub struct Probe {
    pub pid: u32,
    pub cookie: u64,
    pub result: String,
    pub elapsed_us: u64,
}

/// The observer attached to a lab's client cgroup, read as the observer stream, and the
/// records it has completed so far.
pub struct Recorder {
    pub observer: ObserverStream,
    cgroup_id: u64,
    drained: Drained,
    seen: Vec<ConnectRecord>,
}

/// A lab with `upstreams` upstreams whose client cgroup is observed. Bind the pair as
/// `let (lab, mut rec) = ...`: locals drop in reverse order, so the observer detaches before
/// the namespaces go.
pub fn observed_lab(upstreams: usize) -> (Lab, Recorder) {
    observed_lab_with(upstreams, ConnectExitHook::Auto)
}

/// As [`observed_lab`], with the connect-return hook chosen (`Raw`: what a non-root observer
/// without tracefs gets).
pub fn observed_lab_with(upstreams: usize, connect_exit: ConnectExitHook) -> (Lab, Recorder) {
    require_root();
    let lab = Lab::new(LabSpec::new(upstreams)).expect("building the fault lab");
    let cgroup = lab.client_cgroup().expect("the lab has a client cgroup");
    let observer = KernelObserver::attach(&ObserverOptions {
        cgroup: Some(cgroup.path().to_path_buf()),
        connect_exit,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("attaching the observer: {e}"));
    let rec = Recorder {
        observer: ObserverStream::new(
            observer,
            &StreamOptions {
                join_window: Duration::from_millis(100),
                ..StreamOptions::default()
            },
        ),
        cgroup_id: cgroup.id(),
        drained: Drained::default(),
        seen: Vec::new(),
    };
    (lab, rec)
}

/// Runs `connect-probe` in the lab's client namespace and cgroup; one line per attempt.
pub fn probe(lab: &Lab, style: &str, addr: std::net::SocketAddr, extra: &[&str]) -> Vec<Probe> {
    let out = Command::new(env!("CARGO_BIN_EXE_connect-probe"))
        .arg(style)
        .arg(addr.to_string())
        .args(extra)
        .in_netns(lab.client())
        .in_cgroup(lab.client_cgroup().expect("client cgroup"))
        .output()
        .expect("running connect-probe");
    assert!(
        out.status.success(),
        "connect-probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad probe line {l}: {e}")))
        .collect()
}

/// Starts `connect-probe` in the lab's client namespace and cgroup without waiting; its
/// stdout is piped, one JSON line per attempt, printed as soon as the connect finishes.
pub fn spawn_probe(
    lab: &Lab,
    style: &str,
    addr: std::net::SocketAddr,
    extra: &[&str],
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_connect-probe"))
        .arg(style)
        .arg(addr.to_string())
        .args(extra)
        .in_netns(lab.client())
        .in_cgroup(lab.client_cgroup().expect("client cgroup"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting connect-probe")
}

impl Recorder {
    /// Drains the ring buffer now and returns how many records it held.
    pub fn drain_count(&mut self) -> usize {
        self.observer.drain(&mut self.drained);
        let n = self.drained.records;
        self.drained.clear();
        n
    }

    fn pump(&mut self) {
        self.observer.drain(&mut self.drained);
        for c in &self.drained.connects {
            assert_eq!(
                c.cgroup_id, self.cgroup_id,
                "record from outside the observed cgroup: {c:?}"
            );
            self.seen.push(c.record(self.observer.clock()));
        }
        self.drained.clear();
    }

    /// The observer's record of the connect with `cookie`, waiting up to `timeout`.
    pub fn record(&mut self, cookie: u64, timeout: Duration) -> ConnectRecord {
        assert_ne!(cookie, 0, "the probe could not read SO_COOKIE");
        let start = Instant::now();
        loop {
            self.pump();
            if let Some(i) = self.seen.iter().position(|r| r.cookie == cookie) {
                return self.seen.remove(i);
            }
            assert!(
                start.elapsed() < timeout,
                "no record for cookie {cookie} after {timeout:?}; lost={} seen={:?}",
                self.observer.events_lost(),
                self.seen
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
