//! The kernel observer as the observer tests see it: attached in-process to a fault lab's
//! client cgroup (the real eBPF object), read as the observer stream; and `connect-probe`, the
//! client run inside that namespace and cgroup, whose JSON lines say what the application saw
//! of each connect, with the socket's cookie to find the kernel's record of it.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gateway::observer::{
    ConnectExitHook, KernelObserver, ObserverOptions,
    records::ConnectRecord,
    stream::{Drained, ObserverStream, StreamOptions},
};
use gateway_lab::{Lab, LabSpec, NetnsCommandExt};
use serde::Deserialize;

use crate::{bins::ConnectProbe, root::require_root};

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
    observed_lab_opts(
        upstreams,
        ObserverOptions {
            connect_exit,
            ..Default::default()
        },
    )
}

/// As [`observed_lab`], with a kernel table of `records` connect records (`max_connections`),
/// for tests of what happens once a connection's record is reused.
pub fn observed_lab_with_records(upstreams: usize, records: u32) -> (Lab, Recorder) {
    observed_lab_opts(
        upstreams,
        ObserverOptions {
            max_connections: records,
            ..Default::default()
        },
    )
}

fn observed_lab_opts(upstreams: usize, opts: ObserverOptions) -> (Lab, Recorder) {
    require_root();
    let lab = Lab::new(LabSpec::new(upstreams)).expect("building the fault lab");
    let cgroup = lab.client_cgroup().expect("the lab has a client cgroup");
    let observer = KernelObserver::attach(&ObserverOptions {
        cgroup: Some(cgroup.path().to_path_buf()),
        ..opts
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

impl ConnectProbe {
    /// Runs `connect-probe STYLE ADDR EXTRA…` in the lab's client namespace and cgroup, waits,
    /// and returns its lines, one per attempt.
    pub fn run_in(&self, lab: &Lab, style: &str, addr: SocketAddr, extra: &[&str]) -> Vec<Probe> {
        let out = self
            .in_lab(lab, style, addr, extra)
            .output()
            .expect("running connect-probe");
        parse(&out)
    }

    /// Starts `connect-probe` in the lab's client namespace and cgroup without waiting; its
    /// stdout is piped, one JSON line per attempt, printed as soon as the connect finishes.
    pub fn spawn_in(&self, lab: &Lab, style: &str, addr: SocketAddr, extra: &[&str]) -> Child {
        self.in_lab(lab, style, addr, extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting connect-probe")
    }

    /// One connect to `addr` from the test's own namespace and cgroup.
    pub fn run_here(&self, style: &str, addr: SocketAddr) -> Probe {
        let out = Command::new(&self.0)
            .arg(style)
            .arg(addr.to_string())
            .output()
            .expect("running connect-probe");
        let mut lines = parse(&out);
        assert_eq!(lines.len(), 1, "one attempt, one line: {lines:?}");
        lines.remove(0)
    }

    fn in_lab(&self, lab: &Lab, style: &str, addr: SocketAddr, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.0);
        cmd.arg(style)
            .arg(addr.to_string())
            .args(extra)
            .in_netns(lab.client())
            .in_cgroup(lab.client_cgroup().expect("the lab has a client cgroup"));
        cmd
    }
}

fn parse(out: &std::process::Output) -> Vec<Probe> {
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

/// The ids of the BPF maps process `pid` holds open (`map_id` in /proc/PID/fdinfo): how a test
/// finds a running observer's own maps for bpftool.
pub fn bpf_map_ids(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}
