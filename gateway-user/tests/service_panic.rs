//! A panic in the real binary (a request to the path a debug build's failpoint panics on,
//! `GATEWAY_DEBUG_PANIC_PATH`): one `error` line of the JSON log, with the thread and the
//! source location, and `gateway_panics_total`; the connection it came on ends, and the worker
//! serves on, also with a stderr nobody reads.
//!
//! Before, Rust's own hook wrote the message to stderr on the worker's thread, as plain text
//! in a JSON log: with the pipe full, the worker stopped there, and every connection on it
//! waited. Nothing counted panics. Unprivileged: `[observer] mode = "off"`, loopback only.
//! Debug builds only: a release build has no failpoint.
#![cfg(debug_assertions)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use gateway_testkit::{
    admin::{metrics, value},
    gateway_bin,
    http::get_once,
    peers::curl_codes,
    process::GatewayProcess,
    tempdir::temp_dir,
    upstream::BlockingUpstream,
};

/// Malformed requests sent while stderr is held, each logging a line of about 170 bytes at
/// `debug`: several times a 64 KiB pipe, well within the log's queue of 8,192 lines.
const FLOOD: usize = 2_000;

/// One connection with a malformed request, answered `400`.
fn malformed(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"BLAH\r\n\r\n").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("an answer within 3 s");
    assert!(got.starts_with(b"HTTP/1.1 400"), "{got:?}");
}

/// `workers` workers, the log in `format`.
fn config(name: &str, upstream: SocketAddr, workers: usize, format: &str) -> PathBuf {
    let cfg = temp_dir(name).join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[router]\nlisten = [\"127.0.0.1:0\"]\nworkers = {workers}\ndrain_delay_ms = 0\n\n\
             [router.upstream]\nendpoints = [\"{upstream}\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [access_log]\noutput = \"off\"\n\n[observer]\nmode = \"off\"\n\n\
             [log]\nformat = \"{format}\"\n"
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn a_panic_is_one_json_error_line_and_a_count_and_its_worker_serves_on() {
    let up = BlockingUpstream::start();
    let cfg = config("panic", up.addr, 1, "json");
    let mut cmd = gateway_bin!().run(&cfg);
    cmd.env("RUST_LOG", "info,gateway::proxy::server=debug")
        .env("GATEWAY_DEBUG_PANIC_PATH", "/boom");
    let gw = GatewayProcess::spawn(cmd);
    gw.stall_stderr();
    for _ in 0..FLOOD {
        malformed(gw.addr);
    }

    // The connection ends with no response (curl: 000, an empty reply), at once.
    let url = |p: &str| format!("http://{}{p}", gw.addr);
    assert_eq!(curl_codes(&url("/boom"), 1, &["--max-time", "3"]), ["000"]);
    // The one worker serves on.
    assert_eq!(curl_codes(&url("/"), 3, &["--max-time", "3"]), ["200"; 3]);
    assert_eq!(value(&metrics(gw.admin), "gateway_panics_total", &[]), 1.0);

    gw.resume_stderr();
    let line = gw.expect_line(
        &["panic: GATEWAY_DEBUG_PANIC_PATH /boom"],
        Duration::from_secs(5),
    );
    let json: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON line ({e}): {line}"));
    assert_eq!(json["level"], "ERROR", "{line}");
    assert_eq!(json["thread"], "gateway-w0", "{line}");
    assert!(
        json["location"]
            .as_str()
            .is_some_and(|l| l.contains("failpoint.rs:")),
        "{line}"
    );
    assert!(
        !gw.contains("panicked at"),
        "Rust's own panic message too:\n{}",
        gw.text()
    );
}

/// A worker whose accept loop died would leave its socket in the kernel's reuseport group,
/// where a share of the new connections would wait with nobody accepting, and `/readyz` 200.
/// The gateway drains and exits non-zero instead, for its service manager to restart it.
#[test]
fn a_worker_whose_accept_loop_panics_makes_the_gateway_drain_and_exit_non_zero() {
    let up = BlockingUpstream::start();
    let cfg = config("panic-accept", up.addr, 2, "text");
    let mut cmd = gateway_bin!().run(&cfg);
    cmd.env("GATEWAY_DEBUG_PANIC_ACCEPT", "1");
    let mut gw = GatewayProcess::spawn(cmd);
    // The worker that accepts it panics: this connection is lost with it.
    let _ = get_once(gw.addr, "/", Duration::from_secs(3));
    let status = gw.wait(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "{status:?}: still running, or not the exit of an error:\n{}",
        gw.text()
    );
    gw.wait_output(Duration::from_secs(5));
    for said in [
        "panic: GATEWAY_DEBUG_PANIC_ACCEPT",
        "a worker died of a panic: draining, to exit",
        "worker 0 died of a panic; drained and exited",
    ] {
        assert!(
            gw.contains(said) || gw.contains(&said.replace("worker 0", "worker 1")),
            "no {said:?} in:\n{}",
            gw.text()
        );
    }
}
