//! `gateway diagnose` as a user runs it: bad input gives a clear error or result and never a
//! panic (invalid target syntax, a cluster name without a gateway to ask, an unknown host, a
//! closed port on loopback); without privileges it falls back to userspace timing and says
//! so; SIGINT mid-probe still removes its cgroup. Unknown names are only ever resolved inside
//! a lab namespace with no route out, so no DNS query leaves the machine. The privileged tests
//! need root; run with `--test-threads=1`.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::Stdio,
    time::{Duration, Instant},
};

use gateway_lab::{Fault, NetnsCommandExt};
use gateway_testkit::{
    diagnose::{
        assert_kernel_joined, assert_no_cgroup_left, assert_verdict, attempts, check_report,
        diagnose_here, diagnose_in, diagnose_lab, run,
    },
    gateway_bin,
    ports::refused_addr,
    root::require_root,
    service::{NOBODY, with_exact_caps},
};

#[test]
fn invalid_target_syntax_is_a_clear_error() {
    for (arg, says) in [
        ("fd00::5:80", "needs brackets"),
        ("10.0.0.5", "the port is missing"),
        ("host:http", "port `http` is not a number in 1–65535"),
        ("[fd00::5", "never closed"),
        ("what?", "neither host:port nor a cluster name"),
    ] {
        let out = gateway_bin!()
            .command()
            .args(["diagnose", arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "a usage error: {err}");
        assert!(
            err.contains(&format!("invalid target `{arg}`")) && err.contains(says),
            "{arg}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = gateway_bin!()
        .command()
        .args(["diagnose", "--http", "healthz", "127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("must start with `/`"), "{err}");
}

#[test]
fn a_cluster_name_needs_a_gateway_to_ask() {
    let out = gateway_bin!()
        .command()
        .args(["diagnose", "payments"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("target `payments` has no port")
            && err.contains("--admin ADDR of a running gateway"),
        "{err}"
    );

    // A gateway whose admin listener has no /status (an older gateway, or another service).
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = admin.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = admin.accept().unwrap();
        let mut buf = [0u8; 2048];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 24\r\nconnection: close\r\n\r\nnot found; try /healthz\n",
        )
        .unwrap();
    });
    let out = gateway_bin!()
        .command()
        .args(["diagnose", "payments", "--admin", &addr.to_string()])
        .output()
        .unwrap();
    server.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cluster lookup needs the gateway admin API's /status endpoint")
            && err.contains("404 Not Found"),
        "{err}"
    );
}

#[test]
fn privileged_unknown_host_reads_as_dns_failure() {
    let lab = diagnose_lab();
    let run = diagnose_in(gateway_bin!(), &lab, &["no-such-host.invalid:443"]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let confidence: f64 = run
        .stdout
        .strip_prefix("no-such-host.invalid:443: dns_failure (confidence ")
        .and_then(|rest| rest.split_once(")\n"))
        .and_then(|(c, _)| c.parse().ok())
        .unwrap_or_else(|| panic!("a dns_failure verdict with its confidence: {}", run.stdout));
    assert!(
        confidence > 0.0 && confidence <= 1.0,
        "confidence {confidence}"
    );
    assert!(
        run.stdout
            .contains("resolving no-such-host.invalid failed after"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("getent ahosts no-such-host.invalid"),
        "a next step: {}",
        run.stdout
    );
    assert!(
        !run.stderr.contains("diagnose: connects"),
        "no progress indicator when stderr is not a terminal: {}",
        run.stderr
    );
}

#[test]
fn privileged_closed_loopback_port_is_refused() {
    require_root();
    let addr = refused_addr().to_string();
    let run = diagnose_here(gateway_bin!(), &["--json", &addr]);
    let r = assert_verdict(&run, "refused");
    assert_kernel_joined(&r);
    assert_eq!(r["target"], addr);
    assert_eq!(attempts(&r).len(), 5);
}

#[test]
fn privileged_without_privileges_it_falls_back_to_userspace_timing() {
    require_root();
    let closed = refused_addr().to_string();
    let open_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = open_listener.local_addr().unwrap().to_string();
    // setpriv drops to nobody with no capabilities at all.
    let mut diagnose = gateway_bin!().command();
    diagnose.args(["diagnose", "--json", &closed, &open]);
    let run = run(with_exact_caps(&diagnose, NOBODY, &[]));
    let reports = run.reports();
    assert_eq!(reports.len(), 2, "{run:?}");
    check_report(&run, &reports[0], "refused");
    assert_eq!(run.status.code(), Some(1), "one target is not healthy");
    for r in &reports {
        let m = &r["measurements"];
        assert_eq!(m["kernel_signals"], false, "{m:#}");
        assert!(
            m["kernel_signals_missing"]
                .as_str()
                .unwrap()
                .contains("needs root, or CAP_BPF"),
            "{m:#}"
        );
        let text = serde_json::to_string(&r["evidence"]).unwrap();
        assert!(!text.contains("[kernel"), "no kernel claim: {text}");
        assert!(text.contains("[userspace]"), "{text}");
        assert!(text.contains("kernel signals off"), "{text}");
        for a in attempts(r) {
            assert_eq!(a["source"], "userspace", "{a:#}");
        }
    }
    assert_eq!(reports[1]["verdict"], "healthy", "{:#}", reports[1]);
    for a in attempts(&reports[1]) {
        assert_eq!(a["syn_retransmits"], 0, "from TCP_INFO: {a:#}");
    }

    // The text output says so too, and so does --no-kernel as root.
    let run = diagnose_here(gateway_bin!(), &["--no-kernel", &closed]);
    assert!(
        run.stdout
            .contains("kernel signals off (turned off with --no-kernel)")
            && run
                .stdout
                .contains("kernel signals OFF (why: see evidence)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(": refused (confidence"),
        "{}",
        run.stdout
    );
}

#[test]
fn privileged_sigint_mid_probe_removes_the_cgroup() {
    let lab = diagnose_lab();
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(8080).unwrap();
    let _f = up.apply(Fault::SynBlackhole { port: 8080 }).unwrap();
    let child = gateway_bin!()
        .command()
        .args(["diagnose", "--json", &up.addr_v4(8080).to_string()])
        .in_netns(lab.client())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let dir = gateway_lab::cgroup2_mount()
        .unwrap()
        .join(format!("gateway-diagnose-{pid}"));
    let start = Instant::now();
    // Probing has begun once the process sits in its own cgroup and its first SYN is out
    // (the client namespace's own count of connects that sent a SYN).
    let opens = || {
        lab.client()
            .netstat()
            .unwrap()
            .get(gateway_lab::NetStat::ACTIVE_OPENS)
            .expect("TcpActiveOpens")
    };
    let before = opens();
    while !std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|p| p.lines().any(|l| l.trim() == pid.to_string()))
        || opens() == before
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "diagnose never entered {} and sent a SYN",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sigint = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let took = sigint.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted (SIGINT)"), "{err}");
    // An unanswered SYN would hold a probe for the kernel's SYN budget (about two minutes with
    // the default tcp_syn_retries); SIGINT ends it, detaches and removes the cgroup in well
    // under a second on a quiet machine, and 3 s leaves room for a loaded one.
    eprintln!("diagnose exited {took:?} after SIGINT");
    assert!(
        took < Duration::from_millis(3000),
        "SIGINT ends the probes at once, not after {took:?}"
    );
    assert_no_cgroup_left(pid);
}

#[test]
fn privileged_text_report_draws_the_syn_rtt_histogram_when_there_are_enough_handshakes() {
    require_root();
    // Connects complete into the backlog: no accept() needed.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().to_string();
    let closed = refused_addr().to_string();
    let run = diagnose_here(gateway_bin!(), &["--count", "8", &open, &closed]);
    let out = &run.stdout;
    let header = format!("  SYN-RTT of {open} (8 handshakes, SYN to SYN-ACK, kernel):");
    let at = out
        .find(&header)
        .unwrap_or_else(|| panic!("no histogram for {open}:\n{out}\n{}", run.stderr));
    // Its bucket lines: indented four spaces, a range, a bar, a count; the counts add up.
    let total: u64 = out[at + header.len()..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") && !l.trim_start().starts_with('-'))
        .map(|l| {
            assert!(
                l.contains("µs–") || l.contains("ms–") || l.contains("s–"),
                "{l}"
            );
            l.rsplit(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .expect("a count")
        })
        .sum();
    assert_eq!(total, 8, "{out}");
    // A refused port completes no handshake: no histogram.
    assert!(!out.contains(&format!("SYN-RTT of {closed}")), "{out}");
    drop(listener);
}
