//! Privileged (root: the kernel observer attaches): the zero-downtime binary upgrade. SIGUSR2
//! starts the binary again with the listening sockets handed over; the new process attaches
//! its own observer in its own cgroup beside the old one's, takes traffic, and the old one
//! drains and exits. Under a closed-loop load of keep-alive and connection-per-request
//! clients, no request may fail. A new binary that cannot start leaves the old one serving.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::{Duration, Instant},
};

use gateway_lab::{CgroupGuard, NetnsCommandExt as _};
use gateway_testkit::{
    config, gateway_bin,
    http::get_once,
    peers::curl_codes,
    ports::free_port,
    process::GatewayProcess,
    root::require_root,
    service::{cgroup_of, load},
    tempdir::TempDir,
    upstream::BlockingUpstream as Upstream,
};

struct Running {
    proc: GatewayProcess,
    listen: SocketAddr,
    admin: SocketAddr,
    config: std::path::PathBuf,
    _dir: TempDir,
}

fn start(label: &str, upstream: SocketAddr, cgroup: Option<&CgroupGuard>) -> Running {
    start_with(label, upstream, cgroup, &[])
}

/// [`start`] with `env` set for it (and so for the new process an upgrade starts).
fn start_with(
    label: &str,
    upstream: SocketAddr,
    cgroup: Option<&CgroupGuard>,
    env: &[(&str, &str)],
) -> Running {
    let dir = TempDir::new(label);
    let (listen, admin) = (free_port(), free_port());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config_text(listen, admin, upstream, &dir.path().join("access.log")),
    )
    .unwrap();
    let mut cmd = gateway_bin!().run(&config);
    cmd.envs(env.iter().copied());
    if let Some(c) = cgroup {
        cmd.in_cgroup(c);
    }
    let proc = GatewayProcess::spawn(cmd);
    Running {
        proc,
        listen: SocketAddr::from(([127, 0, 0, 1], listen)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        config,
        _dir: dir,
    }
}

fn config_text(listen: u16, admin: u16, upstream: SocketAddr, log: &std::path::Path) -> String {
    config::with_ports(
        listen,
        admin,
        upstream,
        log,
        "drain_delay_ms = 0\nshutdown_grace_ms = 10000",
        "[observer]\nmode = \"kernel\"",
    )
}

/// The pid the successor announced ("took over the listening sockets; serving pid=N").
fn successor_pid(p: &GatewayProcess) -> u32 {
    p.expect_log("took over the listening sockets", Duration::from_secs(20));
    let line = p
        .lines()
        .into_iter()
        .find(|l| l.contains("took over the listening sockets"))
        .unwrap();
    line.split("pid=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

/// Guard: SIGKILL for a process that is not our child (the successor), on drop.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2); the pid is the successor this test made (or gone).
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{}", self.0)).exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

#[test]
fn privileged_binary_upgrade_under_load_fails_no_request() {
    require_root();
    let up = Upstream::start();
    let unit = CgroupGuard::new("upgrade-unit").expect("a test cgroup");
    let mut old = start("upgrade", up.addr, Some(&unit));
    let old_pid = old.proc.pid();
    assert_eq!(
        cgroup_of(old_pid),
        unit.path().join(format!("gateway-{old_pid}"))
    );

    let stop = Arc::new(AtomicBool::new(false));
    // 8 keep-alive clients and 4 that open a connection per request.
    let load = load(old.listen, 8, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    // Health checks on the shared admin socket all through the upgrade, as a load balancer
    // makes them: the old process, draining, answered about half of them 503 until it exited.
    let checks = {
        let (admin, stop) = (old.admin, stop.clone());
        std::thread::spawn(move || {
            let mut codes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                codes.push(get_once(admin, "/healthz", Duration::from_secs(2)).map(|(c, _)| c));
                std::thread::sleep(Duration::from_millis(20));
            }
            codes
        })
    };
    // An upload still coming in holds the old process draining until 3 s after the new one
    // serves, as a slow client or a long response does.
    let mut upload = std::net::TcpStream::connect(old.listen).unwrap();
    std::io::Write::write_all(
        &mut upload,
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc",
    )
    .unwrap();
    let t0 = Instant::now();
    old.proc.signal(libc::SIGUSR2);
    let new_pid = successor_pid(&old.proc);
    let upload = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        drop(upload);
    });
    let _new = KillOnDrop(new_pid);
    let exit = old
        .proc
        .wait(Duration::from_secs(15))
        .expect("the old process exits after the handover");
    let handover = t0.elapsed();
    assert!(exit.success(), "{exit:?}\n{}", old.proc.text());
    let served_before_exit = up.hits.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let report = load.join().unwrap();
    upload.join().unwrap();
    let codes = checks.join().unwrap();
    let unhealthy: Vec<_> = codes.iter().filter(|c| !matches!(c, Ok(200))).collect();
    assert!(
        codes.len() >= 20 && unhealthy.is_empty(),
        "{} of {} health checks during the upgrade failed: {:?}",
        unhealthy.len(),
        codes.len(),
        &unhealthy[..unhealthy.len().min(5)]
    );
    let total_hits = up.hits.load(Ordering::SeqCst);
    println!(
        "upgrade under load: {} requests ok, {} failed, {} keep-alive reconnects; old process exited {} ms after SIGUSR2; {} requests served after it exited",
        report.ok,
        report.failed,
        report.reconnects,
        handover.as_millis(),
        total_hits - served_before_exit
    );
    assert_eq!(
        report.failed,
        0,
        "failed requests: {:?}",
        &report.failures[..report.failures.len().min(10)]
    );
    assert!(
        report.ok >= 300,
        "too little load to prove anything: {report:?}"
    );
    assert!(
        total_hits - served_before_exit >= 50,
        "the new process served too little"
    );

    // The new process serves with its own observer, in its own cgroup beside the old one's
    // (which is gone), and answers health checks on the handed-over admin socket.
    assert_eq!(
        cgroup_of(new_pid),
        unit.path().join(format!("gateway-{new_pid}"))
    );
    assert!(
        !unit.path().join(format!("gateway-{old_pid}")).exists(),
        "the old observer cgroup is left"
    );
    let (code, body) = get_once(old.admin, "/healthz", Duration::from_secs(2)).unwrap();
    assert_eq!(
        (code, body.contains("signals: kernel")),
        (200, true),
        "{body}"
    );
    old.proc
        .expect_log("handed over to the new process", Duration::from_secs(1));
}

#[test]
fn privileged_an_upgrade_that_cannot_start_leaves_the_old_process_serving() {
    require_root();
    let up = Upstream::start();
    let mut old = start("upgrade-bad", up.addr, None);
    // The new process reads the config again: make it one that does not validate.
    std::fs::write(&old.config, "[router]\nlisten = []\n").unwrap();
    old.proc.signal(libc::SIGUSR2);
    old.proc
        .expect_log("upgrade failed, still serving", Duration::from_secs(20));
    assert!(old.proc.alive());
    assert_eq!(
        get_once(old.listen, "/", Duration::from_secs(2)).unwrap().0,
        200
    );
    assert_eq!(
        get_once(old.admin, "/healthz", Duration::from_secs(2))
            .unwrap()
            .0,
        200
    );
    old.proc.signal(libc::SIGTERM);
    assert!(
        old.proc
            .wait(Duration::from_secs(10))
            .expect("exited")
            .success()
    );
}

/// A SIGHUP while the new process starts (a `systemctl reload` during a package upgrade): the
/// new process read the config before it changed, and served the old one on, saying nothing.
/// Now the old process passes the SIGHUP on once the new one serves. The new process is held
/// 2 s after it read its config (a debug build's failpoint) so that the change falls between.
#[test]
fn privileged_a_reload_during_an_upgrade_reaches_the_new_process() {
    require_root();
    let (before, after) = (Upstream::start(), Upstream::start());
    let mut old = start_with(
        "upgrade-reload",
        before.addr,
        None,
        &[("GATEWAY_DEBUG_START_DELAY_MS", "2000")],
    );
    old.proc.signal(libc::SIGUSR2);
    // Each process says so once, after it read its config.
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.proc.count("kernel observer attached") < 2 {
        assert!(Instant::now() < deadline, "{}", old.proc.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&old.config).unwrap();
    let changed = text.replace(&before.addr.to_string(), &after.addr.to_string());
    assert_ne!(text, changed);
    std::fs::write(&old.config, changed).unwrap();
    old.proc.signal(libc::SIGHUP);
    old.proc
        .expect_log("config reloaded", Duration::from_secs(5));
    let new_pid = successor_pid(&old.proc);
    let _new = KillOnDrop(new_pid);
    old.proc
        .expect_log("passed on to it", Duration::from_secs(5));
    // The new process's own reload (its output is the old one's, inherited): the second line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while old.proc.count("config reloaded") < 2 {
        assert!(Instant::now() < deadline, "{}", old.proc.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        old.proc
            .wait(Duration::from_secs(20))
            .expect("the old process drains and exits")
            .success()
    );
    let hits = || {
        (
            before.hits.load(Ordering::Relaxed),
            after.hits.load(Ordering::Relaxed),
        )
    };
    let (hits_before, hits_after) = hits();
    for _ in 0..5 {
        assert_eq!(
            get_once(old.listen, "/", Duration::from_secs(2)).unwrap().0,
            200
        );
    }
    let (b, a) = hits();
    assert_eq!(
        (b - hits_before, a - hits_after),
        (0, 5),
        "the new process serves the config as it was reloaded"
    );
}

/// An upgrade whose config serves the old plain HTTP address over HTTPS (and plain HTTP on a
/// new port): the address is bound anew beside the sockets still handed over, which the
/// check for a second process on an address (`listeners::taken`) must not take for one. It
/// refused such an upgrade ("another socket already listens there") before it was skipped
/// in upgrades.
#[test]
fn privileged_an_upgrade_may_serve_a_handed_over_address_in_another_role() {
    require_root();
    let up = Upstream::start();
    let mut old = start("upgrade-role", up.addr, None);
    let dir = old._dir.path().to_path_buf();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["gw.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("gw.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("gw.key"), key.serialize_pem()).unwrap();
    let plain = free_port();
    let text = std::fs::read_to_string(&old.config).unwrap().replacen(
        &format!("listen = [\"{}\"]", old.listen),
        &format!(
            "listen = [\"127.0.0.1:{plain}\"]\nhttps_listen = [\"{}\"]",
            old.listen
        ),
        1,
    );
    let tls = format!(
        "\n[router.tls]\ncert_file = \"{d}/gw.pem\"\nkey_file = \"{d}/gw.key\"\n",
        d = dir.display()
    );
    std::fs::write(&old.config, text + &tls).unwrap();
    old.proc.signal(libc::SIGUSR2);
    let new_pid = successor_pid(&old.proc);
    let _new = KillOnDrop(new_pid);
    assert!(
        old.proc
            .wait(Duration::from_secs(20))
            .expect("the old process drains and exits")
            .success()
    );
    assert!(!old.proc.contains("upgrade failed"), "{}", old.proc.text());
    let https = format!("https://{}/", old.listen);
    assert_eq!(curl_codes(&https, 1, &["-k"]), ["200"]);
    let (status, _) = get_once(
        SocketAddr::from(([127, 0, 0, 1], plain)),
        "/",
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(status, 200);
}

/// The control: the same load across a plain restart (stop, then start on the same ports)
/// does fail requests, so the zero above is the handover's doing, not a blind load generator.
#[test]
fn privileged_control_a_plain_restart_under_the_same_load_fails_requests() {
    require_root();
    let up = Upstream::start();
    let mut old = start("restart", up.addr, None);
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(old.listen, 8, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(1000));
    old.proc.signal(libc::SIGTERM);
    assert!(
        old.proc
            .wait(Duration::from_secs(10))
            .expect("exited")
            .success()
    );
    let _new = GatewayProcess::spawn(gateway_bin!().run(&old.config));
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let report = load.join().unwrap();
    println!(
        "plain restart under load: {} requests ok, {} failed (e.g. {:?})",
        report.ok,
        report.failed,
        report.failures.first()
    );
    assert!(
        report.failed > 0,
        "a restart without handover failed nothing: {report:?}"
    );
}
