//! `gateway run` raises its soft file descriptor limit to the hard one, as a service started
//! from a shell or by containerd 2 (soft 1,024) needs: at the soft limit it would serve about
//! half as many proxied requests at once as it has descriptors. And when even the hard limit
//! is below what the config's limits allow open at once, it warns.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{metrics, value},
    gateway_bin,
    http::get_once,
    process::{GatewayProcess, raise_own_nofile, with_nofile_limits},
    tempdir::temp_dir,
    upstream::Upstream,
};

/// Requests held in flight at once, each with a client and an upstream connection: 400
/// descriptors, past a soft limit of 256 and well within a hard limit of 4,096.
const IN_FLIGHT: usize = 200;

/// Two workers whatever the CPUs (the warning counts each worker's descriptors), one
/// cluster of the default 1,024 connections.
fn config(name: &str, upstream: SocketAddr) -> PathBuf {
    let cfg = temp_dir(name).join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[router]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\ndrain_delay_ms = 0\n\n\
             [router.upstream]\nendpoints = [\"{upstream}\"]\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n[access_log]\noutput = \"off\"\n\n\
             [observer]\nmode = \"off\"\n"
        ),
    )
    .unwrap();
    cfg
}

/// The soft limit in `/proc/PID/limits`.
fn soft_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// How long the upstream takes over each request: the requests are in flight at once.
const UPSTREAM_DELAY: Duration = Duration::from_millis(3_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_limit_is_raised_to_the_hard_one_and_the_requests_beyond_the_soft_one_are_served()
{
    raise_own_nofile(4_096);
    let up = Upstream::start("up").await;
    up.set_delay(UPSTREAM_DELAY);
    let cfg = config("nofile-raise", up.addr);
    let gw = GatewayProcess::spawn(with_nofile_limits(gateway_bin!().run(&cfg), 256, 4_096));
    let line = gw.expect_line(&["raised the soft limit"], Duration::from_secs(5));
    assert!(
        line.contains("from=256") && line.contains("to=4096"),
        "{line}"
    );
    assert_eq!(soft_limit(gw.pid()), 4_096);
    assert_eq!(value(&metrics(gw.admin), "process_max_fds", &[]), 4_096.0);
    assert!(
        !gw.contains("file descriptor limit is"),
        "a warning at 4,096 for one cluster of 1,024:\n{}",
        gw.text()
    );
    let addr = gw.addr;
    let (answers, fds) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let held: Vec<_> = (0..IN_FLIGHT)
                .map(|_| s.spawn(move || get_once(addr, "/", Duration::from_secs(10))))
                .collect();
            // Within the upstream's delay every request is in flight at once: the most
            // descriptors seen open until then, or until past the soft limit.
            let until = Instant::now() + UPSTREAM_DELAY - Duration::from_millis(500);
            let mut fds = gw.open_fds();
            while fds <= 256 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
                fds = fds.max(gw.open_fds());
            }
            let answers: Vec<_> = held.into_iter().map(|h| h.join().unwrap()).collect();
            (answers, fds)
        })
    });
    assert!(
        fds > 256,
        "{fds} descriptors open with {IN_FLIGHT} requests in flight: not past the soft limit"
    );
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok((200, _))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {IN_FLIGHT} requests in flight at once not served: {:?}",
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        up.hits() >= IN_FLIGHT,
        "the upstream saw {} requests",
        up.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_limit_below_the_configs_limits_is_warned_of_and_the_gateway_serves() {
    let up = Upstream::start("up").await;
    // 1,024 upstream connections, as many clients behind them, 268 for the rest: past 512.
    let cfg = config("nofile-short", up.addr);
    let gw = GatewayProcess::spawn(with_nofile_limits(gateway_bin!().run(&cfg), 512, 512));
    let line = gw.expect_line(&["file descriptor limit is 512"], Duration::from_secs(5));
    assert!(
        line.contains("WARN")
            && line.contains("2316 (the clusters' max_connections 1024, 1024 client connections")
            && line.contains("LimitNOFILE="),
        "{line}"
    );
    assert!(!gw.contains("raised the soft limit"), "{}", gw.text());
    assert_eq!(
        get_once(gw.addr, "/", Duration::from_secs(5)).map(|(s, _)| s),
        Ok(200)
    );
}
