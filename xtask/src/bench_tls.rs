//! `cargo xtask bench tls`: HTTPS termination by the gateway, nginx and HAProxy, in one run,
//! on loopback, with the same ECDSA P-256 certificate (made now by `openssl req`) and the same
//! upstream pool behind each ([`crate::bench_peers`] with TLS).
//!
//! Two load shapes, both driven by `wrk` over `https://` (Debian's wrk, OpenSSL 3: TLS 1.3,
//! X25519), interleaved in rotating order ([`crate::bench::interleaved`]):
//!
//! - keep-alive: `-c C` connections, each handshaken once, then requests on them: req/s and
//!   p50/p99 latency of HTTPS termination itself;
//! - new connection: the same with `Connection: close`, so every request is a new TCP
//!   connection and a full TLS handshake (wrk never resumes a session): requests per second
//!   are handshakes per second, and CPU time per request is CPU time per handshake.
//!
//! Each table gives medians, each proxy's CPU time per request (user + system of every thread
//! and worker process, steadier than rates on a shared machine) and the ratios gateway/nginx
//! and gateway/HAProxy. The goal (issue 9) is at least the better peer's rate on both; this is a
//! benchmark and asserts nothing. Options are those of `bench proxy`: `--reps N` (5),
//! `--duration S` (10), `--warmup S` (3), `--connections C` (64), `--wrk-threads T` (1),
//! `--gateway-bin PATH`.

use crate::{
    bench::{self, Load, Options, Target},
    bench_peers::{Peers, Tls},
};
use std::{
    path::Path,
    process::{Command, Stdio},
};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = Options::parse(args)?;
    bench::require("wrk", "wrk")?;
    bench::require("nginx", "nginx-light")?;
    bench::require("haproxy", "haproxy")?;
    bench::require("openssl", "openssl")?;
    bench::require("curl", "curl")?;
    let gateway = o.gateway_binary()?;

    let dir = std::env::temp_dir().join(format!("gateway-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tls = certificate(&dir)?;
    let mut peers = Peers::start(&dir, &gateway, Some(&tls))?;
    let targets = peers.targets();
    println!(
        "bench tls: {} cores, load average {}, wrk -t{} -c{} -d{}s, {} interleaved repetitions (+{}s warm-up each)",
        bench::cores(),
        bench::load_average(),
        o.wrk_threads,
        o.connections,
        o.duration,
        o.reps,
        o.warmup
    );
    println!("certificate: ECDSA P-256, self-signed, the same files for all three");
    println!("{}", peers.describe_upstreams());
    for t in &targets {
        println!("  {:<8} negotiates {}", t.name, negotiated(t));
    }
    let loads = [
        Load {
            name: "keep-alive",
            threads: o.wrk_threads,
            connections: o.connections,
            headers: Vec::new(),
        },
        Load {
            name: "new-conn",
            threads: o.wrk_threads,
            connections: o.connections,
            headers: vec!["Connection: close"],
        },
    ];
    let samples = bench::interleaved(&o, &targets, &loads, &mut || peers.check_alive())?;
    let rss = bench::peak_rss_kib(peers.gateway.pid());
    bench::report(
        "keep-alive over TLS (one handshake per connection)",
        "req/s",
        &targets,
        &samples[0],
    );
    bench::report(
        "new connection per request (a full TLS handshake each)",
        "handshakes/s",
        &targets,
        &samples[1],
    );
    if let Some(kib) = rss {
        println!(
            "\ngateway peak RSS under load: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    println!("load average at the end: {}", bench::load_average());
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A self-signed ECDSA P-256 certificate for `bench.test` (and 127.0.0.1), valid two days.
pub(crate) fn certificate(dir: &Path) -> anyhow::Result<Tls> {
    let tls = Tls {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("cert+key.pem"),
    };
    let mut req = Command::new("openssl");
    req.args(["req", "-x509", "-nodes", "-days", "2"])
        .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-subj", "/CN=bench.test"])
        .args(["-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&tls.key)
        .arg("-out")
        .arg(&tls.cert)
        .stdin(Stdio::null());
    crate::output(&mut req, "openssl req")?;
    let both = std::fs::read_to_string(&tls.cert)? + &std::fs::read_to_string(&tls.key)?;
    std::fs::write(&tls.combined, both)?;
    Ok(tls)
}

/// The protocol, cipher suite, key exchange and signature `openssl s_client` gets from `t`.
fn negotiated(t: &Target) -> String {
    let hostport = t
        .url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &hostport])
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else {
        return "(openssl s_client did not run)".into();
    };
    // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384", "Server Temp Key: X25519, 253 bits",
    // "Peer signature type: ECDSA".
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{}; key exchange {}; signature {}",
        field("New, "),
        field("Server Temp Key:"),
        field("Peer signature type:")
    )
}
