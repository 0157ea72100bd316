//! The HTTP/2-upstream row of `cargo xtask bench proxy`: `h2load` (nghttp2) with HTTP/2
//! prior knowledge through each proxy to one h2c upstream (nginx, one worker, `return 200`):
//! the gateway (`protocol = "h2c"`), nginx (`grpc_pass`, which speaks h2c upstream, with a
//! keep-alive pool) and HAProxy (`proto h2` on both sides). Repetitions interleaved as in the
//! HTTP/1.1 rows; medians of req/s, mean request time and CPU time per request, and the ratios.
//!
//! The WebSocket echo row is `bench_proxy_ws`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::bench_peers::{Trio, wait_listening};

/// What one h2load run measured.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct H2Sample {
    pub rps: f64,
    /// h2load's mean "time for request".
    pub mean_ms: f64,
    /// Failed requests and responses other than 2xx (a proxy that answers 502 fast is not
    /// fast).
    pub failed: u64,
    pub cpu_us_per_req: f64,
    /// Requests answered 2xx.
    pub ok: u64,
}

pub(crate) fn upstream_conf(dir: &Path, port: u16) -> String {
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/h2-upstream.pid;\nerror_log {d}/h2-upstream.err warn;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  \
         server {{ listen 127.0.0.1:{port} http2 backlog=4096; keepalive_requests 10000000; \
         http2_max_concurrent_streams 1024; location / {{ return 200 \"hello\\n\"; }} }}\n}}\n",
        d = dir.display()
    )
}

pub(crate) fn nginx_conf(dir: &Path, port: u16, up: u16) -> String {
    format!(
        "worker_processes auto;\ndaemon off;\npid {d}/h2-nginx.pid;\nerror_log {d}/h2-nginx.err warn;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  \
         upstream backend {{ server 127.0.0.1:{up}; keepalive 128; }}\n  \
         server {{\n    listen 127.0.0.1:{port} http2 backlog=4096;\n    keepalive_requests 10000000;\n    \
         location / {{ grpc_pass grpc://backend; grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }}\n  }}\n}}\n",
        d = dir.display()
    )
}

pub(crate) fn haproxy_conf(port: u16, up: u16, cores: usize) -> String {
    format!(
        "global\n  nbthread {cores}\n  maxconn 8000\ndefaults\n  mode http\n  option http-keep-alive\n  \
         http-reuse always\n  option forwardfor\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\nfrontend fe\n  bind 127.0.0.1:{port} proto h2\n  default_backend be\n\
         backend be\n  server u0 127.0.0.1:{up} proto h2\n"
    )
}

pub(crate) fn gateway_conf(port: u16, up: u16) -> String {
    format!(
        "[router]\nlisten = [\"127.0.0.1:{port}\"]\ndrain_delay_ms = 0\n\n[router.upstream]\n\
         endpoints = [\"127.0.0.1:{up}\"]\nprotocol = \"h2c\"\n\n[admin]\nenabled = false\n\n\
         [access_log]\noutput = \"off\"\n"
    )
}

/// One `h2load -D secs` run against `port`; the CPU time of `pids` meanwhile.
pub(crate) fn h2load(
    port: u16,
    secs: u64,
    clients: usize,
    streams: usize,
    pids: &[u32],
) -> anyhow::Result<H2Sample> {
    let cpu0 = crate::bench::cpu_ticks(pids);
    let out = Command::new("h2load")
        .args([
            "-D",
            &secs.to_string(),
            "-c",
            &clients.to_string(),
            "-m",
            &streams.to_string(),
            "-t",
            "1",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .context("running h2load")?;
    let cpu = crate::bench::cpu_ticks(pids).saturating_sub(cpu0) as f64
        / crate::bench::ticks_per_second();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = parse_h2load(&text, cpu, secs)
        .with_context(|| format!("could not read h2load's output:\n{text}"))?;
    Ok(s)
}

/// Reads `finished in …, N req/s`, `requests: … F failed` and `time for request: min max mean`.
fn parse_h2load(text: &str, cpu_s: f64, secs: u64) -> Option<H2Sample> {
    let mut s = H2Sample::default();
    let mut done = 0u64;
    let mut ok = 0u64;
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in") {
            s.rps = rest
                .split(',')
                .find_map(|p| p.trim().strip_suffix("req/s")?.trim().parse().ok())?;
        } else if let Some(rest) = t.strip_prefix("requests:") {
            for p in rest.split(',') {
                let p = p.trim();
                if let Some(n) = p.strip_suffix("failed") {
                    s.failed = n.trim().parse().ok()?;
                } else if let Some(n) = p.strip_suffix("succeeded") {
                    done = n.trim().parse().ok()?;
                }
            }
        } else if let Some(rest) = t.strip_prefix("status codes:") {
            ok = rest
                .split(',')
                .find_map(|p| p.trim().strip_suffix("2xx")?.trim().parse().ok())?;
        } else if let Some(rest) = t.strip_prefix("time for request:") {
            let mean = rest.split_whitespace().nth(2)?;
            s.mean_ms = crate::bench::parse_latency(mean)?;
        }
    }
    if s.rps == 0.0 || done == 0 {
        return None;
    }
    s.failed += done.saturating_sub(ok);
    s.ok = ok;
    s.cpu_us_per_req = cpu_s * 1e6 / (s.rps * secs as f64);
    Some(s)
}

/// The row: starts the upstream and the three proxies, measures, prints the table.
pub(crate) fn run(
    gateway: &Path,
    dir: &Path,
    reps: usize,
    secs: u64,
    warmup: u64,
) -> anyhow::Result<()> {
    use crate::bench::{cores, free_port, median, spawn_proc};
    crate::bench::require("h2load", "nghttp2-client")?;
    let up = free_port()?;
    let ports = [free_port()?, free_port()?, free_port()?];
    let up_conf = dir.join("h2-upstream.conf");
    std::fs::write(&up_conf, upstream_conf(dir, up))?;
    let mut upstream = spawn_proc(
        "h2c upstream (nginx)",
        &mut crate::bench_peers::nginx_command(dir, &up_conf),
    )?;
    wait_listening("h2c upstream", up, &mut upstream)?;
    let confs = [
        gateway_conf(ports[0], up),
        nginx_conf(dir, ports[1], up),
        haproxy_conf(ports[2], up, cores()),
    ];
    let mut trio = Trio::start("h2", gateway, dir, confs, ports)?;
    let pids = trio.pids();
    let (clients, streams) = (16, 16);
    println!();
    println!(
        "HTTP/2 upstream (h2c): h2load -c{clients} -m{streams} -D{secs}s, one h2c upstream (nginx, 1 worker, return 200); {reps} interleaved repetitions"
    );
    let samples = crate::bench::rotate(
        &Trio::NAMES,
        (reps, secs, warmup),
        &mut || {
            trio.check_alive()?;
            upstream.check_alive()
        },
        &mut |i, secs| h2load(ports[i], secs, clients, streams, &pids[i]),
        &|s: &H2Sample| {
            format!(
                "{:>10.0} req/s  mean {:>7.3} ms  cpu {:>6.1} us/req{}",
                s.rps,
                s.mean_ms,
                s.cpu_us_per_req,
                if s.failed > 0 {
                    format!("  ({} failed)", s.failed)
                } else {
                    String::new()
                }
            )
        },
    )?;
    let med = |i: usize, f: fn(&H2Sample) -> f64| median(samples[i].iter().map(f).collect());
    println!();
    println!(
        "{:<10} {:>12} {:>10} {:>12} {:>8}",
        "h2 proxy", "req/s", "mean ms", "CPU us/req", "failed"
    );
    for (i, name) in Trio::NAMES.iter().enumerate() {
        let failed: u64 = samples[i].iter().map(|s| s.failed).sum();
        println!(
            "{:<10} {:>12.0} {:>10.3} {:>12.1} {:>8}",
            name,
            med(i, |s| s.rps),
            med(i, |s| s.mean_ms),
            med(i, |s| s.cpu_us_per_req),
            failed
        );
    }
    println!();
    for (j, other) in [(1, "nginx"), (2, "haproxy")] {
        println!(
            "h2: gateway/{other:<8} req/s {:.3}  mean {:.3}  CPU/req {:.3}",
            med(0, |s| s.rps) / med(j, |s| s.rps),
            med(0, |s| s.mean_ms) / med(j, |s| s.mean_ms),
            med(0, |s| s.cpu_us_per_req) / med(j, |s| s.cpu_us_per_req),
        );
    }
    drop((trio, upstream));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_output_is_read() {
        let text = "finished in 10.00s, 12345.60 req/s, 1.23MB/s\n\
                    requests: 123456 total, 123456 started, 123450 done, 123450 succeeded, 6 failed, 6 errored, 0 timeout\n\
                    status codes: 123440 2xx, 0 3xx, 0 4xx, 10 5xx\n\
                    time for request:      245us     12.30ms      1.25ms       500us    80.00%\n";
        let s = parse_h2load(text, 2.0, 10).unwrap();
        assert_eq!(s.rps, 12345.6);
        assert_eq!(s.failed, 16, "6 failed and 10 not 2xx");
        assert_eq!(s.ok, 123440);
        assert_eq!(s.mean_ms, 1.25);
        assert!((s.cpu_us_per_req - 2.0e6 / 123456.0).abs() < 1e-6);
        assert!(parse_h2load("nothing", 1.0, 1).is_none());
    }
}
