//! Shared by the `service_*` tests: the built `gateway` binary started the way a service
//! manager starts it (environment, cgroup, user and capabilities chosen by the test), its
//! stderr collected line by line; cgroups the test makes, removed even on panic; and a small
//! HTTP/1.1 load generator that counts every failure.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

#[allow(
    unused_imports,
    reason = "not every test binary starts processes in a cgroup"
)]
pub use gateway_lab::{CgroupGuard, NetnsCommandExt};

pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gateway")
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this privileged test needs root (cgroups, eBPF, setpriv); run it through ./dev test"
    );
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "gateway-svc-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process the test started; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `cmd` with stderr collected (and stdout too, merged into the same lines).
    pub fn start(mut cmd: Command) -> Proc {
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proc { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until an output line contains `needle`; panics with the output otherwise.
    pub fn expect_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
        {
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {limit:?}; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many output lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(self.pid() as i32, sig) },
            0,
            "kill({sig})"
        );
    }

    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `gateway run` command for `config`, with the environment a service manager gives.
pub fn gateway_run(config: &Path) -> Command {
    let mut cmd = Command::new(gateway_bin());
    cmd.args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info");
    cmd
}

/// A config for `gateway run`: loopback listener and admin on the given ports, one upstream,
/// access log in JSON to `log`, plus `extra` (TOML appended at the end; may open new tables).
pub fn config(
    listen: u16,
    admin: u16,
    upstream: SocketAddr,
    log: &Path,
    router_extra: &str,
    extra: &str,
) -> String {
    format!(
        "[router]\nlisten = [\"127.0.0.1:{listen}\"]\nworkers = 2\n{router_extra}\n\n[router.upstream]\nendpoints = [\"{upstream}\"]\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[access_log]\nformat = \"json\"\noutput = \"{}\"\n\n{extra}\n",
        log.display()
    )
}

/// The pid of every process in a cgroup v2 directory.
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
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

/// One HTTP/1.1 GET on a fresh connection (`Connection: close`); the status, or why none.
pub fn get_once(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {buf:?}"))?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
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

/// A loopback HTTP/1.1 upstream on std threads that answers every request `200 up` and keeps
/// connections alive; it stops accepting when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let h = h.clone();
                        std::thread::spawn(move || serve_upstream(s, &h));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Upstream { addr, hits, stop }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_upstream(s: TcpStream, hits: &AtomicU64) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).is_err() {
                return;
            }
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if h == "connection: close" {
                close = true;
            }
        }
        hits.fetch_add(1, Ordering::Relaxed);
        if r.get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nup")
            .is_err()
            || close
        {
            return;
        }
    }
}
