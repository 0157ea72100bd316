//! `cargo xtask bench proxy`: the gateway against nginx and HAProxy, in one run, on loopback.
//!
//! The three proxies and their upstreams are set up alike by [`crate::bench_peers`]. `wrk`
//! drives each one in turn over keep-alive connections; repetitions are interleaved, in a
//! rotating order ([`crate::bench::interleaved`]). The table shows medians of req/s and of
//! p50/p99 latency, each proxy's CPU time per request (steadier than req/s on a shared
//! machine), the ratios gateway/nginx and gateway/HAProxy, and the gateway's peak RSS.
//! The gateway runs as users run it, with the kernel observer attached; a second gateway with
//! `[observer] mode = "off"` is measured beside it (`gw-no-obs`; `--no-observer-off` leaves it
//! out), and `gateway/gw-no-obs` is the observer's share.
//!
//! Then the HTTP/2-upstream row (`bench_proxy_h2`): h2load through each proxy to an h2c
//! upstream, with the same repetitions; `--no-h2` leaves it out. Then the WebSocket echo row
//! (`bench_proxy_ws`): messages per second through each proxy to one echo upstream; `--no-ws`
//! leaves it out.
//!
//! `--floor` adds `hyper-floor` (floor/src/main.rs): a bare reverse proxy on
//! the same hyper and tokio, shaped like the gateway (a current-thread runtime and a
//! `SO_REUSEPORT` listener per core, keep-alive pools per worker) but doing nothing else. The
//! `gateway/hyper-floor` ratio is what the gateway's own per-request work costs, apart from
//! its HTTP library and runtime.
//!
//! After the table, the gateway's CPU budget for the goal of issue 15 (1.1× the better peer's
//! req/s): the machine is shared by wrk, the upstreams and the proxy, so a proxy's req/s is
//! the busy CPU time over what every process spends per request. [`budget`] says how much CPU
//! per request that goal leaves the gateway, measured, beside what it spends.
//!
//! This is a benchmark, not a test: it asserts nothing, it reports. Options:
//! `--reps N` (5), `--duration S` (10), `--warmup S` (3), `--connections C` (64),
//! `--wrk-threads T` (1), `--gateway-bin PATH` and `--floor-bin PATH` (default: the release
//! build, profile-guided: [`crate::pgo`]).

use crate::{
    bench::{self, Load, Options},
    bench_peers::Peers,
};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let h2 = !args.iter().any(|a| a == "--no-h2");
    let ws = !args.iter().any(|a| a == "--no-ws");
    let observer_off = !args.iter().any(|a| a == "--no-observer-off");
    let floor = args.iter().any(|a| a == "--floor");
    let args: Vec<String> = args
        .iter()
        .filter(|a| {
            !matches!(
                a.as_str(),
                "--no-h2" | "--no-ws" | "--no-observer-off" | "--floor"
            )
        })
        .cloned()
        .collect();
    let o = Options::parse(&args)?;
    bench::require("wrk", "wrk")?;
    bench::require("nginx", "nginx-light")?;
    bench::require("haproxy", "haproxy")?;
    let gateway = o.gateway_binary()?;
    let floor_bin = if floor { Some(o.floor_binary()?) } else { None };

    let dir = std::env::temp_dir().join(format!("gateway-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut peers = Peers::start(&dir, &gateway, None)?;
    if observer_off {
        peers.add_gateway_without_observer(&dir, &gateway)?;
    }
    if let Some(bin) = &floor_bin {
        peers.add_floor(bin)?;
    }
    let targets = peers.targets();
    println!(
        "bench proxy: {} cores, load average {}, wrk -t{} -c{} -d{}s, {} interleaved repetitions (+{}s warm-up each)",
        bench::cores(),
        bench::load_average(),
        o.wrk_threads,
        o.connections,
        o.duration,
        o.reps,
        o.warmup
    );
    println!("{}", peers.describe_upstreams());
    let loads = [Load {
        name: "keep-alive",
        threads: o.wrk_threads,
        connections: o.connections,
        headers: Vec::new(),
    }];
    let samples = bench::interleaved(&o, &targets, &loads, &mut || peers.check_alive())?;
    let rss = bench::peak_rss_kib(peers.gateway.pid());
    bench::report("keep-alive", "req/s", &targets, &samples[0]);
    budget(&targets, &samples[0]);
    match rss {
        Some(kib) => println!(
            "gateway peak RSS under load: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("gateway peak RSS: unavailable"),
    }
    drop(peers);
    if h2 {
        crate::bench_proxy_h2::run(&gateway, &dir, o.reps, o.duration, o.warmup)?;
    }
    if ws {
        crate::bench_proxy_ws::run(&gateway, &dir, o.reps, o.duration, o.warmup)?;
    }
    println!("load average at the end: {}", bench::load_average());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The CPU time per request the gateway could spend and still reach 1.1× the better peer's
/// req/s in this run: the busy cores (medians of the gateway's runs) over 1.1× the peer's
/// req/s, less what the rest of the machine spends per request beside the gateway. Printed
/// with what the gateway spends, in user space and in the kernel.
fn budget(targets: &[bench::Target], samples: &[Vec<bench::Sample>]) {
    let med =
        |i: usize, f: fn(&bench::Sample) -> f64| bench::median(samples[i].iter().map(f).collect());
    let Some((peer, peer_rps)) = targets
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t.name, "nginx" | "haproxy"))
        .map(|(i, t)| (t.name, med(i, |s| s.rps)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
    else {
        return;
    };
    let busy_cores = bench::cores() as f64 * (1.0 - med(0, |s| s.idle_share));
    let rest = med(0, bench::Sample::rest_us_per_req);
    let (cpu, user) = (med(0, |s| s.cpu_us_per_req), med(0, |s| s.user_us_per_req));
    let allowed = busy_cores * 1e6 / (1.1 * peer_rps) - rest;
    println!(
        "budget: 1.1x {peer} ({:.0} req/s) on {busy_cores:.2} busy cores, with the rest of the machine at \
         {rest:.1} us/req, leaves the gateway {allowed:.1} us/req; it spends {cpu:.1} ({user:.1} user, \
         {:.1} system)",
        1.1 * peer_rps,
        cpu - user
    );
}
