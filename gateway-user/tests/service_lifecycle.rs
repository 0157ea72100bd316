//! `gateway run` as a service manager and a load balancer see it, through the built binary:
//! the drain on SIGTERM (`/healthz` 503 at once, still serving for `drain_delay_ms`, then not
//! listening), SIGUSR1 and SIGHUP reopening the access log, reloads, `gateway reload`, and the
//! `sd_notify` messages on a socket of the test's own, as systemd would receive them. The
//! kernel observer is off here (these are about the process, not the kernel); the privileged
//! `service_*_privileged` tests run with it.

use std::{
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gateway_testkit::{
    config, gateway_bin, http::get_once, ports::free_port, process::GatewayProcess,
    tempdir::TempDir, upstream::BlockingUpstream as Upstream,
};

struct Gateway {
    proc: GatewayProcess,
    listen: SocketAddr,
    admin: SocketAddr,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: TempDir,
}

fn start(label: &str, upstream: SocketAddr, router_extra: &str, env: &[(&str, &str)]) -> Gateway {
    let dir = TempDir::new(label);
    let (listen, admin) = (free_port(), free_port());
    let log = dir.path().join("access.log");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config::with_ports(
            listen,
            admin,
            upstream,
            &log,
            router_extra,
            "[observer]\nmode = \"off\"",
        ),
    )
    .unwrap();
    let mut cmd = gateway_bin!().run(&config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc = GatewayProcess::spawn(cmd);
    Gateway {
        proc,
        listen: SocketAddr::from(([127, 0, 0, 1], listen)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        config,
        log,
        _dir: dir,
    }
}

fn status(addr: SocketAddr, path: &str) -> u16 {
    get_once(addr, path, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
        .0
}

/// Sends one keep-alive request and returns the response head.
fn response_head(addr: SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    text.split("\r\n\r\n").next().unwrap_or("").to_owned()
}

#[test]
fn sigterm_keeps_serving_for_the_drain_delay_while_health_says_503() {
    // A delay long enough for each step below to be told from the next on a loaded machine.
    const DELAY: Duration = Duration::from_millis(4000);
    let up = Upstream::start();
    let mut gw = start(
        "drain",
        up.addr,
        &format!(
            "drain_delay_ms = {}\nshutdown_grace_ms = 3000",
            DELAY.as_millis()
        ),
        &[],
    );
    assert_eq!(status(gw.admin, "/healthz"), 200);
    assert!(!response_head(gw.listen).contains("connection: close"));

    let t0 = Instant::now();
    gw.proc.signal(libc::SIGTERM);
    gw.proc.expect_log("draining", Duration::from_secs(2));
    // At once: health checks fail, so load balancers start deregistering the host.
    assert_eq!(status(gw.admin, "/healthz"), 503);
    assert_eq!(status(gw.admin, "/readyz"), 503);
    let at = t0.elapsed();
    assert!(at < DELAY / 2, "503 only after {at:?}");
    // Meanwhile new connections are still accepted and served, and keep-alive ends after each
    // response, so clients come back through the load balancer.
    assert_eq!(status(gw.listen, "/"), 200);
    assert!(response_head(gw.listen).contains("connection: close"));
    std::thread::sleep(Duration::from_millis(1000).saturating_sub(t0.elapsed()));
    assert_eq!(
        status(gw.listen, "/late"),
        200,
        "still serving 1 s into a 4 s delay"
    );
    // Then listening stops: when the delay is over, not before, and not long after.
    let stopped = loop {
        let refused =
            std::net::TcpStream::connect_timeout(&gw.listen, Duration::from_millis(500)).is_err();
        let at = t0.elapsed();
        if refused {
            break at;
        }
        assert!(at < DELAY * 3, "still accepting {at:?} after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        stopped >= DELAY && stopped < DELAY + Duration::from_secs(2),
        "stopped accepting {stopped:?} after SIGTERM, the drain delay is {DELAY:?}"
    );
    let exit = gw.proc.wait(Duration::from_secs(5)).expect("exited");
    assert!(exit.success(), "{exit:?}\n{}", gw.proc.text());
    let took = t0.elapsed();
    assert!(
        took >= DELAY,
        "exited after {took:?}, before the delay was over"
    );
    gw.proc
        .expect_log("drained; exiting", Duration::from_secs(1));
}

#[test]
fn a_second_sigterm_cuts_the_drain_delay_short() {
    let up = Upstream::start();
    let mut gw = start("drain-cut", up.addr, "drain_delay_ms = 20000", &[]);
    let t0 = Instant::now();
    gw.proc.signal(libc::SIGTERM);
    gw.proc.expect_log("draining", Duration::from_secs(2));
    assert_eq!(status(gw.listen, "/"), 200, "serving during the delay");
    gw.proc.signal(libc::SIGTERM);
    let exit = gw
        .proc
        .wait(Duration::from_secs(5))
        .expect("exited long before the 20 s delay");
    assert!(exit.success(), "{exit:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    gw.proc
        .expect_log("drain delay cut short", Duration::from_secs(1));
}

/// Waits until `file` contains `needle`.
fn wait_in_file(file: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{needle} not in {}: {text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigusr1_reopens_the_access_log_after_logrotate_moved_it() {
    let up = Upstream::start();
    let mut gw = start("usr1", up.addr, "drain_delay_ms = 0", &[]);
    assert_eq!(status(gw.listen, "/before-rotation"), 200);
    wait_in_file(&gw.log, "/before-rotation");
    let rotated = gw.log.with_extension("log.1");
    std::fs::rename(&gw.log, &rotated).unwrap();

    gw.proc.signal(libc::SIGUSR1);
    gw.proc
        .expect_log("access log reopened", Duration::from_secs(3));
    assert!(
        gw.proc.alive(),
        "SIGUSR1 killed the gateway:\n{}",
        gw.proc.text()
    );
    assert!(gw.log.exists(), "the log was not recreated at its path");
    assert_eq!(status(gw.listen, "/after-rotation"), 200);
    let new = wait_in_file(&gw.log, "/after-rotation");
    assert!(!new.contains("/before-rotation"), "{new}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        old.contains("/before-rotation") && !old.contains("/after-rotation"),
        "the renamed file still receives lines: {old}"
    );
}

#[test]
fn sighup_reloads_the_config_and_reopens_the_access_log() {
    let (a, b) = (Upstream::start(), Upstream::start());
    let mut gw = start("hup", a.addr, "drain_delay_ms = 0", &[]);
    assert_eq!(status(gw.listen, "/one"), 200);
    assert_eq!(
        (
            a.hits.load(std::sync::atomic::Ordering::SeqCst),
            b.hits.load(std::sync::atomic::Ordering::SeqCst)
        ),
        (1, 0)
    );
    wait_in_file(&gw.log, "/one");
    let rotated = gw.log.with_extension("log.1");
    std::fs::rename(&gw.log, &rotated).unwrap();

    // Point the default cluster at upstream b, then SIGHUP.
    let text = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace(&a.addr.to_string(), &b.addr.to_string());
    std::fs::write(&gw.config, text).unwrap();
    gw.proc.signal(libc::SIGHUP);
    gw.proc
        .expect_log("config reloaded", Duration::from_secs(3));
    gw.proc
        .expect_log("access log reopened", Duration::from_secs(3));
    assert_eq!(status(gw.listen, "/two"), 200);
    assert_eq!(
        b.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the reloaded config sends to b"
    );
    wait_in_file(&gw.log, "/two");

    // A config that does not validate is refused; the running one stays.
    std::fs::write(&gw.config, "[router]\nlisten = []\n").unwrap();
    gw.proc.signal(libc::SIGHUP);
    gw.proc.expect_log(
        "reload refused, keeping the running config",
        Duration::from_secs(3),
    );
    assert_eq!(status(gw.listen, "/three"), 200);
    assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(gw.proc.alive());
}

#[test]
fn gateway_reload_validates_before_it_signals() {
    let up = Upstream::start();
    let gw = start("reload-cmd", up.addr, "drain_delay_ms = 0", &[]);
    let pid = gw.proc.pid().to_string();
    let reload = |config: &std::path::Path| {
        gateway_bin!()
            .command()
            .args(["reload", "--pid", &pid, "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let bad = gw.config.with_extension("bad.toml");
    std::fs::write(
        &bad,
        "[router]\nlisten = [\"127.0.0.1:1\"]\nconect_timeout_ms = 1\n",
    )
    .unwrap();
    let out = reload(&bad);
    assert!(!out.status.success(), "a bad config must fail the reload");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml:3"),
        "{out:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        gw.proc.count("config reloaded"),
        0,
        "signalled despite a bad config"
    );

    // A pid that is no gateway is not signalled: 0 (to kill(2), the caller's whole process
    // group), 1 (init), a process running another program.
    let other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    for pid in ["0".to_owned(), "1".to_owned(), other.id().to_string()] {
        let out = gateway_bin!()
            .command()
            .args(["reload", "--pid", &pid, "--config"])
            .arg(&gw.config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "--pid {pid}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!(" {pid} ")),
            "--pid {pid}: {out:?}"
        );
    }
    let mut other = other;
    assert!(other.try_wait().unwrap().is_none(), "sleep was signalled");
    let _ = other.kill();
    let _ = other.wait();

    // A good config, but not the file the gateway runs with (which a SIGHUP makes it read
    // again): refused, naming that file. It said `ok` and the gateway reloaded its own.
    let copy = gw.config.with_extension("copy.toml");
    std::fs::copy(&gw.config, &copy).unwrap();
    let out = reload(&copy);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runs with") && err.contains(&gw.config.display().to_string()),
        "{err}"
    );

    let out = reload(&gw.config);
    assert!(out.status.success(), "{out:?}");
    gw.proc
        .expect_log("config reloaded", Duration::from_secs(3));
    assert_eq!(gw.proc.count("config reloaded"), 1, "signalled once");
}

/// Every datagram sent to the socket, as text.
fn collect(sock: UnixDatagram) -> Arc<Mutex<Vec<String>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => g
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Arc::strong_count(&g) == 1 {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    got
}

fn wait_message(got: &Mutex<Vec<String>>, pred: impl Fn(&str) -> bool, what: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(i) = got.lock().unwrap().iter().position(|m| pred(m)) {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} message; got {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sd_notify_reports_ready_reloading_stopping_status_and_pings_the_watchdog() {
    let up = Upstream::start();
    let dir = TempDir::new("notify");
    let path = dir.path().join("notify.sock");
    let got = collect(UnixDatagram::bind(&path).unwrap());
    let notify = path.to_str().unwrap().to_owned();
    // A 400 ms watchdog: pings every 200 ms.
    let mut gw = start(
        "notify",
        up.addr,
        "drain_delay_ms = 300",
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let ready = wait_message(&got, |m| m.contains("READY=1"), "READY=1");
    let first = got.lock().unwrap()[ready].clone();
    assert!(
        first.contains("STATUS=serving: listening on ")
            && first.contains("kernel signals: userspace-only"),
        "{first}"
    );
    // READY=1 means serving: the listener answers at once.
    assert_eq!(status(gw.listen, "/"), 200);

    let since_ready = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let pings = got
        .lock()
        .unwrap()
        .iter()
        .filter(|m| *m == "WATCHDOG=1\n")
        .count();
    // At most one per 200 ms of however long this thread actually slept (a loaded machine
    // oversleeps), plus those since READY=1 and one either side.
    let most = since_ready.elapsed().as_millis() as usize / 200 + 4;
    assert!(
        (3..=most).contains(&pings),
        "{pings} watchdog pings in {:?} at a 200 ms period",
        since_ready.elapsed()
    );

    gw.proc.signal(libc::SIGHUP);
    let reloading = wait_message(
        &got,
        |m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "RELOADING=1",
    );
    let reloaded = wait_message(
        &got,
        |m| m.contains("READY=1") && m.contains("reloaded"),
        "READY=1 after the reload",
    );
    assert!(reloading < reloaded);

    gw.proc.signal(libc::SIGTERM);
    let stopping = wait_message(&got, |m| m.starts_with("STOPPING=1\n"), "STOPPING=1");
    let msg = got.lock().unwrap()[stopping].clone();
    assert!(msg.contains("STATUS=draining (SIGTERM)"), "{msg}");
    // Drain delay 300 ms + grace 30 s by default + 5 s margin.
    assert!(msg.contains("EXTEND_TIMEOUT_USEC=35300000"), "{msg}");
    wait_message(
        &got,
        |m| m.contains("STATUS=draining: stopped listening"),
        "the STATUS after the delay",
    );
    assert!(
        gw.proc
            .wait(Duration::from_secs(5))
            .expect("exited")
            .success()
    );
}

/// `GATEWAY_UPGRADE_READY_FD` (the gateway's own, for an upgrade's new process) naming no
/// pipe is refused at start with a message that says what it is: before, the process aborted
/// (`IO Safety violation`) or closed one of its own listeners when it wrote "ready" there.
#[test]
fn a_readiness_descriptor_that_is_no_pipe_is_refused_at_start() {
    use std::os::unix::process::CommandExt as _;
    let up = Upstream::start();
    let dir = TempDir::new("ready-fd");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config::with_ports(
            free_port(),
            free_port(),
            up.addr,
            &dir.path().join("access.log"),
            "drain_delay_ms = 0",
            "[observer]\nmode = \"off\"",
        ),
    )
    .unwrap();
    for (value, want) in [
        ("0", "not a descriptor number above 2"),
        ("99", "Bad file descriptor"),
        ("7", "the descriptor is open, but not a pipe"),
    ] {
        let mut cmd = gateway_bin!().run(&config);
        cmd.env("GATEWAY_UPGRADE_READY_FD", value);
        // Descriptor 7: /dev/null, open in the child.
        // SAFETY: open and dup2 are async-signal-safe; nothing else runs before exec.
        unsafe {
            cmd.pre_exec(|| {
                let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                if fd < 0 || libc::dup2(fd, 7) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (status, out) = gateway_testkit::process::run_to_exit(cmd, Duration::from_secs(10));
        assert_eq!(status.code(), Some(1), "{value}: {out}");
        assert!(
            out.contains(&format!(
                "GATEWAY_UPGRADE_READY_FD=\"{value}\" is not the readiness pipe"
            )) && out.contains(want),
            "{value}: {out}"
        );
    }
}
