//! What an HTTP/2 client can make the gateway do (SECURITY.md), with Python's `h2` (PyPI, in
//! the venv `./dev` installs) as the client, speaking HTTP/2 with prior knowledge to the
//! gateway's plain listener:
//!
//! - rapid reset (CVE-2023-44487): a client that opens streams and resets them before their
//!   response makes the gateway start an upstream request for each, at no cost to itself. h2
//!   turns away resets that come before a stream is accepted; these tests wait for each batch
//!   to be accepted first, as the paced variants of the attack do. The upstream answers after
//!   200 ms, so every reset stream was still waiting for it;
//! - a request with neither `:authority` nor `Host`;
//! - a header value with a space or tab at either end (malformed in HTTP/2).

use std::time::Duration;

use gateway_testkit::{
    admin::{metrics, value},
    inprocess::gateway,
    peers::{H2_RESET_CLIENT, run_python},
    upstream::Upstream,
};

/// A gateway in front of a testkit upstream (`/delay/200` answers after 200 ms), and
/// [`H2_RESET_CLIENT`] run against it with `args` after the host and port; its JSON and the
/// gateway's count of connections closed for resetting too many streams.
async fn reset_run(label: &str, args: &[&str]) -> (serde_json::Value, f64, Upstream) {
    reset_run_with(label, "", args).await
}

/// [`reset_run`] with `downstream` in the gateway's `[router.downstream]`.
async fn reset_run_with(
    label: &str,
    downstream: &str,
    args: &[&str],
) -> (serde_json::Value, f64, Upstream) {
    let up = Upstream::start(label).await;
    let gw = gateway(
        label,
        &format!(
            "[router.downstream]\n{downstream}\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let mut argv = vec!["127.0.0.1".to_owned(), gw.addr.port().to_string()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let dir = gw.dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_python(
            &dir,
            "h2_resets.py",
            H2_RESET_CLIENT,
            &argv,
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    let floods = value(
        &metrics(admin),
        "gateway_client_http2_reset_floods_total",
        &[],
    );
    (out, floods, up)
}

/// 5,000 streams in batches of 50, each batch reset 30 ms after it was sent: before the fix
/// all 5,000 reached the upstream on a connection that stayed open. Now the connection is
/// closed once half of its first 500 streams were reset early (250, so 300 streams at best),
/// and the closure is counted and logged. The gateway sees a reset only once its connection
/// task gets to it: on a loaded machine the client sends a batch or two more first (350
/// streams in 4 of 12 runs with both CPUs busy), so the bound is the 500 streams the rule
/// watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_resets_its_streams_early_is_closed() {
    let (out, floods, up) = reset_run("rapid-reset", &["5000", "50", "0.03", "1"]).await;
    let opened = out["opened"].as_u64().unwrap();
    assert!(
        out["ended"].is_string(),
        "the connection outlived 5,000 streams reset early: {out}"
    );
    assert!(opened <= 500, "closed only after {opened} streams: {out}");
    assert_eq!(floods, 1.0, "{out}");
    // Every stream it let through had reached the upstream, and no more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(up.hits() <= 500, "{} requests upstream: {out}", up.hits());
}

/// The rule is a setting: with `http2_premature_reset_streams = 0`, 1,000 streams reset early
/// all go through on one connection that stays open (for clients that cancel most of what they
/// ask; the default closes it within 500), and with 40 the connection is closed after its 20th
/// premature reset, a batch or two later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rapid_reset_rule_is_a_setting() {
    let (out, floods, up) = reset_run_with(
        "rapid-reset-off",
        "http2_premature_reset_streams = 0",
        &["1000", "50", "0.03", "1"],
    )
    .await;
    assert_eq!(
        (&out["opened"], &out["ended"], floods),
        (&serde_json::json!(1000), &serde_json::Value::Null, 0.0),
        "{out}"
    );
    assert!(up.hits() > 500, "{} requests upstream: {out}", up.hits());
    let (out, floods, _up) = reset_run_with(
        "rapid-reset-40",
        "http2_premature_reset_streams = 40",
        &["5000", "10", "0.03", "1"],
    )
    .await;
    let opened = out["opened"].as_u64().unwrap();
    assert!(out["ended"].is_string(), "not closed: {out}");
    assert!(opened <= 60, "closed only after {opened} streams: {out}");
    assert_eq!(floods, 1.0, "{out}");
}

/// Resets that come with their streams, HEADERS and RST_STREAM in one write, are read by h2
/// before the gateway accepts the streams, and h2 closes a connection once it holds 20 such
/// (GOAWAY `ENHANCE_YOUR_CALM`): on a busy host the paced batches above arrive so too, and CI
/// closed a connection whose rule was off. Now h2's limit is the rule's, and its closures are
/// counted and logged as the rule's. With the rule off, 150 streams reset in one write (below
/// the 200 concurrent streams, beyond which h2 refuses them) leave the connection open; with
/// 40 (closed at 20 resets), 100 in one write close it, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_read_before_their_streams_were_accepted_follow_the_rule() {
    let (out, floods, _up) = reset_run_with(
        "pending-resets-off",
        "http2_premature_reset_streams = 0",
        &["150", "150", "0", "1"],
    )
    .await;
    assert_eq!(
        (&out["opened"], &out["ended"], floods),
        (&serde_json::json!(150), &serde_json::Value::Null, 0.0),
        "{out}"
    );
    let (out, floods, _up) = reset_run_with(
        "pending-resets-40",
        "http2_premature_reset_streams = 40",
        &["100", "100", "0", "1"],
    )
    .await;
    assert_eq!(
        (&out["ended"], floods),
        (&serde_json::json!("goaway 11"), 1.0),
        "{out}"
    );
}

/// A client that cancels one stream in three (a deadline that often expires) and reads the
/// rest is served to the end: 600 streams, 200 of them reset early, on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_cancels_some_streams_is_not_closed() {
    // Batches of 3: one reset, two read.
    let (out, floods, _up) = reset_run("some-resets", &["600", "3", "0.03", "3"]).await;
    assert_eq!(out["opened"], 600, "{out}");
    assert_eq!(out["reset"], 200, "{out}");
    assert_eq!(out["answered"], 400, "{out}");
    assert_eq!(out["ended"], serde_json::Value::Null, "{out}");
    assert_eq!(floods, 0.0, "{out}");
}

/// An HTTP/2 request with neither `:authority` nor `Host` went upstream as HTTP/1.1 without
/// `Host`, and the upstream's 400 read as the upstream's answer. It is the gateway's 400 now,
/// as for HTTP/1.1 without `Host`, and nothing reaches the upstream. Python's `h2` sends it.
/// Sends one GET with the header list `headers` (JSON: `[[name, value], ...]`, unchecked) over
/// HTTP/2 to the gateway on `port`; prints the response's status and `x-gateway-error`, or
/// how the stream or connection ended.
const RAW_H2_CLIENT: &str = r#"
import json, socket, sys
import h2.config, h2.connection, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
# h2 refuses to send malformed requests unless told not to check its headers.
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
c.initiate_connection()
c.send_headers(1, [tuple(h) for h in json.loads(sys.argv[2])], end_stream=True)
s.sendall(c.data_to_send())
out = {}
while "status" not in out and "reset" not in out:
    d = s.recv(65536)
    if not d:
        out["closed"] = True
        break
    for e in c.receive_data(d):
        if isinstance(e, h2.events.ResponseReceived):
            h = dict(e.headers)
            out = {"status": h[b":status"].decode(), "error": h.get(b"x-gateway-error", b"").decode()}
        elif isinstance(e, h2.events.StreamReset):
            out["reset"] = int(e.error_code)
        elif isinstance(e, h2.events.ConnectionTerminated):
            out["goaway"] = int(e.error_code)
    s.sendall(c.data_to_send())
print(json.dumps(out))
"#;

/// [`RAW_H2_CLIENT`]'s answer for `headers` through a gateway in front of `up`.
async fn raw_h2(label: &str, up: &Upstream, headers: serde_json::Value) -> serde_json::Value {
    let gw = gateway(
        label,
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    )
    .await;
    let port = gw.addr.port().to_string();
    let dir = gw.dir.clone();
    tokio::task::spawn_blocking(move || {
        run_python(
            &dir,
            "raw_h2.py",
            RAW_H2_CLIENT,
            &[&port, &headers.to_string()],
            Duration::from_secs(20),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_without_authority_or_host_is_refused() {
    let up = Upstream::start("no-authority").await;
    let headers = serde_json::json!([[":method", "GET"], [":scheme", "http"], [":path", "/x"]]);
    let out = raw_h2("no-authority", &up, headers).await;
    assert_eq!(out["status"], "400", "{out}");
    assert_eq!(out["error"], "bad_request", "{out}");
    assert_eq!(up.hits(), 0);
}

/// RFC 9113 section 8.2.1: a field value that starts or ends with a space or a tab makes the
/// request malformed, and an intermediary must not forward it. The upstream would get it as
/// it came (an HTTP/2 upstream), or with the space folded away (HTTP/1.1), and a strict one's
/// refusal would read as the upstream's failure. h2 (the crate) checks only for CR, LF and NUL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_header_value_with_surrounding_whitespace_is_refused() {
    let up = Upstream::start("h2-whitespace").await;
    let base = [
        [":method", "GET"],
        [":scheme", "http"],
        [":authority", "test.local"],
        [":path", "/x"],
    ];
    let with = |name: &str, value: &str| {
        let mut h: Vec<[&str; 2]> = base.to_vec();
        h.push([name, value]);
        serde_json::json!(h)
    };
    let out = raw_h2("h2-ok", &up, with("x-ok", "a b")).await;
    assert_eq!(out["status"], "200", "an inner space is fine: {out}");
    assert_eq!(up.hits(), 1);
    for value in [" a", "a ", "\ta", "a\t"] {
        let out = raw_h2("h2-whitespace", &up, with("x-padded", value)).await;
        assert_eq!(out["status"], "400", "{value:?}: {out}");
        assert_eq!(out["error"], "bad_request", "{value:?}: {out}");
    }
    assert_eq!(up.hits(), 1, "nothing malformed was forwarded");
}
