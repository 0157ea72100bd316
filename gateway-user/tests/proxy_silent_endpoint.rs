//! Round robin with one endpoint that takes connections and answers nothing (a hung process
//! whose kernel still accepts into its backlog). Each request it gets holds a connection until
//! the response timeout. It may hold its share of the cluster's `max_connections`, by weight;
//! then it is passed over while the others have room, so their requests are served at once.
//! Before, it kept its turns until it held every connection of the cluster, and every request
//! to the healthy endpoints waited for one until the silent endpoint's requests timed out.
//! Unprivileged: `[observer] mode = "off"`, loopback only; the real binary.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use gateway_testkit::{
    config, gateway_bin, http::get_once, process::GatewayProcess, tempdir::temp_dir,
    upstream::BlockingUpstream,
};

const MAX_CONNECTIONS: usize = 30;
const REQUESTS: usize = 240;
const EVERY: Duration = Duration::from_micros(12_500);

#[test]
fn a_silent_endpoint_holds_its_share_of_connections_not_the_clusters() {
    let (a, b) = (BlockingUpstream::start(), BlockingUpstream::start());
    // Never accepted, never read: the kernel completes each handshake into the backlog.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = temp_dir("silent-endpoint");
    // Round robin is the default policy.
    let cfg = config::loopback(
        &dir,
        &[a.addr, b.addr, silent.local_addr().unwrap()],
        &format!(
            "[router.upstream.limits]\nmax_connections = {MAX_CONNECTIONS}\n\n\
             [router.upstream.timeouts]\nresponse_timeout_ms = 5000\n"
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = gw.addr;

    // Open loop: a request every 12.5 ms for 3 s, each on a connection of its own.
    let start = Instant::now();
    let results: Vec<(u16, Duration)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let at = start + EVERY * i as u32;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                s.spawn(move || {
                    let t = Instant::now();
                    let status = get_once(addr, "/", Duration::from_secs(12)).map_or(0, |r| r.0);
                    (status, t.elapsed())
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let ok: Vec<Duration> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, d)| *d)
        .collect();
    // Served at once, but with 240 client threads on a loaded two-core machine: 2 s, well
    // under the 5 s a request waits for a connection the silent endpoint holds.
    let slow_ok = ok.iter().filter(|d| **d > Duration::from_secs(2)).count();
    let timed_out = results.iter().filter(|(s, _)| *s == 504).count();
    let other: Vec<_> = results
        .iter()
        .filter(|(s, _)| ![200, 504].contains(s))
        .collect();
    eprintln!(
        "{REQUESTS} requests: {} served ({slow_ok} after more than 2 s), {timed_out} timed out on \
         the silent endpoint, {} other",
        ok.len(),
        other.len()
    );
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(
        slow_ok, 0,
        "requests to the healthy endpoints waited for a connection the silent one held"
    );
    // Its share: a third of 30 connections (a few more when workers pick at the same moment).
    assert!(
        timed_out <= MAX_CONNECTIONS / 3 + 2,
        "{timed_out} requests went to the silent endpoint"
    );
    drop(silent);
}
