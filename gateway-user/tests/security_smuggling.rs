//! What a client or an upstream can make the gateway do (SECURITY.md): request smuggling
//! through conflicting framing or obsolete line folding, header injection through the
//! gateway's evidence headers, log injection through request paths, and a host the upstream
//! sees other than the one the gateway routed on (duplicate `Host`, an absolute-form target
//! beside a different `Host`, userinfo). Each case sends raw
//! bytes through the real proxy (in-process, loopback) to a raw upstream that records every
//! byte it receives, and asserts what reaches the upstream and what the client gets.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway_testkit::{
    config::base_config,
    http::raw_exchange,
    inprocess::{InProcess, gateway},
    ports::refused_addr,
    tempdir::temp_dir,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// A raw upstream: records every byte of every connection, answers each request head it can
/// see with `reply`, and keeps the connection open.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    /// The requests answered on each connection accepted so far (probes answer none).
    answered: Arc<Mutex<Vec<usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start(reply: &'static [u8]) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answered: Arc<Mutex<Vec<usize>>> = Arc::default();
        let (sink, counts) = (seen.clone(), answered.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counts = counts.clone();
                let index = {
                    let mut c = counts.lock().unwrap();
                    c.push(0);
                    c.len() - 1
                };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut pending = Vec::new();
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                            counts.lock().unwrap()[index] += 1;
                        }
                    }
                });
            }
        });
        Recorder {
            addr,
            seen,
            answered,
            task,
        }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

fn cluster(upstream: SocketAddr) -> String {
    format!(
        "[[routes]]\npath_prefix = \"/\"\ncluster = \"up\"\n\n[clusters.up]\nendpoints = [\"{upstream}\"]\n\n[clusters.up.retry]\nmax_retries = 0\n"
    )
}

async fn through(label: &str, reply: &'static [u8], request: &[u8]) -> (String, String, InProcess) {
    let up = Recorder::start(reply).await;
    let gw = gateway(label, &cluster(up.addr)).await;
    let answer = raw_exchange(gw.addr, request, Duration::from_secs(3)).await;
    // Let anything the gateway forwards arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = up.seen();
    (answer, seen, gw)
}

fn status(answer: &str) -> &str {
    answer.get(9..12).unwrap_or("")
}

/// Content-Length with Transfer-Encoding (in either order): hyper frames the request by
/// Transfer-Encoding alone, drops Content-Length and closes the connection after the response
/// (RFC 9112 section 6.1 allows this instead of a 400). What must hold either way: the upstream
/// gets exactly one request, framed once, and the bytes after the chunked body are never
/// taken as a request.
fn assert_not_smuggled(answer: &str, seen: &str) {
    let rejected = status(answer) == "400";
    if !rejected {
        assert_eq!(status(answer), "200", "answer: {answer:?}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "an ambiguous request closes the client connection: {answer:?}"
        );
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "one answer: {answer:?}"
        );
    }
    assert!(!seen.contains("/smuggled"), "smuggled: {seen:?}");
    let head = seen
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(
        !head.contains("content-length:"),
        "the conflicting content-length is not forwarded: {seen:?}"
    );
}

#[tokio::test]
async fn cl_te_conflict_smuggles_nothing() {
    let req = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    let (answer, seen, _gw) = through("cl-te", OK, req).await;
    assert_not_smuggled(&answer, &seen);
}

#[tokio::test]
async fn te_cl_conflict_smuggles_nothing() {
    // The classic TE.CL attack: a front end that honoured Content-Length would forward 4
    // bytes of the body and leave "GPOST ..." as the next request.
    let smuggled = "GPOST / HTTP/1.1\r\ncontent-type: x\r\ncontent-length: 15\r\n\r\nx=1";
    let req = format!(
        "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
        smuggled.len()
    );
    let req = req.as_bytes();
    let (answer, seen, _gw) = through("te-cl", OK, req).await;
    assert_not_smuggled(&answer, &seen);
    // The smuggled-looking bytes stay inside the one forwarded chunk: the upstream's stream is
    // one request head, then one chunk holding "GPOST ...", then the last chunk.
    if !seen.is_empty() {
        let (head, body) = seen.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("POST / HTTP/1.1\r\n"), "{seen:?}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{seen:?}"
        );
        assert_eq!(
            body,
            format!("{:X}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()),
            "the smuggled-looking bytes are one chunk of the one body, and nothing follows"
        );
    }
}

#[tokio::test]
async fn unknown_or_non_final_chunked_transfer_coding_is_rejected() {
    // `gzip, chunked`: hyper takes `chunked` off and leaves gzip on the body, which reached
    // the upstream coded with nothing saying so.
    for te in ["chunked, identity", "xchunked", "identity", "gzip, chunked"] {
        let req = format!("POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: {te}\r\n\r\n0\r\n\r\n");
        let (answer, seen, _gw) = through("te-bad", OK, req.as_bytes()).await;
        assert_eq!(
            status(&answer),
            "400",
            "te {te}: answer {answer:?}; upstream saw {seen:?}"
        );
        assert!(seen.is_empty(), "te {te}: upstream saw {seen:?}");
    }
}

#[tokio::test]
async fn duplicate_differing_content_lengths_are_rejected() {
    let req = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 5\r\n\r\nhello";
    let (answer, seen, _gw) = through("dup-cl", OK, req).await;
    assert_eq!(
        status(&answer),
        "400",
        "answer: {answer:?}; upstream saw {seen:?}"
    );
    assert!(seen.is_empty(), "upstream saw {seen:?}");
}

#[tokio::test]
async fn obs_fold_in_a_request_is_rejected() {
    let req = b"GET / HTTP/1.1\r\nhost: a\r\nx-folded: a\r\n transfer-encoding: chunked\r\n\r\n";
    let (answer, seen, _gw) = through("obs-fold", OK, req).await;
    assert_eq!(
        status(&answer),
        "400",
        "answer: {answer:?}; upstream saw {seen:?}"
    );
    assert!(seen.is_empty(), "upstream saw {seen:?}");
}

#[tokio::test]
async fn chunked_body_is_reframed_for_the_upstream() {
    // A well-formed chunked request: the upstream gets exactly one request, framed once.
    let req = b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (answer, seen, _gw) = through("chunked-ok", OK, req).await;
    assert_eq!(status(&answer), "200", "answer: {answer:?}");
    assert_eq!(
        seen.matches("HTTP/1.1\r\n").count(),
        1,
        "one request upstream: {seen:?}"
    );
    let lower = seen.to_ascii_lowercase();
    assert!(
        !(lower.contains("content-length:") && lower.contains("transfer-encoding:")),
        "the upstream request carries one framing header: {seen:?}"
    );
}

/// An upstream's response with both framing headers, whose `Content-Length` is not the
/// chunked body's length (an upstream that sends both is wrong about one of them): the
/// encoding frames it (RFC 9112 section 6.3), and the client gets the chunked body whole, with
/// no length. The gateway used to forward `Content-Length: 100` with the 3-byte body: the
/// client's response was cut short and its connection closed, while nginx 1.22 and HAProxy
/// 2.6 drop the length and answer in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_cl_te_conflict_does_not_reach_the_client_as_is() {
    let reply: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let (answer, _seen, gw) = through(
        "resp-cl-te",
        reply,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let head = head.to_ascii_lowercase();
    assert_eq!(status(&answer), "200", "answer: {answer:?}");
    assert!(
        !head.contains("content-length:"),
        "the upstream's length is not forwarded: {answer:?}"
    );
    assert!(
        body.contains("abc") && body.ends_with("\r\n0\r\n\r\n"),
        "the body, whole and chunked: {body:?}"
    );
    // curl over HTTP/1.1 and HTTP/2 (prior knowledge): the whole body, and curl's exit code
    // 0 (18 was "transfer closed with 97 bytes remaining to read").
    let url = format!("http://{}/", gw.addr);
    for flags in BOTH_PROTOCOLS {
        assert_eq!(curl_ok(flags, &url), b"abc", "curl {flags:?}");
    }
}

/// `reply` from a raw upstream behind a new gateway, asked for by curl over HTTP/1.1 and
/// HTTP/2: the gateway (its log), the upstream, and the two status codes.
async fn statuses_through(label: &str, reply: &'static [u8]) -> (InProcess, Recorder, [String; 2]) {
    let up = Recorder::start(reply).await;
    let gw = gateway(label, &cluster(up.addr)).await;
    let url = format!("http://{}/", gw.addr);
    let codes = BOTH_PROTOCOLS.map(|flags| {
        let args = [flags, &["-o", "/dev/null", "-w", "%{http_code}"][..]].concat();
        String::from_utf8_lossy(&curl_ok(&args, &url)).into_owned()
    });
    (gw, up, codes)
}

/// curl's HTTP/1.1 and HTTP/2 (prior knowledge).
const BOTH_PROTOCOLS: [&[&str]; 2] = [&["--http1.1"], &["--http2-prior-knowledge"]];

/// What curl with `args` printed for `url`; it must have succeeded (curl runs blocking: a
/// multi-threaded test).
fn curl_ok(args: &[&str], url: &str) -> Vec<u8> {
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .args(args)
            .arg(url)
            .output()
            .expect("curl")
    });
    assert!(
        out.status.success(),
        "curl {args:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Responses hyper parses but a client must not get as they are: a `204` with a length
/// (forwarded, HTTP/2 clients reset the stream: curl failed with 92), a transfer coding
/// besides `chunked` (`gzip, chunked` reached the client as gzip bytes with no
/// `Content-Encoding`), a status past 599. curl over HTTP/1.1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_responses_a_client_cannot_take_as_they_are() {
    let cases: [(&str, &'static [u8], &str); 3] = [
        (
            "resp-204-length",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            "204",
        ),
        (
            "resp-gzip-chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "502",
        ),
        (
            "resp-status-999",
            b"HTTP/1.1 999 Weird\r\ncontent-length: 0\r\n\r\n",
            "502",
        ),
    ];
    for (label, reply, want) in cases {
        let (gw, _up, codes) = statuses_through(label, reply).await;
        assert_eq!(codes, [want; 2], "{label}, curl over HTTP/1.1 and HTTP/2");
        // The attempt that got the refused answer says why, as the request does.
        if want == "502" {
            for l in gateway_testkit::inprocess::log_lines(&gw.log, 2) {
                assert_eq!(l["error"], "invalid_upstream_response", "{l}");
                assert_eq!(
                    l["attempt_errors"],
                    serde_json::json!(["invalid_upstream_response"]),
                    "{l}"
                );
            }
        }
    }
}

/// A length an upstream repeated (two equal lines, or one line listing it twice), which hyper
/// takes: the client gets one `content-length: 5`. Passed on as it came, HTTP/2 clients reset
/// the stream (curl failed with 92) while the access log said 200, and HTTP/1 ones saw two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_content_length_reaches_the_client_once() {
    let replies: [&'static [u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
    ];
    for reply in replies {
        let up = Recorder::start(reply).await;
        let gw = gateway("resp-length-twice", &cluster(up.addr)).await;
        let url = format!("http://{}/", gw.addr);
        for flags in BOTH_PROTOCOLS {
            let out = curl_ok(&[flags, &["-i"][..]].concat(), &url);
            let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
            let lengths: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("content-length:"))
                .collect();
            assert_eq!(lengths, ["content-length: 5"], "curl {flags:?}: {text}");
            assert!(text.ends_with("\r\n\r\nhello"), "curl {flags:?}: {text}");
        }
    }
}

/// A chunked response with trailers: the client gets it whole, the access log has it as
/// complete, and the upstream connection serves the next request. hyper writes the trailers
/// and asks for nothing more, so a response that ended only when its body said so after the
/// trailers was logged as cut short by its client (`client_closed`), and its connection
/// was dropped (a new upstream connection for each such response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_trailers_is_complete_and_its_connection_reused() {
    let up = Recorder::start(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n\
          5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    )
    .await;
    let gw = gateway("resp-trailers", &cluster(up.addr)).await;
    let url = format!("http://{}/", gw.addr);
    for flags in BOTH_PROTOCOLS {
        assert_eq!(curl_ok(flags, &url), b"hello", "curl {flags:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = gateway_testkit::inprocess::log_lines(&gw.log, 2);
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert!(
            l.get("incomplete").is_none() && l.get("aborted").is_none_or(|a| a == false),
            "{l}"
        );
    }
    let answered = up.answered.lock().unwrap().clone();
    assert!(
        answered.contains(&2),
        "one upstream connection for both requests: {answered:?} per connection"
    );
}

/// A gRPC response whose length-framed body breaks off: the gateway ends the call with
/// trailers of its own (`grpc-status`), which the client must be able to read. With the
/// upstream's `content-length` passed on, those trailers after a body shorter than the length
/// were a protocol violation, and nghttp reset the stream (PROTOCOL_ERROR) without the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_response_broken_off_ends_with_a_status_the_client_reads() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // The request's body (5 bytes), then half of a 1,000-byte response, and FIN.
                let _ = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await;
                let mut reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n\
                                  content-length: 1000\r\n\r\n"
                    .to_vec();
                reply.extend_from_slice(&[0u8; 500]);
                let _ = s.write_all(&reply).await;
                let _ = s.shutdown().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
            });
        }
    });
    let gw = gateway("grpc-broken-off", &cluster(up)).await;
    let dir = temp_dir("grpc-broken-off-body");
    let body = dir.join("message");
    std::fs::write(&body, [0u8, 0, 0, 0, 0]).unwrap();
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("nghttp")
            .args([
                "-v",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-d",
            ])
            .arg(&body)
            .arg(format!("http://{}/pkg.Svc/Call", gw.addr))
            .output()
            .expect("nghttp (nghttp2-client, installed by ./dev)")
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("PROTOCOL_ERROR") && text.contains("grpc-status:"),
        "the gateway's status, readable:\n{text}"
    );
}

#[tokio::test]
async fn upstream_obs_fold_response_is_rejected() {
    let reply: &[u8] = b"HTTP/1.1 200 OK\r\nx-a: a\r\n x-injected: 1\r\ncontent-length: 0\r\n\r\n";
    let (answer, _seen, _gw) = through(
        "resp-fold",
        reply,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), "502", "answer: {answer:?}");
    assert!(
        !answer.to_ascii_lowercase().contains("x-injected"),
        "{answer:?}"
    );
}

/// A response head with more header fields than hyper's table holds is refused (502), and the
/// answer says which limits it outgrew: hyper's own words ("message head is too large") said
/// the same of 101 short fields as of 256 KiB. One field fewer passes.
#[tokio::test]
async fn an_upstream_response_over_the_field_limit_is_refused_naming_the_limits() {
    let head = |fields: usize| -> &'static [u8] {
        let mut r = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
        for i in 1..fields {
            r.push_str(&format!("x-h{i}: v\r\n"));
        }
        r.push_str("\r\nok");
        Box::leak(r.into_bytes().into_boxed_slice())
    };
    let get = b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
    let (answer, _seen, _gw) = through("resp-fields-100", head(100), get).await;
    assert_eq!(status(&answer), "200", "100 fields: {answer:?}");
    let (answer, _seen, _gw) = through("resp-fields-101", head(101), get).await;
    assert_eq!(status(&answer), "502", "101 fields: {answer:?}");
    assert!(
        answer.contains("message head is too large (at most 100 header fields and 60 KiB)"),
        "{answer:?}"
    );
}

/// A response head past 60 KiB (one field of 200 KB here) is a 502 naming the limit, over
/// HTTP/1.1 and HTTP/2; 50 KiB passes. Passed on, a 200 KB field made curl fail (27) and
/// nghttp end the whole connection (`COMPRESSION_ERROR`), with the access log saying 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_past_60_kib_is_refused_and_50_kib_passes() {
    let head = |bytes: usize| -> &'static [u8] {
        let r = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-big: {}\r\n\r\nok",
            "a".repeat(bytes)
        );
        Box::leak(r.into_bytes().into_boxed_slice())
    };
    for (bytes, want) in [(50 * 1024, "200"), (200_000, "502")] {
        let (_gw, _up, codes) = statuses_through("resp-head-size", head(bytes)).await;
        assert_eq!(codes, [want; 2], "{bytes} B, curl over HTTP/1.1 and HTTP/2");
    }
}

/// An h2c upgrade is never tunnelled: tunnelled, it let a client open HTTP/2 straight to the
/// upstream behind one routed request, and send it any request past every route, rule and log
/// line ("h2c smuggling"). The upgrade headers are dropped and the request answered as a plain
/// one, whether or not `Connection` lists `HTTP2-Settings`; an upstream that switches
/// protocols all the same gets a 502, not a tunnel. Before, the gateway forwarded `Upgrade: h2c`
/// and tunnelled the upstream's 101.
#[tokio::test]
async fn an_h2c_upgrade_is_answered_as_a_plain_request_never_tunnelled() {
    for (label, connection) in [
        ("h2c-listed", "Upgrade, HTTP2-Settings, close"),
        ("h2c-unlisted", "Upgrade, close"),
    ] {
        let req = format!(
            "GET /public HTTP/1.1\r\nhost: a\r\nconnection: {connection}\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n"
        );
        let (answer, seen, _gw) = through(label, OK, req.as_bytes()).await;
        assert_eq!(status(&answer), "200", "{label}: {answer:?}");
        assert!(answer.ends_with("\r\n\r\nok"), "{label}: {answer:?}");
        let seen = seen.to_ascii_lowercase();
        for gone in ["upgrade", "http2-settings"] {
            assert!(
                !seen.contains(&format!("{gone}:")) && !seen.contains("connection: upgrade"),
                "{label}: the upstream got {gone}: {seen:?}"
            );
        }
    }
    let switches: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n";
    let req = b"GET /public HTTP/1.1\r\nhost: a\r\nconnection: upgrade, close\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let (answer, seen, _gw) = through("h2c-101", switches, req).await;
    assert_eq!(status(&answer), "502", "{answer:?}");
    assert!(!answer.contains("HTTP/1.1 101"), "{answer:?}");
    assert!(!seen.contains("PRI * HTTP/2.0"), "no tunnel: {seen:?}");
}

/// Upgrades other than WebSocket are tunnelled only to a cluster that lists them in
/// `upgrades` (`kubectl exec` switches to `SPDY/3.1`): listed, the upstream's 101 comes back
/// and bytes pass both ways; by default the same request reaches the upstream as a plain one,
/// and its 101 is a 502.
#[tokio::test]
async fn an_upgrade_a_cluster_lists_is_tunnelled_and_others_are_not() {
    let switches: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: SPDY/3.1\r\n\r\n";
    let req = b"POST /exec HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: SPDY/3.1\r\ncontent-length: 0\r\n\r\nthrough-the-tunnel";
    let up = Recorder::start(switches).await;
    let cfg = cluster(up.addr).replace(
        "[clusters.up.retry]",
        "upgrades = [\"websocket\", \"spdy/3.1\"]\n[clusters.up.retry]",
    );
    let gw = gateway("upgrade-listed", &cfg).await;
    let answer = raw_exchange(gw.addr, req, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("upgrade: spdy/3.1"),
        "{answer:?}"
    );
    let seen = wait_seen(&up, "through-the-tunnel").await;
    assert!(seen.ends_with("through-the-tunnel"), "the tunnel: {seen:?}");
    assert!(
        seen.to_ascii_lowercase().contains("upgrade: spdy/3.1"),
        "{seen:?}"
    );
    drop(gw);
    let (answer, seen, _gw) = through("upgrade-unlisted", switches, req).await;
    assert_eq!(status(&answer), "502", "{answer:?}");
    assert!(!seen.to_ascii_lowercase().contains("upgrade:"), "{seen:?}");
}

/// What `up` has recorded once it holds `what` (or after 3 s).
async fn wait_seen(up: &Recorder, what: &str) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let seen = up.seen();
        if seen.contains(what) || std::time::Instant::now() > until {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_upstream_cannot_forge_the_gateways_evidence_headers() {
    let reply: &[u8] = b"HTTP/1.1 200 OK\r\nx-gateway-error: upstream_host_died\r\nx-gateway-evidence: syns=9 synack=0\r\nx-gateway-endpoint: 10.9.9.9:1\r\nx-gateway-attempts: 7\r\ncontent-length: 2\r\n\r\nok";
    let (answer, _seen, _gw) = through(
        "forge",
        reply,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), "200", "answer: {answer:?}");
    assert!(
        !answer.to_ascii_lowercase().contains("x-gateway-"),
        "only the gateway writes x-gateway-* headers: {answer:?}"
    );
}

#[tokio::test]
async fn evidence_headers_carry_nothing_a_client_sent() {
    // A refused endpoint: the 502 carries the gateway's headers; the request's path, host and
    // headers try to get CR, LF or quotes into them.
    let refused = refused_addr();
    let gw = gateway("evidence", &cluster(refused)).await;
    let req = b"GET /a%0d%0ax-injected:%201?q=%22%0a HTTP/1.1\r\nhost: evil%0d%0ax-injected:1\r\nuser-agent: \"\r\n\r\n";
    let answer = raw_exchange(gw.addr, req, Duration::from_secs(5)).await;
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    assert!(status(&answer).starts_with('5'), "answer: {answer:?}");
    for line in head.lines().skip(1) {
        let lower = line.to_ascii_lowercase();
        assert!(
            !lower.starts_with("x-injected"),
            "injected header line: {line:?}"
        );
        if let Some(v) = lower.strip_prefix("x-gateway-") {
            assert!(
                v.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
                "gateway header with odd bytes: {line:?}"
            );
            assert!(
                !v.contains("evil") && !v.contains("%0d"),
                "client data in {line:?}"
            );
        }
    }
}

/// A request path can carry `"`, `\`, `%`-escapes and bytes above 0x7f (obs-text), but no
/// control byte (hyper refuses CR, LF, ESC, DEL and NUL in the request line with a 400). In
/// the plain access log a path cannot end its quoted field or start a new line; in the JSON
/// log it is one string value.
#[tokio::test]
async fn request_paths_cannot_forge_access_log_lines() {
    let up = Recorder::start(OK).await;
    for format in ["plain", "json"] {
        let dir = temp_dir(&format!("log-injection-{format}"));
        let log = dir.join("access.log");
        let text = base_config(&log)
            .replace("format = \"json\"", &format!("format = \"{format}\""))
            + &cluster(up.addr);
        let settings = gateway::config::load_str(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .settings;
        let handle = gateway::proxy::start(
            settings,
            Arc::new(gateway::signals::UserspaceOnly::new("test")),
        )
        .await
        .unwrap();
        let addr = handle.listen_addrs()[0];
        // Each tries to close the quoted path and add fields, or to start a new line. A path
        // has no space (the request line splits on it), so fields would have to be glued on.
        let forged: [&[u8]; 5] = [
            b"/a\"route=forged\"",
            b"/a\\\"\\",
            b"/a%22%0d%0a2026-01-01T00:00:00Z%20GET%20/forged",
            b"/a?q=\"}{\"route\":\"forged\"",
            b"/caf\xc3\xa9",
        ];
        // Requests the proxy handled (hyper answers unparsable heads itself: those are logged
        // as `- -`, with hyper's reason).
        let mut handled = 0;
        for path in forged {
            let mut req = b"GET ".to_vec();
            req.extend_from_slice(path);
            req.extend_from_slice(b" HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
            let answer = raw_exchange(addr, &req, Duration::from_secs(3)).await;
            assert!(
                status(&answer) == "200" || status(&answer) == "400",
                "{answer:?}"
            );
            let lower = answer.to_ascii_lowercase();
            if lower.contains("\r\nvia: ") || lower.contains("\r\nx-gateway-error: ") {
                handled += 1;
            }
        }
        assert!(
            handled >= 3,
            "the forged paths reached the proxy: {handled}"
        );
        // Control bytes in the request line never reach the log: hyper answers 400 first, and
        // the line of that 400 has no path.
        for ctl in *b"\x1b\x7f\r\x00" {
            let mut req = b"GET /x".to_vec();
            req.push(ctl);
            req.extend_from_slice(b"y HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
            let answer = raw_exchange(addr, &req, Duration::from_secs(3)).await;
            assert_eq!(status(&answer), "400", "control byte {ctl:#x}: {answer:?}");
        }
        let _ = handle.shutdown(Duration::from_secs(1)).await;
        // Every request is logged, the refused ones too.
        let requests = forged.len() + 4;
        // The access log is written by its own thread: wait for every request's line.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().filter(|l| !l.starts_with('#')).count() >= requests
                || std::time::Instant::now() > end
            {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines.len(),
            requests,
            "{format}: one line per request:\n{text}"
        );
        for line in &lines {
            assert!(
                !line.bytes().any(|b| b < 0x20 && b != b'\t'),
                "{format}: a control byte in {line:?}"
            );
            match format {
                "json" => {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
                    assert!(v["route"].as_str() != Some("forged"), "{line:?}");
                }
                _ => {
                    // Exactly four quotes (around the request and the user agent; six with
                    // the gateway's own `detail` of a refused one), and the fields after the
                    // request are the gateway's own.
                    let quotes = if line.contains(" detail=\"refused by") {
                        6
                    } else {
                        4
                    };
                    assert_eq!(line.matches('"').count(), quotes, "{line:?}");
                    let after = line.splitn(3, '"').nth(2).unwrap_or("");
                    assert_eq!(after.matches(" route=").count(), 1, "{line:?}");
                    assert!(!after.contains("forged"), "a forged field: {line:?}");
                }
            }
            assert!(
                !line.contains("GET /forged"),
                "a forged line start: {line:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn more_than_one_host_header_is_rejected() {
    let req = b"GET / HTTP/1.1\r\nhost: a.test\r\nhost: admin.internal\r\n\r\n";
    let (answer, seen, _gw) = through("dup-host", OK, req).await;
    assert_eq!(
        status(&answer),
        "400",
        "answer: {answer:?}; upstream saw {seen:?}"
    );
    assert!(answer.contains("more than one Host header"), "{answer:?}");
    assert!(seen.is_empty(), "upstream saw {seen:?}");
}

/// A `Host` with a byte no host and port has is a 400 (RFC 9112 section 3.2: "an invalid field
/// value") and nothing is forwarded; an empty one, uppercase, a trailing dot and `_` are
/// allowed. Before, `Host: a b` and `Host: user@a` went upstream as they came.
#[tokio::test]
async fn a_host_that_is_no_host_and_port_is_rejected() {
    let with_host =
        |host: &str| format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    let bad = [
        "a b",
        "user@a.test",
        "a.test/admin",
        "a.test\\x",
        "caf\u{e9}.test",
    ];
    for host in bad {
        let (answer, seen, _gw) = through("bad-host", OK, with_host(host).as_bytes()).await;
        assert_eq!(status(&answer), "400", "{host}: {answer:?}");
        assert!(answer.contains("no host[:port] has"), "{host}: {answer:?}");
        assert!(seen.is_empty(), "{host}: upstream saw {seen:?}");
    }
    let good = [
        "",
        "a.test:8080",
        "[::1]:80",
        "10.0.0.1",
        "A.Test.",
        "my_host.test",
    ];
    for host in good {
        let (answer, _seen, _gw) = through("good-host", OK, with_host(host).as_bytes()).await;
        assert_eq!(status(&answer), "200", "{host:?}: {answer:?}");
    }
}

/// RFC 9112 section 3.2.2: with an absolute-form target, the target's host is the request's;
/// the upstream is sent that one (what `gateway_host` and the routes matched), never the
/// client's different `Host`.
#[tokio::test]
async fn an_absolute_form_target_is_the_host_the_upstream_sees() {
    let req = b"GET http://api.example.com/x HTTP/1.1\r\nhost: admin.internal\r\n\r\n";
    let (answer, seen, _gw) = through("abs-form", OK, req).await;
    assert_eq!(status(&answer), "200", "answer: {answer:?}");
    let head = seen.to_ascii_lowercase();
    assert!(head.starts_with("get /x http/1.1\r\n"), "{seen:?}");
    assert_eq!(head.matches("\r\nhost: ").count(), 1, "{seen:?}");
    assert!(head.contains("\r\nhost: api.example.com\r\n"), "{seen:?}");
    assert!(!head.contains("admin.internal"), "{seen:?}");
    let req = b"GET http://user@api.example.com/x HTTP/1.1\r\nhost: api.example.com\r\n\r\n";
    let (answer, seen, _gw) = through("userinfo", OK, req).await;
    assert_eq!(status(&answer), "400", "answer: {answer:?}");
    assert!(seen.is_empty(), "upstream saw {seen:?}");
}

/// An HTTP/1.0 request without `Host` (HAProxy's default `option httpchk` sends one) goes
/// upstream as HTTP/1.1, which needs a `Host` (RFC 9112 section 3.2): it names the endpoint,
/// as nginx's does (it went without one, and the upstream's 400 read as its answer).
#[tokio::test]
async fn an_http10_request_without_host_reaches_the_upstream_with_one() {
    let (answer, seen, _gw) = through("http10", OK, b"OPTIONS / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&answer), "200", "answer: {answer:?}");
    let head = seen.to_ascii_lowercase();
    assert!(head.starts_with("options / http/1.1\r\n"), "{seen:?}");
    assert_eq!(head.matches("\r\nhost: 127.0.0.1:").count(), 1, "{seen:?}");
}

/// An HTTP/1.0 client that asks for keep-alive, answered with a body of no length (chunked
/// upstream; HTTP/1.0 has no chunked coding), is told `Connection: close`, since only the
/// close can end that body. It was told `keep-alive`, then closed on. With a length, it keeps
/// its connection.
#[tokio::test]
async fn an_http10_keep_alive_response_ended_by_the_close_says_close() {
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let req = b"GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n";
    let (answer, _, _gw) = through("http10-close", CHUNKED, req).await;
    let lower = answer.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.0 200"), "{answer:?}");
    assert!(lower.contains("\r\nconnection: close\r\n"), "{answer:?}");
    assert!(!lower.contains("keep-alive"), "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer:?}");
    // With a length the connection is kept: the answer says so and the read runs to its limit.
    let (answer, _, _gw) = through("http10-keep", OK, req).await;
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("\r\nconnection: keep-alive\r\n"),
        "{answer:?}"
    );
}

/// `Connection` may name any header as hop-by-hop, and the gateway removes those; naming the
/// request ID's header does not take the gateway's ID off the request it sends upstream.
#[tokio::test]
async fn connection_cannot_strip_the_gateways_request_id() {
    let req =
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: x-request-id, x-other\r\nx-other: 1\r\n\r\n";
    let (answer, seen, _gw) = through("conn-id", OK, req).await;
    assert_eq!(status(&answer), "200", "answer: {answer:?}");
    let head = seen.to_ascii_lowercase();
    assert!(head.contains("\r\nx-request-id: "), "{seen:?}");
    assert!(!head.contains("x-other"), "named in Connection: {seen:?}");
}

/// curl's status code for `url`, with `flags` (curl runs blocking: a multi-threaded test).
fn curl_code(flags: &[&str], url: &str) -> String {
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(flags)
            .arg(url)
            .output()
            .expect("curl")
    });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A path with a `.` or `..` segment chose its route by the raw path while the upstream
/// resolves it: `/public/../admin` reached `/admin` through the route of `/public/`. It is
/// refused, in every spelling some upstream resolves (`%2e`, `%2f` between segments, `..;`),
/// over HTTP/1.1 and HTTP/2, by curl with `--path-as-is` (which sends the path unresolved);
/// names that only contain dots pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_with_dot_segments_is_refused() {
    let up = Recorder::start(OK).await;
    let gw = gateway("dot-segments", &cluster(up.addr)).await;
    let curl = |path: &str, h2: bool| {
        let flags: &[&str] = if h2 {
            &["--path-as-is", "--http2-prior-knowledge"]
        } else {
            &["--path-as-is"]
        };
        curl_code(flags, &format!("http://{}{path}", gw.addr))
    };
    for h2 in [false, true] {
        for path in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public%2f..%2fadmin",
            "/public/..;/admin",
            "/./admin",
        ] {
            let code = curl(path, h2);
            assert_eq!(code, "400", "{path} (HTTP/2: {h2})");
        }
        assert!(!up.seen().contains("admin"), "upstream saw {:?}", up.seen());
        for path in ["/.well-known/x", "/a/.../b", "/v1.2/x..y"] {
            let code = curl(path, h2);
            assert_eq!(code, "200", "{path} (HTTP/2: {h2})");
        }
    }
}

/// HTTP/2 requests had no limit on their header fields but the header list's size, in which
/// HPACK makes a repeated field cost one byte on the wire: 3,000 `x: y` per request held
/// 543 MB of the gateway for 7.2 MB sent. They get what HTTP/1 requests get: at most 100
/// fields, else 431, and nothing reaches the upstream. curl over HTTP/2 with prior knowledge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_with_too_many_header_fields_is_refused() {
    let up = Recorder::start(OK).await;
    let gw = gateway("h2-many-headers", &cluster(up.addr)).await;
    let curl = |n: usize| {
        let headers: Vec<String> = (0..n).map(|i| format!("x-h{i}: y")).collect();
        let mut flags = vec!["--http2-prior-knowledge"];
        for h in &headers {
            flags.extend(["-H", h.as_str()]);
        }
        curl_code(&flags, &format!("http://{}/", gw.addr))
    };
    assert_eq!(curl(300), "431");
    assert!(up.seen().is_empty(), "upstream saw {:?}", up.seen());
    // curl adds user-agent and accept; the gateway's own headers do not count.
    assert_eq!(curl(90), "200");
}

/// HTTP/2 clients send each cookie as a field of its own (browsers do): 150 of them count as
/// the one `Cookie` line they would be over HTTP/1, within the 100 fields, and an HTTP/1.1
/// upstream gets them as that one line, joined with "; " (RFC 9113 section 8.2.3; many
/// servers read only the first `Cookie` line). curl over HTTP/2 sends the 150 fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_fields_count_as_one_and_reach_an_http1_upstream_as_one_line() {
    let up = Recorder::start(OK).await;
    let gw = gateway("h2-cookies", &cluster(up.addr)).await;
    let cookies: Vec<String> = (0..150).map(|i| format!("cookie: c{i}={i}")).collect();
    let mut flags = vec!["--http2-prior-knowledge"];
    for c in &cookies {
        flags.extend(["-H", c.as_str()]);
    }
    assert_eq!(curl_code(&flags, &format!("http://{}/", gw.addr)), "200");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let head = up.seen().to_ascii_lowercase();
    assert_eq!(head.matches("\r\ncookie: ").count(), 1, "{head}");
    let joined: Vec<String> = (0..150).map(|i| format!("c{i}={i}")).collect();
    assert!(
        head.contains(&format!("\r\ncookie: {}\r\n", joined.join("; "))),
        "{head}"
    );
}

/// An upstream body that breaks its framing (a chunk size that is not hex) is an invalid
/// response, logged with what was wrong; it was logged as `upstream_reset` with no detail,
/// which blames the path.
#[tokio::test]
async fn an_upstream_body_with_broken_framing_is_logged_as_an_invalid_response() {
    const BAD_CHUNK: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
    let (_answer, _seen, gw) =
        through("bad-chunk", BAD_CHUNK, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let l = &gateway_testkit::inprocess::log_lines(&gw.log, 1)[0];
    assert_eq!(l["error"], "invalid_upstream_response", "{l}");
    assert!(
        l["detail"].as_str().is_some_and(|d| d.contains("chunk")),
        "{l}"
    );
    let admin = gw.handle.admin_addr().expect("admin listener");
    // Async: this runtime has one thread, which the gateway needs to answer.
    let c = gateway_testkit::http::client();
    let m = gateway_testkit::http::get(&c, admin, "/metrics").await.body;
    assert_eq!(
        gateway_testkit::admin::value(
            &m,
            "gateway_responses_incomplete_total",
            &[("reason", "invalid_upstream_response")]
        ),
        1.0,
        "{m}"
    );
}
