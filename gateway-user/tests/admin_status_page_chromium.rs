//! Privileged (root: the gateway attaches its kernel observer): the status page in a real
//! browser. Headless Chromium (Debian's `chromium`, installed by `./dev setup`) loads `/` from
//! a running `gateway run` (the built binary, `[observer] mode = "kernel"`) in front of two
//! loopback upstreams, one healthy and one refusing so that it gets ejected. The test reads the
//! DOM as Chromium rendered it, kernel evidence included, and keeps a screenshot at
//! `target/tmp/admin-status-page.png`. Without root it fails, saying so; it never skips.
//!
//! Chromium runs with `--no-sandbox` (root), no network beyond the loopback page (`--disable-*`
//! background services, no QUIC) and a throwaway profile directory.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{endpoint, status, wait_for},
    gateway_bin,
    http::{client, get},
    ports::refused_addr,
    process::GatewayProcess,
    root::require_root,
    tempdir::temp_dir,
    upstream::Upstream,
};
use http::StatusCode;

/// How long one Chromium run may take.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

fn chromium() -> PathBuf {
    which("chromium").unwrap_or_else(|| {
        panic!(
            "the status page test needs Debian's `chromium` (./dev setup installs it, or \
             apt-get install chromium)"
        )
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Runs Chromium headless on `url` with `mode` (`--dump-dom` or `--screenshot=FILE`); its stdout.
fn run_chromium(url: &str, mode: &str, profile: &Path) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(mode)
        .arg(url)
        .env("HOME", profile)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "chromium {mode} did not finish within {CHROMIUM_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chromium {mode} failed ({}); stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "not a PNG"
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_chromium_renders_endpoint_states_reasons_and_evidence() {
    require_root();
    let good = Upstream::start("good").await;
    let refused = refused_addr();
    let dir = temp_dir("status-page");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[router]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\ndrain_delay_ms = 0\n\n\
             [router.upstream]\nendpoints = [\"{refused}\", \"{}\"]\n\n\
             [router.upstream.health]\nejection_ms = 60000\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [access_log]\noutput = \"off\"\n\n\
             [observer]\nmode = \"kernel\"\ncgroup = \"gateway-admin-page-{{pid}}\"\n",
            good.addr
        ),
    )
    .unwrap();
    // Dropped, it gets SIGTERM, so that it leaves its cgroup cleanly.
    let gw = GatewayProcess::spawn(gateway_bin!().run(&config));
    let admin = gw.admin;
    let c = client();
    for _ in 0..10 {
        let got = get(&c, gw.addr, "/").await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    }
    let (dom, png, after) = tokio::task::spawn_blocking(move || {
        // Ejected, and its failed connects in a closed second of its history (the plot's data).
        wait_for(
            "the refusing endpoint ejected, its failures in its history",
            || {
                let s = status(admin);
                let e = endpoint(&s, "default", refused);
                let failed: u64 = e["history"]["errors"]["connect_refused"]
                    .as_array()
                    .map_or(0, |a| a.iter().filter_map(|v| v.as_u64()).sum());
                if e["state"] == "ejected" && failed > 0 {
                    Ok(())
                } else {
                    Err(s.to_string())
                }
            },
        );
        let profile = temp_dir("chromium-profile");
        let url = format!("http://{admin}/");
        let dom = run_chromium(&url, "--dump-dom", &profile);
        let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("admin-status-page.png");
        let _ = std::fs::remove_file(&shot);
        run_chromium(&url, &format!("--screenshot={}", shot.display()), &profile);
        let _ = std::fs::remove_dir_all(&profile);
        let png = std::fs::read(&shot)
            .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", shot.display()));
        eprintln!("status page screenshot: {}", shot.display());
        // Right after the page: seconds closed before it are the same in both.
        (dom, png, status(admin))
    })
    .await
    .unwrap();

    // What the browser rendered, not only what the server sent.
    assert!(dom.contains("<title>gateway status</title>"), "{dom}");
    for (addr, state) in [(refused, "ejected"), (good.addr, "healthy")] {
        assert!(
            dom.contains(&format!(
                "<tr data-endpoint=\"{addr}\" data-state=\"{state}\"><td class=\"mono\">{addr}</td>\
                 <td><span class=\"state {state}\">{state}</span></td>"
            )),
            "{addr} shown as {state}:\n{dom}"
        );
    }
    assert!(
        dom.contains(
            "<span class=\"mono\">refused</span><br><span class=\"why\">RST or ICMP port \
             unreachable: nothing listening on the port, or a firewall rejecting</span>"
        ),
        "the reason, explained:\n{dom}"
    );
    assert!(dom.contains("ejected for "), "{dom}");
    assert!(
        dom.contains(&format!(
            "<span class=\"ev ejected\">ejected</span><span class=\"why\">refused</span>\
             <span class=\"detail mono\">connection refused by {refused}"
        )),
        "the ejection with its evidence:\n{dom}"
    );
    assert!(
        dom.contains("<h2>cluster default<small>round_robin · 1/2 endpoints routable</small></h2>"),
        "{dom}"
    );
    assert!(dom.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
    assert!(
        dom.contains("data-mode=\"kernel\"><span class=\"pill kernel\">kernel signals</span>"),
        "gateway run attached the kernel observer:\n{dom}"
    );
    assert!(
        dom.contains("kernel: refused, 1 SYN sent, RST received, ECONNREFUSED"),
        "kernel evidence on the page:\n{dom}"
    );

    plots_match_status(&dom, &after, refused, good.addr);

    assert_eq!(png_size(&png), (1280, 1600));
    assert!(png.len() > 20_000, "a blank page compresses to less");
}

/// The value of the attribute that follows `prefix` (`… name="`), up to its closing quote.
fn attr_after<'a>(dom: &'a str, prefix: &str) -> Option<&'a str> {
    let start = dom.find(prefix)? + prefix.len();
    dom[start..].split('"').next()
}

/// Each endpoint has its plot; the refusing one's failed-connect bars carry, second by second,
/// the counts of its `history.errors` in `/status`, and its ejection marker sits at the
/// ejection's time in `history.changes`.
fn plots_match_status(
    dom: &str,
    status: &serde_json::Value,
    refused: std::net::SocketAddr,
    good: std::net::SocketAddr,
) {
    for addr in [refused, good] {
        assert!(
            dom.contains(&format!("data-endpoint=\"{addr}\" data-t0=\"")),
            "no plot (<svg data-endpoint=…>) for {addr}:\n{dom}"
        );
    }
    let e = endpoint(status, "default", refused);
    let h = &e["history"];
    let first = h["first_unix_s"].as_u64().expect("first_unix_s");
    let counts = h["errors"]["connect_refused"].as_array().expect("errors");
    let drawn = attr_after(dom, "data-reason=\"connect_refused\" data-counts=\"")
        .unwrap_or_else(|| panic!("no connect_refused bars in the plot:\n{dom}"));
    let mut total = 0;
    for pair in drawn.split(' ') {
        let (second, n) = pair.split_once(':').expect("second:count");
        let (second, n): (u64, u64) = (second.parse().unwrap(), n.parse().unwrap());
        let i = second.checked_sub(first).expect("a second of the window") as usize;
        assert_eq!(
            counts.get(i).and_then(|v| v.as_u64()),
            Some(n),
            "plot says {n} failed connects at {second}, /status says {:?}: {h}",
            counts.get(i)
        );
        total += n;
    }
    assert!(total > 0, "{drawn}");
    let ejected_at = h["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["event"] == "ejected")
        .and_then(|c| c["at_unix_ms"].as_u64())
        .unwrap_or_else(|| panic!("no ejection in the history: {h}"));
    assert_eq!(
        attr_after(dom, "class=\"mark ejected\" data-at-unix-ms=\""),
        Some(ejected_at.to_string().as_str()),
        "the ejection marker at the ejection's time:\n{dom}"
    );
    // The healthy endpoint's latency and SYN-RTT lines (the requests above went through it).
    let good_plot = &dom[dom
        .find(&format!("data-endpoint=\"{good}\" data-t0=\""))
        .unwrap()..];
    let good_plot = &good_plot[..good_plot.find("</svg>").unwrap()];
    for series in ["latency_p50_us", "syn_rtt_p50_us"] {
        assert!(
            good_plot.contains(&format!("data-series=\"{series}\"")),
            "{series} drawn for {good}:\n{good_plot}"
        );
    }
}
