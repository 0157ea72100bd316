//! `gateway run` as a service manager starts it: inside a cgroup of the test's own (standing
//! for a systemd unit's or a container's), as another user with an exact capability set
//! (`setpriv`), the cgroup delegated to that user; what the kernel says of the process (its
//! cgroup, its effective capabilities); and a closed-loop HTTP/1.1 load generator that counts
//! every failure, for restarts and upgrades under load.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

/// The uid of `nobody`, the unprivileged user of the tests.
pub const NOBODY: u32 = 65534;

/// Capability numbers (linux/capability.h) of the documented least-privilege sets.
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The capability mask of `caps`, as `CapEff` in /proc/PID/status shows it ([`cap_eff`]).
pub fn cap_mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c)
}

/// The cgroup v2 directory of process `pid`, as a path under the v2 mount.
pub fn cgroup_of(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    gateway_lab::cgroup2_mount()
        .unwrap()
        .join(rel.trim_start_matches('/'))
}

/// Delegates `cgroup` to `uid` the way systemd's `Delegate=yes` does: the directory and the
/// files a delegatee writes (cgroup.procs, cgroup.threads, cgroup.subtree_control).
pub fn delegate(cgroup: &Path, uid: u32) {
    for p in [
        cgroup.to_path_buf(),
        cgroup.join("cgroup.procs"),
        cgroup.join("cgroup.threads"),
        cgroup.join("cgroup.subtree_control"),
    ] {
        chown(&p, Some(uid), Some(uid)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    }
}

/// Wraps `cmd` to run as `uid` with exactly `caps` (names as setpriv spells them, e.g. `bpf`)
/// as permitted, effective, inheritable, ambient and bounding sets, and no supplementary
/// groups.
pub fn with_exact_caps(cmd: &Command, uid: u32, caps: &[&str]) -> Command {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut wrapped = Command::new("setpriv");
    wrapped
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    wrapped
}

/// The `CapEff` mask of process `pid`.
pub fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff")
}

/// What the load generator saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    pub reconnects: u64,
}

/// Closed-loop HTTP/1.1 clients: `keepalive` of them reuse a connection until the server says
/// `Connection: close` (then reconnect), the others open a connection per request. Every
/// request that gets anything but a 200 counts as failed, with the reason. Runs until `stop`.
pub fn load(
    addr: SocketAddr,
    keepalive: usize,
    fresh: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<LoadReport> {
    std::thread::spawn(move || {
        let ok = Arc::new(AtomicU64::new(0));
        let reconnects = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for i in 0..keepalive + fresh {
            let (ok, reconnects, failures, stop) = (
                ok.clone(),
                reconnects.clone(),
                failures.clone(),
                stop.clone(),
            );
            let reuse = i < keepalive;
            threads.push(std::thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                while !stop.load(Ordering::Relaxed) {
                    match request(addr, reuse, &mut conn) {
                        Ok(true) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if reuse {
                                reconnects.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            failures.lock().unwrap().push(e);
                            conn = None;
                        }
                    }
                }
            }));
        }
        for t in threads {
            let _ = t.join();
        }
        let failures = std::mem::take(&mut *failures.lock().unwrap());
        LoadReport {
            ok: ok.load(Ordering::Relaxed),
            failed: failures.len() as u64,
            failures,
            reconnects: reconnects.load(Ordering::Relaxed),
        }
    })
}

/// One request; `Ok(keep)` says whether the connection may be reused.
fn request(
    addr: SocketAddr,
    reuse: bool,
    conn: &mut Option<BufReader<TcpStream>>,
) -> Result<bool, String> {
    let timeout = Duration::from_secs(5);
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.set_nodelay(true).unwrap();
        *conn = Some(BufReader::new(s));
    }
    let c = conn.as_mut().unwrap();
    let close = if reuse { "" } else { "Connection: close\r\n" };
    c.get_mut()
        .write_all(format!("GET /load HTTP/1.1\r\nHost: test\r\n{close}\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut status_line = String::new();
    c.read_line(&mut status_line)
        .map_err(|e| format!("read status: {e}"))?;
    if status_line.is_empty() {
        return Err("connection closed before a response".into());
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = 0usize;
    let mut server_close = false;
    loop {
        let mut h = String::new();
        c.read_line(&mut h)
            .map_err(|e| format!("read header: {e}"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower == "connection: close" {
            server_close = true;
        }
    }
    let mut body = vec![0u8; length];
    c.read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    if status != 200 {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let keep = reuse && !server_close;
    if !keep {
        *conn = None;
    }
    Ok(keep)
}
