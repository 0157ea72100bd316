//! HTTP/2 rapid reset (CVE-2023-44487, SECURITY.md): a client that opens streams and resets
//! them before their response makes the gateway start an upstream request for each, at no
//! cost to itself. h2 turns away resets that come before a stream is accepted; these tests
//! wait for each batch to be accepted first, as the paced variants of the attack do. The
//! client is Python's `h2` (PyPI, in the venv `./dev` installs), speaking HTTP/2 with prior
//! knowledge to the gateway's plain listener; the upstream answers after 200 ms, so every
//! reset stream was still waiting for it.

use std::time::Duration;

use gateway_testkit::{
    admin::{metrics, value},
    inprocess::gateway,
    peers::run_python,
    upstream::Upstream,
};

/// Opens `total` streams in batches of `batch`, waits `pause` seconds for the gateway to
/// accept each batch, resets every `reset_every`-th stream of it (CANCEL) and reads the
/// others' responses, and goes on until the connection ends. Prints what it saw as JSON.
const CLIENT: &str = r#"
import json, select, socket, sys, time
import h2.config, h2.connection, h2.errors, h2.events
host, port, total, batch, pause, reset_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
s = socket.create_connection((host, port))
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection(); s.sendall(c.data_to_send())
out = {"opened": 0, "reset": 0, "answered": 0, "ended": None}
kept = set()
def pump(wait):
    deadline = time.time() + wait
    while out["ended"] is None:
        left = deadline - time.time()
        if not select.select([s], [], [], max(left, 0))[0]:
            if left <= 0: return
            continue
        try:
            d = s.recv(65536)
        except OSError as e:
            out["ended"] = "error: %s" % e; return
        if not d:
            out["ended"] = "closed"; return
        for e in c.receive_data(d):
            if isinstance(e, h2.events.ConnectionTerminated):
                out["ended"] = "goaway %d" % e.error_code
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id in kept:
                out["answered"] += 1
        s.sendall(c.data_to_send())
try:
    while out["opened"] < total and out["ended"] is None:
        ids = []
        for _ in range(batch):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "%s:%d" % (host, port)), (":path", "/delay/200")], end_stream=True)
            out["opened"] += 1
            if out["opened"] % reset_every == 0: ids.append(sid)
            else: kept.add(sid)
        s.sendall(c.data_to_send())
        pump(pause)
        for sid in ids:
            c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL); out["reset"] += 1
        s.sendall(c.data_to_send())
    # What is still to come: the kept streams' responses, or the connection's end.
    pump(1.0)
except OSError as e:
    out["ended"] = out["ended"] or "error: %s" % e
print(json.dumps(out))
"#;

fn floods(admin: std::net::SocketAddr) -> f64 {
    value(
        &metrics(admin),
        "gateway_client_http2_reset_floods_total",
        &[],
    )
}

/// 5,000 streams in batches of 50, each batch reset 30 ms after it was sent: before the fix
/// all 5,000 reached the upstream on a connection that stayed open. Now the connection is
/// closed once half of its first 500 streams were reset early, so the upstream sees at most
/// that many and a batch, and the closure is counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_resets_its_streams_early_is_closed() {
    let up = Upstream::start("rapid-reset").await;
    let gw = gateway(
        "rapid-reset",
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let port = gw.addr.port().to_string();
    let dir = gw.dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            &dir,
            "rapid_reset.py",
            CLIENT,
            &["127.0.0.1", &port, "5000", "50", "0.03", "1"],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    let opened = out["opened"].as_u64().unwrap();
    assert!(
        out["ended"].is_string(),
        "the connection outlived 5,000 streams reset early: {out}"
    );
    assert!(opened <= 300, "closed only after {opened} streams: {out}");
    assert_eq!(floods(admin), 1.0, "{out}");
    // Every stream it let through had reached the upstream, and no more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(up.hits() <= 300, "{} requests upstream: {out}", up.hits());
}

/// A client that cancels one stream in three (a deadline that often expires) and reads the
/// rest is served to the end: 600 streams, 200 of them reset early, on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_cancels_some_streams_is_not_closed() {
    let up = Upstream::start("some-resets").await;
    let gw = gateway(
        "some-resets",
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let port = gw.addr.port().to_string();
    let dir = gw.dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            &dir,
            "some_resets.py",
            CLIENT,
            // Batches of 3: one reset, two read.
            &["127.0.0.1", &port, "600", "3", "0.03", "3"],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert_eq!(out["opened"], 600, "{out}");
    assert_eq!(out["reset"], 200, "{out}");
    assert_eq!(out["answered"], 400, "{out}");
    assert_eq!(out["ended"], serde_json::Value::Null, "{out}");
    assert_eq!(floods(admin), 0.0, "{out}");
}
