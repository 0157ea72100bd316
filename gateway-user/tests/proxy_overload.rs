//! The gateway's own overload (issue 12): `max_client_connections` and
//! `max_accepts_per_second` answer beyond them at once (503 `overloaded`, `Connection: close`)
//! and count it; out of file descriptors it answers on its reserve descriptor, counts and
//! logs (rate-limited), does not spin, and recovers; and the memory an idle keep-alive and a
//! slow-loris client connection cost, and that it comes back after they close.
//!
//! The memory test measures `OVERLOAD_CONNECTIONS` connections of each kind (default 2,000;
//! `cargo xtask overload` runs it with 10,000 and prints the figures of the README).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{metrics, value, wait_for},
    config::write_config,
    gateway_bin,
    http::get_once,
    inprocess::gateway,
    process::{GatewayProcess, with_nofile},
    tempdir::temp_dir,
    upstream::Upstream,
};

/// How long any answer may take: far longer than an answer takes, far shorter than a stall
/// (a SYN-ACK timeout or the header-read timeout).
const ANSWER: Duration = Duration::from_secs(3);

/// Connects, sends a GET (after `delay`), and reads until the gateway closes.
fn exchange(addr: SocketAddr, delay: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, ANSWER).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(ANSWER)).unwrap();
    std::thread::sleep(delay);
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(e) => Err(format!(
            "read: {e} after {:?}",
            String::from_utf8_lossy(&out)
        )),
    }
}

/// A connection that sends nothing: it holds a place until dropped.
fn idle(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, ANSWER).expect("connect")
}

fn is_overloaded(answer: &str) -> bool {
    answer.starts_with("HTTP/1.1 503 ")
        && answer.contains("x-gateway-error: overloaded")
        && answer.contains("connection: close")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_client_connections_is_503_overloaded_and_counted() {
    let up = Upstream::start("up").await;
    let gw = gateway(
        "max-conns",
        &format!(
            "[router.downstream]\nmax_client_connections = 3\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await;
    let (addr, admin) = (gw.addr, gw.handle.admin_addr().unwrap());
    tokio::task::spawn_blocking(move || {
        let held: Vec<TcpStream> = (0..3).map(|_| idle(addr)).collect();
        wait_for("3 client connections open", || {
            let m = metrics(admin);
            (value(&m, "gateway_client_connections", &[]) == 3.0)
                .then_some(())
                .ok_or(m)
        });
        // At once, and with the request sent late: the answer is still read whole (the
        // rejected connection lingers instead of resetting it away).
        for delay in [Duration::ZERO, Duration::from_millis(200)] {
            let start = Instant::now();
            let got = exchange(addr, delay).expect("an answer, not a stall");
            assert!(is_overloaded(&got), "{got}");
            assert!(got.contains("max_client_connections"), "{got}");
            assert!(start.elapsed() < ANSWER, "{:?}", start.elapsed());
        }
        let m = metrics(admin);
        let listener = addr.to_string();
        let rejected = value(
            &m,
            "gateway_client_connections_rejected_total",
            &[("listener", &listener), ("reason", "max_connections")],
        );
        assert_eq!(rejected, 2.0, "{m}");
        // A place freed is a connection served.
        drop(held);
        wait_for("a request served once the connections closed", || {
            let got = exchange(addr, Duration::ZERO)?;
            got.starts_with("HTTP/1.1 200").then_some(()).ok_or(got)
        });
    })
    .await
    .unwrap();
    assert!(up.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_accept_rate_is_503_overloaded_and_counted() {
    let up = Upstream::start("up").await;
    let gw = gateway(
        "accept-rate",
        &format!(
            "[router.downstream]\nmax_accepts_per_second = 5\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await;
    let (addr, admin) = (gw.addr, gw.handle.admin_addr().unwrap());
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let answers: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..30)
                .map(|_| s.spawn(move || exchange(addr, Duration::ZERO)))
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap().expect("an answer, not a stall"))
                .collect()
        });
        let elapsed = start.elapsed();
        let ok = answers
            .iter()
            .filter(|a| a.starts_with("HTTP/1.1 200"))
            .count();
        let overloaded = answers.iter().filter(|a| is_overloaded(a)).count();
        eprintln!("30 connections in {elapsed:?}: {ok} served, {overloaded} answered 503");
        assert_eq!(ok + overloaded, 30, "{answers:#?}");
        // A burst of one second's worth, plus what refills while they are served.
        let allowed = 5 + (elapsed.as_secs_f64() * 5.0).ceil() as usize;
        assert!(ok >= 5 && ok <= allowed, "{ok} served, at most {allowed}");
        let m = metrics(admin);
        let listener = addr.to_string();
        let rejected = value(
            &m,
            "gateway_client_connections_rejected_total",
            &[("listener", &listener), ("reason", "accept_rate")],
        );
        assert_eq!(rejected as usize, overloaded, "{m}");
        assert!(answers.iter().any(|a| a.contains("max_accepts_per_second")));
    })
    .await
    .unwrap();
}

/// The gateway's `RLIMIT_NOFILE` in [`out_of_file_descriptors_answers_counts_logs_once_does_not_spin_and_recovers`].
const NOFILE: usize = 128;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_answers_counts_logs_once_does_not_spin_and_recovers() {
    out_of_descriptors(false).await;
}

/// The same with both accept loops started without their reserve descriptor (a debug build's
/// failpoint), as when the descriptor a swap freed went to another of the process's
/// allocations: each takes one back at its next accepted connection
/// (`ListenerGate::restock`), and so answers the connections beyond the descriptors. Without
/// that, they waited unanswered in the accept queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_loop_that_lost_its_reserve_takes_one_back() {
    out_of_descriptors(true).await;
}

/// The out-of-descriptors test; `lost`: the accept loops start without a reserve.
async fn out_of_descriptors(lost: bool) {
    let up = Upstream::start("up").await;
    let dir = temp_dir("nofile");
    let cfg = write_config(
        &dir,
        &format!(
            "[router.downstream]\nheader_read_timeout_ms = 60000\n[observer]\nmode = \"off\"\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    );
    let mut cmd = with_nofile(gateway_bin!().run(&cfg), NOFILE as u64);
    if lost {
        cmd.env("GATEWAY_DEBUG_NO_RESERVE", "1");
    }
    let mut gw = GatewayProcess::spawn(cmd);
    let (addr, admin) = (gw.addr, gw.admin);
    let log = std::thread::scope(|scope| {
        scope.spawn(|| {
        let gw = &gw;
        let at_start = gw.open_fds();
        // Hold connections until the gateway has no descriptor left: the ones beyond get an
        // answer (or at least a close), never a stall.
        let mut held = Vec::new();
        let mut refused = 0;
        while held.len() < 400 && refused < 20 {
            let batch: Vec<TcpStream> = (0..16).map(|_| idle(addr)).collect();
            // Long enough for the gateway to accept them and answer the ones it cannot serve.
            std::thread::sleep(Duration::from_millis(300));
            for mut s in batch {
                s.set_nonblocking(true).unwrap();
                let mut buf = [0u8; 512];
                match s.read(&mut buf) {
                    // Answered (503, fd_exhausted) or closed: out of descriptors.
                    Ok(n) => {
                        let got = String::from_utf8_lossy(&buf[..n]).into_owned();
                        assert!(n == 0 || is_overloaded(&got), "{got}");
                        refused += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => held.push(s),
                    Err(e) => panic!("a held connection failed: {e}"),
                }
            }
        }
        assert!(
            refused >= 20,
            "{} connections held and none beyond them answered or closed: the gateway never ran \
             out of descriptors, or left the connections beyond waiting (fds at start: {at_start})",
            held.len()
        );
        eprintln!(
            "out of descriptors with {} client connections held (gateway fds at start: \
             {at_start}, now {})",
            held.len(),
            gw.open_fds()
        );
        // Every connection beyond the descriptors left was answered, on either worker's
        // listener: each swaps its reserve for a connection without another accept taking
        // the descriptor freed. Without that, a reserve was lost in 5 runs of 8 and the
        // connections of its listener waited (106 to 136 held, or 407 in the run where both
        // were lost). The slack: the count of descriptors at start is read from outside.
        let room = NOFILE - at_start;
        // Each was looked at once, 300 ms after its batch: one answered later (the gateway
        // had no CPU meanwhile) is no longer held.
        let late = Instant::now() + Duration::from_secs(2);
        while held.len() > room + 3 && Instant::now() < late {
            let mut buf = [0u8; 512];
            held.retain_mut(|s| {
                matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            held.len() <= room + 3,
            "{} connections held with {room} descriptors left at start: those beyond waited \
             unanswered",
            held.len()
        );
        // Still out of descriptors, with connections arriving: no spin.
        let cpu0 = gw.cpu_time();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            let got = exchange(addr, Duration::ZERO);
            if let Ok(got) = got {
                assert!(got.is_empty() || is_overloaded(&got), "{got}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let cpu = gw.cpu_time() - cpu0;
        let share = cpu.as_secs_f64() / t0.elapsed().as_secs_f64();
        eprintln!("CPU while out of descriptors: {:.1} % of one core", share * 100.0);
        assert!(share < 0.3, "{:.0} % of a core: spinning", share * 100.0);
        // Descriptors free again: served, and the errors were counted.
        drop(held);
        wait_for("a request served once descriptors are free", || {
            let got = exchange(addr, Duration::ZERO)?;
            got.starts_with("HTTP/1.1 200").then_some(()).ok_or(got)
        });
        let m = metrics(admin);
        let listener = addr.to_string();
        let emfile = value(
            &m,
            "gateway_accept_errors_total",
            &[("listener", &listener), ("errno", "EMFILE")],
        );
        let answered = value(
            &m,
            "gateway_client_connections_rejected_total",
            &[("listener", &listener), ("reason", "fd_exhausted")],
        );
        eprintln!("EMFILE counted {emfile}, answered on the reserve descriptor {answered}");
        assert!(emfile >= 20.0, "{m}");
        assert!(answered >= 20.0, "{m}");
        assert!(get_once(admin, "/healthz", ANSWER).is_ok());
    }).join()
    });
    let lines = gw.count("accept failed on a client listener");
    eprintln!("accept-error log lines: {lines}");
    if let Err(p) = log {
        std::panic::resume_unwind(p);
    }
    assert!(gw.alive(), "the gateway died:\n{}", gw.text());
    assert!(!gw.text().contains("panicked"), "{}", gw.text());
    // At most one line per listener per 10 s (two workers share a listener's limit).
    assert!((1..=2).contains(&lines), "{lines} lines:\n{}", gw.text());
}

/// Connections of each kind the memory test holds (`OVERLOAD_CONNECTIONS`, default 2,000).
fn memory_connections() -> usize {
    std::env::var("OVERLOAD_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// How long the memory test waits for RSS to come back (`OVERLOAD_BACK_S`, default 60 s;
/// the goal is 10 minutes).
fn back_limit() -> Duration {
    Duration::from_secs(
        std::env::var("OVERLOAD_BACK_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    )
}

/// Issue 12's goal for an idle keep-alive client connection: 4 KiB. Met by parking idle
/// connections in the worker's lot (`proxy::server::lot`): about 2.6 KiB in this test's debug
/// build at 2,000 connections, where hyper's buffers kept while idle made it 21 KiB.
const IDLE_BOUND_BYTES: f64 = 4.0 * 1024.0;

/// A client that sent half a head is inside hyper, with its buffers (about 20 KiB); no goal
/// for it beyond measuring it, this bound catches a regression.
const LORIS_BOUND_BYTES: f64 = 24.0 * 1024.0;

/// Waits until the gateway's `gateway_client_connections` is `n`.
fn wait_open(admin: SocketAddr, n: usize) {
    wait_for(&format!("{n} client connections open"), || {
        let m = metrics(admin);
        (value(&m, "gateway_client_connections", &[]) == n as f64)
            .then_some(())
            .ok_or(m)
    });
}

/// Waits until the gateway's `gateway_client_connections_parked` is `n`.
fn wait_parked(admin: SocketAddr, n: usize) {
    wait_for(&format!("{n} client connections parked"), || {
        let m = metrics(admin);
        (value(&m, "gateway_client_connections_parked", &[]) == n as f64)
            .then_some(())
            .ok_or(m)
    });
}

/// Waits until RSS stops moving (two samples 250 ms apart within 1 %), and returns it.
fn settled_rss(gw: &GatewayProcess) -> u64 {
    let mut last = gw.rss_kib();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = gw.rss_kib();
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
}

/// Waits (up to `limit`) until RSS is within 20 % of `before`; how long that took.
fn memory_back(gw: &GatewayProcess, before: u64, limit: Duration) -> Result<Duration, u64> {
    let start = Instant::now();
    loop {
        let now = gw.rss_kib();
        if now * 100 <= before * 120 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens `n` connections from `threads` threads, each set up by `open`.
fn open_many(
    addr: SocketAddr,
    n: usize,
    open: impl Fn(SocketAddr) -> TcpStream + Sync,
) -> Vec<TcpStream> {
    let threads = 8;
    std::thread::scope(|s| {
        let open = &open;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (0..n)
                        .filter(|i| i % threads == t)
                        .map(|_| open(addr))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// One keep-alive request, its response read whole; the connection stays open.
fn keepalive(addr: SocketAddr) -> TcpStream {
    let mut s = idle(addr);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).expect("a response");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if body.len() >= len {
                return s;
            }
        }
    }
}

/// Half a request head, and nothing more.
fn slow_loris(addr: SocketAddr) -> TcpStream {
    let mut s = idle(addr);
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nuser-agent: loris\r\nx-wait: ")
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_idle_and_slow_loris_connection_and_it_comes_back() {
    let n = memory_connections();
    gateway_testkit::process::raise_own_nofile(n as u64 + 2048);
    let up = Upstream::start("up").await;
    let dir = temp_dir("conn-memory");
    let cfg = write_config(
        &dir,
        &format!(
            "[router.downstream]\nheader_read_timeout_ms = 600000\n\
             [observer]\nmode = \"off\"\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    );
    let gw = GatewayProcess::spawn(with_nofile(gateway_bin!().run(&cfg), n as u64 + 2048));
    let (addr, admin) = (gw.addr, gw.admin);
    let report = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Warm up: every worker has served and parked connections and seen them close
                // while parked, the upstream pool is filled (the code of each path is in memory
                // before the base is taken: RSS counts the binary's pages too).
                let warm = open_many(addr, 64, keepalive);
                wait_parked(admin, 64);
                drop(warm);
                wait_open(admin, 0);
                let base = settled_rss(&gw);

                let t = Instant::now();
                let held = open_many(addr, n, keepalive);
                wait_open(admin, n);
                // Idle connections are parked within 2 s, and the buffers they gave back are
                // returned to the system within the next second (`proxy::memory`).
                wait_parked(admin, n);
                std::thread::sleep(Duration::from_millis(1500));
                let idle_rss = settled_rss(&gw);
                let opened = t.elapsed();
                eprintln!("idle: RSS {base} -> {idle_rss} KiB with {n} connections");
                drop(held);
                wait_open(admin, 0);
                let idle_back = memory_back(&gw, base, back_limit());
                eprintln!("idle: closed; {idle_back:?} (RSS now {} KiB)", gw.rss_kib());

                let base2 = settled_rss(&gw);
                let held = open_many(addr, n, slow_loris);
                wait_open(admin, n);
                let loris_rss = settled_rss(&gw);
                eprintln!("slow-loris: RSS {base2} -> {loris_rss} KiB with {n} connections");
                drop(held);
                wait_open(admin, 0);
                let loris_back = memory_back(&gw, base2, back_limit());

                let per = |rss: u64, base: u64| (rss.saturating_sub(base) * 1024) as f64 / n as f64;
                let idle_per = per(idle_rss, base);
                let loris_per = per(loris_rss, base2);
                let fmt_back = |r: &Result<Duration, u64>| match r {
                    Ok(d) => format!("back within 20 % in {:.1} s", d.as_secs_f64()),
                    Err(rss) => format!("NOT back: {rss} KiB after {:?}", back_limit()),
                };
                let report = format!(
                    "connection memory, {n} connections of each kind (opened in {opened:.1?}):\n\
                     idle keep-alive: RSS {base} -> {idle_rss} KiB, {idle_per:.0} bytes per connection; {}\n\
                     slow-loris (half a header): RSS {base2} -> {loris_rss} KiB, {loris_per:.0} bytes per connection; {}",
                    fmt_back(&idle_back),
                    fmt_back(&loris_back),
                );
                eprintln!("{report}");
                assert!(idle_back.is_ok() && loris_back.is_ok(), "{report}");
                assert!(idle_per <= IDLE_BOUND_BYTES, "{report}");
                assert!(loris_per <= LORIS_BOUND_BYTES, "{report}");
                report
            })
            .join()
    });
    match report {
        Ok(r) => {
            let _ = std::fs::write(dir.join("memory-report.txt"), r);
        }
        Err(p) => std::panic::resume_unwind(p),
    }
}
