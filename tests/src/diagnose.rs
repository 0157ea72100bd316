//! `gateway diagnose` as its tests run it: the built binary inside a lab's client namespace,
//! on the host's loopback, or with a resolver of the test's own; its JSON contract checked,
//! and that it left no cgroup behind. Plus the lab servers some verdicts need: a listener
//! that accepts slowly (`overloaded`) and a DNS server that answers late.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, ExitStatus},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use gateway_lab::{Lab, LabSpec, NetnsCommandExt, Upstream};
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

use crate::{bins::GatewayBin, root::require_root};

/// The lab of the diagnose tests: one upstream and no client cgroup (diagnose makes its own).
/// Requires root.
pub fn diagnose_lab() -> Lab {
    require_root();
    Lab::new(LabSpec {
        upstreams: 1,
        client_cgroup: false,
    })
    .expect("building the fault lab")
}

/// One finished `gateway diagnose` run.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub pid: u32,
}

impl Run {
    /// The JSON objects on stdout, one per target.
    pub fn reports(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("not a JSON line: {l}: {e}\nstderr: {}", self.stderr)
                })
            })
            .collect()
    }

    /// The only report.
    pub fn report(&self) -> Value {
        let mut r = self.reports();
        assert_eq!(r.len(), 1, "one target, one object: {}", self.stdout);
        r.remove(0)
    }
}

/// Runs `gateway diagnose ARGS` in `cmd`'s context, waits, and checks it cleaned up its cgroup.
pub fn run(mut cmd: Command) -> Run {
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting gateway diagnose");
    let pid = child.id();
    let out = child
        .wait_with_output()
        .expect("waiting for gateway diagnose");
    let run = Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
        pid,
    };
    assert_no_cgroup_left(pid);
    run
}

/// `gateway diagnose ARGS` inside the lab's client namespace (no route out of it: DNS queries
/// for unknown names die there).
pub fn diagnose_in(bin: GatewayBin, lab: &Lab, args: &[&str]) -> Run {
    let mut cmd = bin.command();
    cmd.arg("diagnose").args(args).in_netns(lab.client());
    run(cmd)
}

/// `gateway diagnose ARGS` on the host (loopback targets only).
pub fn diagnose_here(bin: GatewayBin, args: &[&str]) -> Run {
    let mut cmd = bin.command();
    cmd.arg("diagnose").args(args);
    run(cmd)
}

/// The cgroup `diagnose` made for itself (`gateway-diagnose-<pid>` under the v2 mount) is gone.
pub fn assert_no_cgroup_left(pid: u32) {
    let mount = gateway_lab::cgroup2_mount().expect("cgroup v2 is mounted");
    let dir = mount.join(format!("gateway-diagnose-{pid}"));
    assert!(
        !dir.exists(),
        "diagnose left its cgroup {} behind",
        dir.display()
    );
}

/// Asserts the top verdict and that the rest of the contract is there; prints a summary line
/// (run with --nocapture to see it) and returns the report.
pub fn assert_verdict(run: &Run, want: &str) -> Value {
    let r = run.report();
    check_report(run, &r, want);
    r
}

/// [`assert_verdict`] for one of several reports of a run.
pub fn check_report(run: &Run, r: &Value, want: &str) {
    let pretty = serde_json::to_string_pretty(&r).unwrap();
    assert_eq!(
        r["verdict"], want,
        "top verdict; stderr: {}\n{pretty}",
        run.stderr
    );
    let confidence = r["confidence"].as_f64().expect("confidence is a number");
    assert!((0.0..=1.0).contains(&confidence), "{pretty}");
    assert!(
        r["evidence"].as_array().is_some_and(|e| !e.is_empty()),
        "evidence lines: {pretty}"
    );
    assert!(r["next_steps"].is_array(), "{pretty}");
    assert!(r["measurements"].is_object(), "{pretty}");
    assert!(r["alternatives"].is_array(), "{pretty}");
    assert_eq!(
        run.status.success(),
        want == "healthy",
        "exit code 0 only when healthy: {:?}",
        run.status
    );
    eprintln!(
        "diagnose verdict {want} confidence {confidence:.2} in {:.2} s; evidence: {}",
        run.elapsed.as_secs_f64(),
        r["evidence"][0]
    );
}

/// Every attempt of every address was joined to its kernel record.
pub fn assert_kernel_joined(r: &Value) {
    let m = &r["measurements"];
    assert_eq!(m["kernel_signals"], true, "{m:#}");
    for a in m["addresses"].as_array().unwrap() {
        for at in a["attempts"].as_array().unwrap() {
            assert_eq!(
                at["source"], "kernel",
                "attempt without a kernel record: {at:#}"
            );
            assert_ne!(at["cookie"], 0, "{at:#}");
        }
    }
}

/// The attempts at the first address.
pub fn attempts(r: &Value) -> Vec<Value> {
    r["measurements"]["addresses"][0]["attempts"]
        .as_array()
        .expect("attempts")
        .clone()
}

/// A listener with a one-connection accept queue, kept full, that accepts (and closes) one
/// connection `delay` after each time the kernel dropped a SYN for the full queue
/// (`TcpExtListenOverflows` grows). So every client's first SYN is dropped and a later
/// retransmit is answered: an upstream that cannot keep up with its accept queue.
pub struct SlowAcceptor {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl SlowAcceptor {
    pub fn start(upstream: &Upstream, port: u16, delay: Duration) -> SlowAcceptor {
        let addr = upstream.addr_v4(port);
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (s, a) = (stop.clone(), accepted.clone());
        let handle = upstream
            .netns()
            .spawn_thread("slow-acceptor", move || {
                slow_accept(addr, delay, &s, &a, ready_tx)
            })
            .expect("starting the slow acceptor");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the slow acceptor is listening with a full queue");
        SlowAcceptor {
            stop,
            accepted,
            handle: Some(handle),
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for SlowAcceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if n == "ListenOverflows" {
                return v.parse().unwrap_or(0);
            }
        }
    }
    0
}

fn slow_accept(
    addr: SocketAddr,
    delay: Duration,
    stop: &AtomicBool,
    accepted: &AtomicU64,
    ready: std::sync::mpsc::SyncSender<()>,
) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    // Backlog 0: the accept queue holds one connection.
    socket.listen(0).unwrap();
    let listener: TcpListener = socket.into();
    listener.set_nonblocking(true).unwrap();
    // Fill the queue from inside the namespace.
    let _filler = TcpStream::connect(addr).unwrap();
    let _ = ready.send(());
    let mut seen = listen_overflows();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
        let now = listen_overflows();
        if now == seen {
            continue;
        }
        // A SYN was dropped: make room for one, a while later.
        let until = Instant::now() + delay;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        match listener.accept() {
            Ok((conn, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                drop(conn);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("slow acceptor: accept failed: {e}"),
        }
        seen = listen_overflows();
    }
}

/// A DNS server in an upstream namespace (UDP port 53 on its IPv4 address) that answers every
/// A query with `answer` and every other query with no records, each `delay` late: a resolver
/// that works, slowly.
pub struct SlowDns {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl SlowDns {
    pub fn start(upstream: &Upstream, answer: std::net::Ipv4Addr, delay: Duration) -> SlowDns {
        let addr = SocketAddr::new(upstream.ipv4().into(), 53);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let s = stop.clone();
        let handle = upstream
            .netns()
            .spawn_thread("slow-dns", move || {
                let sock = std::net::UdpSocket::bind(addr).expect("binding the lab DNS server");
                sock.set_read_timeout(Some(Duration::from_millis(10)))
                    .unwrap();
                let _ = ready_tx.send(());
                serve_dns(&sock, answer, delay, &s);
            })
            .expect("starting the lab DNS server");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the lab DNS server is listening");
        SlowDns {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for SlowDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve_dns(
    sock: &std::net::UdpSocket,
    answer: std::net::Ipv4Addr,
    delay: Duration,
    stop: &AtomicBool,
) {
    let mut pending: Vec<(Instant, Vec<u8>, SocketAddr)> = Vec::new();
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        pending.retain(|(due, reply, to)| {
            if *due > now {
                return true;
            }
            let _ = sock.send_to(reply, to);
            false
        });
        if let Ok((n, from)) = sock.recv_from(&mut buf)
            && let Some(reply) = dns_reply(&buf[..n], answer)
        {
            pending.push((Instant::now() + delay, reply, from));
        }
    }
}

/// A NOERROR reply to the query in `q`: one A record for A queries, none otherwise.
fn dns_reply(q: &[u8], answer: std::net::Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + usize::from(q[i]);
    }
    let question_end = i + 5;
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    q.get(question_end - 1)?;
    let is_a = qtype == 1;
    let mut r = Vec::with_capacity(question_end + 16);
    r.extend_from_slice(&q[..2]); // id
    r.extend_from_slice(&[0x81, 0x80]); // response, recursion desired + available, NOERROR
    r.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    if is_a {
        // Name = pointer to the question, type A, class IN, TTL 60, 4 bytes.
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&answer.octets());
    }
    Some(r)
}

/// `gateway diagnose ARGS` in the lab's client namespace and in a private mount namespace
/// whose /etc/resolv.conf names only `nameserver` (the host's own file is untouched).
pub fn diagnose_with_resolver(
    bin: GatewayBin,
    lab: &Lab,
    nameserver: std::net::IpAddr,
    args: &[&str],
) -> Run {
    let conf = std::env::temp_dir().join(format!(
        "gateway-diagnose-test-{}-resolv.conf",
        std::process::id()
    ));
    std::fs::write(
        &conf,
        format!("nameserver {nameserver}\noptions timeout:3 attempts:1\n"),
    )
    .unwrap();
    let mut script = format!(
        "set -e; mount --bind '{}' /etc/resolv.conf; exec '{}' diagnose",
        conf.display(),
        bin.path().display()
    );
    for a in args {
        script.push_str(&format!(" '{a}'"));
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .in_netns(lab.client());
    let run = run(cmd);
    let _ = std::fs::remove_file(&conf);
    run
}
