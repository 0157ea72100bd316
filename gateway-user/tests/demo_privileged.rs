//! Privileged (root: the fault lab's network namespaces and iptables, the kernel observer):
//! `gateway demo`, as a newcomer runs it. Built only with the `demo` feature (the fault lab
//! compiled in): `cargo xtask test` runs it with `cargo test -p gateway-user --features demo
//! --test demo_privileged`, after the end-to-end tests of the production build. Without the
//! feature the file compiles to no tests (`#![cfg]` below, not `required-features`: cargo
//! refuses `--test '*'` when one target needs a feature, which stopped every end-to-end test).
//!
//! The proxy demo must show the gateway deciding about each fault it injects (blackhole,
//! refuse, slow accept, slow backend), keep every failure the clients see explained, print a
//! status page URL that serves the plots while it runs, end with its summary and exit 0; the
//! observer demo stays available behind `--observer`.

#![cfg(feature = "demo")]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use gateway_testkit::{gateway_bin, http::get_once, root::require_root};

/// A run of the shortened demo: 3 s warm-up, then 4 × (3 s broken + 2 s repaired).
const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

/// The demo, sent SIGINT if the test fails before it ended: it then removes its lab itself.
struct Interrupted(std::process::Child);

impl Drop for Interrupted {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            let _ = self.0.wait();
        }
    }
}

#[test]
fn privileged_demo_shows_the_gateway_deciding_about_each_fault_and_explains_every_failure() {
    require_root();
    let bin = gateway_bin!();
    let child = Command::new(bin.path())
        .args(["demo", "--fault-for", "3", "--recover-for", "2"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("gateway demo starts");
    let mut child = Interrupted(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let mut out = Vec::new();
    let mut page_checked = false;
    while let Ok(line) = rx.recv_timeout(DEMO_TIMEOUT.saturating_sub(started.elapsed())) {
        eprintln!("{line}");
        // Once the first fault is in, the page must serve the plots, from the host.
        if !page_checked && line.contains("⛔") {
            let url = out
                .iter()
                .find_map(|l: &String| l.split("http://").nth(1))
                .and_then(|rest| rest.split('/').next())
                .expect("the status page URL was printed before the first ejection");
            let addr: SocketAddr = url.parse().expect("host:port");
            let (status, page) =
                get_once(addr, "/", Duration::from_secs(5)).expect("the status page answers");
            assert_eq!(status, 200, "{page}");
            assert!(page.contains("<svg"), "no plot on the status page: {page}");
            let (status, json) = get_once(addr, "/status", Duration::from_secs(5)).unwrap();
            assert_eq!(status, 200);
            let v: serde_json::Value = serde_json::from_str(&json).expect("/status is JSON");
            let endpoints = v["clusters"][0]["endpoints"].as_array().expect("endpoints");
            assert_eq!(endpoints.len(), 4, "the demo's four upstreams: {v:#}");
            assert!(
                endpoints.iter().any(|e| e["history"]["changes"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())),
                "the ejection is in the plot's data: {v:#}"
            );
            page_checked = true;
        }
        out.push(line);
    }
    let status = child.0.wait().expect("gateway demo exits");
    let text = out.join("\n");
    assert!(page_checked, "no ejection was shown:\n{text}");
    assert!(status.success(), "gateway demo failed ({status}):\n{text}");
    // Each fault, its verdict line in the summary, explained.
    for fault in ["blackhole", "refuse", "slow accept", "slow backend"] {
        let line = out
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("✓ {fault} ")))
            .unwrap_or_else(|| panic!("no explained verdict for {fault}:\n{text}"));
        assert!(line.contains("upstream-"), "{line}");
    }
    // Live: kernel evidence with the ejections, deadlines, hedges, requests kept from failing.
    for needle in [
        "kernel observer attached",
        "connect deadlines measured from the kernel's SYN-RTT",
        "ejected refused",
        "RST received",
        "ejected slow_backend",
        "request kept from failing",
        "hedged",
        "504 response_timeout",
        "Summary",
        "0 unexplained",
    ] {
        assert!(
            text.contains(needle),
            "`{needle}` missing from the demo:\n{text}"
        );
    }
    assert!(
        !text.contains("UNEXPLAINED"),
        "a client saw a failure the gateway did not explain:\n{text}"
    );
}

#[test]
fn privileged_observer_demo_stays_available() {
    require_root();
    let out = Command::new(gateway_bin!().path())
        .args(["demo", "--observer", "--duration", "5"])
        .env_remove("RUST_LOG")
        .output()
        .expect("gateway demo --observer runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gateway demo --observer failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("What the kernel saw of each upstream"),
        "{text}"
    );
    assert!(text.contains("✓"), "{text}");
    assert!(!text.contains("✗"), "{text}");
}
