//! Privileged (root: cgroups, eBPF): `kill -9` of `gateway run` and of `gateway observe` while
//! they carry load, then a restart. Checks what an operator relies on after a crash:
//!
//! - nothing the dead process attached stays attached: every program id bpftool saw on its
//!   cgroup (or, for `observe`, every `gw_*` program it loaded) is gone from the kernel;
//! - the dead gateway's cgroup (`gateway-{pid}`), left behind by SIGKILL, is removed by the
//!   next gateway at start;
//! - the new process serves within 1 s of being started: `gateway run` answers a proxied
//!   request on the same port, `observe` reports a connect made after its start. The time is
//!   printed (`restart: ... ms`).
//!
//! Traffic is loopback only. Each test panics without root rather than skip, and its guards
//! kill the processes and remove the cgroups it saw even when it fails.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gateway_testkit::{config::base_config, tempdir::temp_dir, upstream::Upstream};

/// What a restart may take, spawn to first served request (the bound).
const RESTART_LIMIT: Duration = Duration::from_secs(1);

fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{test} needs root (cgroups, eBPF); run it through ./dev test"
    );
}

/// Kills the child on drop (SIGKILL), and waits for it.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes cgroup directories on drop (those a failed test may leave).
struct CgroupCleanup(Vec<PathBuf>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// A port on 127.0.0.1 that is free now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .min_by_key(|p| p.as_os_str().len())
        .expect("cgroup v2 is mounted")
}

/// The cgroup v2 directory of `pid`.
fn cgroup_of(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .trim_start_matches('/');
    cgroup2_mount().join(rel)
}

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (./dev setup installs it)");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Ids of the programs attached to `cgroup`.
fn attached_to(cgroup: &Path) -> Vec<u64> {
    bpftool_json(&["cgroup", "show", cgroup.to_str().unwrap()])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Ids of every loaded `gw_*` program.
fn gateway_programs() -> Vec<u64> {
    bpftool_json(&["prog", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("gw_")))
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Waits (RCU frees programs after their last fd closes) until none of `ids` is loaded.
fn wait_unloaded(ids: &[u64]) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let loaded: Vec<u64> = bpftool_json(&["prog", "show"])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["id"].as_u64())
            .filter(|id| ids.contains(id))
            .collect();
        if loaded.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "programs {loaded:?} of the killed process are still loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_gateway(config: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the gateway"),
    )
}

/// One `GET /` through the gateway; the status code, or `None` if it did not answer.
fn get(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: restart.test\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Polls until the gateway at `addr` proxies a request with 200; how long that took since
/// `since`.
fn wait_serving(addr: SocketAddr, since: Instant, limit: Duration) -> Duration {
    loop {
        if get(addr) == Some(200) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "the gateway at {addr} did not serve within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Client threads sending requests in a loop until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok) = (stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if get(addr) == Some(200) {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    fn wait_for(&self, n: u64) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.ok.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < end, "the load never got {n} answers");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn privileged_kill_9_of_gateway_run_under_load_then_restart() {
    require_root("privileged_kill_9_of_gateway_run_under_load_then_restart");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let upstream = rt.block_on(Upstream::start("up"));
    let dir = temp_dir("crash-restart");
    let port = free_port();
    let config = dir.join("gateway.toml");
    // The client port is fixed, so that the restarted gateway serves where the old one did.
    let text = base_config(&dir.join("access.log")).replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:{port}\"]"),
    ) + &format!(
        "\n[observer]\nmode = \"kernel\"\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"up\"\n\n[clusters.up]\nendpoints = [\"{}\"]\n",
        upstream.addr
    );
    std::fs::write(&config, text).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let first = spawn_gateway(&config);
    let first_pid = first.0.id();
    wait_serving(addr, Instant::now(), Duration::from_secs(20));
    let old_cgroup = cgroup_of(first_pid);
    let mut cleanup = CgroupCleanup(vec![old_cgroup.clone()]);
    assert!(
        old_cgroup
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with(&format!("-{first_pid}")),
        "the gateway runs in its own cgroup: {}",
        old_cgroup.display()
    );
    let progs = attached_to(&old_cgroup);
    assert!(
        progs.len() >= 4,
        "sock_ops, getsockopt, connect4 and connect6 are attached to {}: {progs:?}",
        old_cgroup.display()
    );

    let load = Load::start(addr, 4);
    load.wait_for(200);
    let mut first = first;
    // SIGKILL: no handler runs, nothing is cleaned up by the process.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(load);

    assert!(
        attached_to(&old_cgroup).is_empty(),
        "nothing stays attached to the dead gateway's cgroup"
    );
    wait_unloaded(&progs);
    assert!(
        old_cgroup.exists(),
        "SIGKILL leaves the cgroup directory behind (what the restart must clean up)"
    );

    let started = Instant::now();
    let second = spawn_gateway(&config);
    let took = wait_serving(addr, started, Duration::from_secs(10));
    eprintln!(
        "restart: gateway run served a proxied request {} ms after it was started (kill -9 under load before)",
        took.as_millis()
    );
    let new_cgroup = cgroup_of(second.0.id());
    cleanup.0.push(new_cgroup.clone());
    assert!(
        !old_cgroup.exists(),
        "the new gateway removed the dead one's cgroup {}",
        old_cgroup.display()
    );
    assert!(
        attached_to(&new_cgroup).len() >= 4,
        "the new gateway attached its programs"
    );
    assert!(
        took < RESTART_LIMIT,
        "the restarted gateway took {took:?} to serve (limit {RESTART_LIMIT:?})"
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gateway observe --json`, with its stdout lines on a channel.
fn spawn_observe() -> (Proc, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["observe", "--json"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning gateway observe");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Proc(child), rx)
}

/// Connects to `port` on 127.0.0.1 (nothing listens: refused) every few ms until the observer
/// reports one of them; how long that took since `since`.
fn wait_observed(
    rx: &std::sync::mpsc::Receiver<String>,
    port: u16,
    since: Instant,
    limit: Duration,
) -> Duration {
    let needle = format!("\"dst\":\"127.0.0.1:{port}\"");
    loop {
        let _ = TcpStream::connect(("127.0.0.1", port));
        while let Ok(line) = rx.try_recv() {
            if line.contains(&needle) {
                return since.elapsed();
            }
        }
        assert!(
            since.elapsed() < limit,
            "gateway observe reported no connect to port {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn privileged_kill_9_of_observe_under_load_then_restart() {
    require_root("privileged_kill_9_of_observe_under_load_then_restart");
    let before: Vec<u64> = gateway_programs();
    let port = free_port();
    let (mut first, rx) = spawn_observe();
    wait_observed(&rx, port, Instant::now(), Duration::from_secs(20));
    let ours: Vec<u64> = gateway_programs()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    // connect4/6, sock_ops, getsockopt (and a connect-return tracepoint before Linux 6.12).
    assert!(ours.len() >= 4, "observe loaded its programs: {ours:?}");

    // Load: connects from several threads while it is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let storm: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = TcpStream::connect(("127.0.0.1", port));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in storm {
        t.join().unwrap();
    }
    wait_unloaded(&ours);

    let started = Instant::now();
    let (second, rx) = spawn_observe();
    let took = wait_observed(&rx, port, started, Duration::from_secs(10));
    eprintln!(
        "restart: gateway observe reported a new connect {} ms after it was started (kill -9 under load before)",
        took.as_millis()
    );
    assert!(
        took < RESTART_LIMIT,
        "the restarted observer took {took:?} to report (limit {RESTART_LIMIT:?})"
    );
    drop(second);
}
