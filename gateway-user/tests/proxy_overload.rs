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
    process::Command,
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{metrics, value, wait_for},
    config::write_config,
    gateway_bin,
    http::get_once,
    inprocess::gateway,
    process::GatewayProcess,
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

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from 1 with the pid and comm before ')'.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Open descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// `gateway run` with its file descriptor limit (`RLIMIT_NOFILE`) at `nofile`.
fn with_nofile(mut cmd: Command, nofile: u64) -> Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_answers_counts_logs_once_does_not_spin_and_recovers() {
    let up = Upstream::start("up").await;
    let dir = temp_dir("nofile");
    let cfg = write_config(
        &dir,
        &format!(
            "[router.downstream]\nheader_read_timeout_ms = 60000\n[observer]\nmode = \"off\"\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    );
    let mut gw = GatewayProcess::spawn(with_nofile(gateway_bin!().run(&cfg), 128));
    let (addr, admin, pid) = (gw.addr, gw.admin, gw.pid());
    let log = tokio::task::spawn_blocking(move || {
        let at_start = fds(pid);
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
            fds(pid)
        );
        // Still out of descriptors, with connections arriving: no spin.
        let cpu0 = cpu_time(pid);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            let got = exchange(addr, Duration::ZERO);
            if let Ok(got) = got {
                assert!(got.is_empty() || is_overloaded(&got), "{got}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let cpu = cpu_time(pid) - cpu0;
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
    })
    .await;
    let lines = gw.count("accept failed on a client listener");
    eprintln!("accept-error log lines: {lines}");
    log.unwrap();
    assert!(gw.alive(), "the gateway died:\n{}", gw.text());
    assert!(!gw.text().contains("panicked"), "{}", gw.text());
    // At most one line per listener per 10 s (two workers share a listener's limit).
    assert!((1..=2).contains(&lines), "{lines} lines:\n{}", gw.text());
}
