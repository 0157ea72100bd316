//! The admin listener bounds what a client can hold: at most 64 connections at once (a new one
//! closes the oldest, so a health probe still gets through), and a connection that sends no
//! request head within 10 s is closed. Its port may be open to a whole cluster network (`allow_remote`, for
//! Prometheus), and before, a client that opened connections and sent nothing held each one
//! (and its file descriptor, shared with the proxy's clients) for as long as it liked. The
//! proxy serves throughout (curl). Unprivileged: `[observer] mode = "off"`, loopback only.

use std::{
    io::{ErrorKind, Read as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::admin_get, config, gateway_bin, peers::curl_codes, process::GatewayProcess,
    tempdir::temp_dir, upstream::BlockingUpstream,
};

const MAX: usize = 64;

/// Whether the server closed `s` within `limit` (EOF or reset), reading nothing.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(n) => panic!("the admin listener sent {n} bytes unasked"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(_) => true,
    }
}

fn proxy_serves(addr: SocketAddr) {
    assert_eq!(curl_codes(&format!("http://{addr}/"), 1, &[]), ["200"]);
}

#[test]
fn idle_admin_connections_are_bounded_in_number_and_in_time() {
    let up = BlockingUpstream::start();
    let dir = temp_dir("admin-limits");
    let cfg = config::loopback(&dir, &[up.addr], "");
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    // `spawn` asked /readyz on a connection of its own, closed since; let it go.
    std::thread::sleep(Duration::from_millis(200));

    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..MAX)
        .map(|_| TcpStream::connect(gw.admin).unwrap())
        .collect();
    // One more closes the oldest, which sent nothing, and is served itself: a health probe
    // gets through however many idle connections a client holds.
    assert_eq!(admin_get(gw.admin, "/healthz").status, 200);
    assert!(
        closed_within(&mut idle[0], Duration::from_secs(2)),
        "the oldest of {MAX} idle connections was kept open for connection {}",
        MAX + 1
    );
    gw.expect_log(
        "admin listener: every connection slot is taken; closing the oldest",
        Duration::from_secs(5),
    );
    for _ in 0..3 {
        assert_eq!(admin_get(gw.admin, "/healthz").status, 200);
    }
    proxy_serves(gw.addr);
    // The other idle ones stay, for now.
    assert!(
        !closed_within(&mut idle[MAX - 1], Duration::from_millis(500)),
        "an idle connection was closed before its 10 s with slots to spare"
    );

    // Ten seconds without a request head: each is closed.
    for (i, s) in idle.iter_mut().enumerate().skip(1) {
        let left = Duration::from_secs(16).saturating_sub(opened.elapsed());
        assert!(
            closed_within(s, left.max(Duration::from_millis(1))),
            "idle admin connection {i} still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    let took = opened.elapsed();
    assert!(took >= Duration::from_secs(9), "closed after {took:?}");
    eprintln!("{MAX} idle admin connections closed {took:?} after they were opened");
    proxy_serves(gw.addr);
}
