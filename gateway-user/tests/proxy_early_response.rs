//! An upstream that answers before it has read the whole request (`413` for a body too large,
//! `401` before an upload) and closes: its kernel resets the connection on the rest of the
//! body, and hyper's next write failed. The client got `502 upstream_reset` though the
//! upstream had answered (4 of 5 times for a 3 MB upload over HTTP/1.1, 22 of 30 for a 20 MB
//! one over HTTP/2, in a black-box test). Now the gateway reads on after such a write failure,
//! and the client gets the upstream's answer: curl over HTTP/1.1, nghttp over HTTP/2.

use std::net::SocketAddr;

use gateway_testkit::{inprocess::gateway, tempdir::temp_dir};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// Uploads per protocol.
const ROUNDS: usize = 20;

/// Uploads of the 40 that may still get a `502`: about 1 in 150 did in this test, a race not
/// yet understood (hyper did not read again after the failed write). Without the fix, 4 of 20
/// over HTTP/1.1 and 22 of 30 over HTTP/2 did.
const TOLERATED: usize = 2;

/// Answers each connection's request head with `413` and closes, the body unread.
async fn answers_early() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\
                          connection: close\r\n\r\nbig",
                    )
                    .await;
                // Dropped with the body unread: the kernel answers the rest with a reset.
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_answer_before_the_end_of_the_body_reaches_the_client() {
    let up = answers_early().await;
    let gw = gateway(
        "early-response",
        &format!("[router.upstream]\nendpoints = [\"{up}\"]\n"),
    )
    .await;
    let dir = temp_dir("early-response-body");
    let body = dir.join("body");
    std::fs::write(&body, vec![b'x'; 3 * 1024 * 1024]).unwrap();
    let url = format!("http://{}/upload", gw.addr);
    let data = format!("@{}", body.display());
    let mut codes = Vec::new();
    for _ in 0..ROUNDS {
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new("curl")
                .args([
                    "-s",
                    "--max-time",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .args(["-X", "PUT", "--data-binary", &data, &url])
                .output()
                .expect("curl")
        });
        codes.push(format!("h1:{}", String::from_utf8_lossy(&out.stdout)));
    }
    // nghttp (nghttp2's client) over HTTP/2: the response, then `RST_STREAM(NO_ERROR)` for
    // the rest of the body, as RFC 9113 section 8.1 has a server end a request it answered
    // early. (Debian's curl 7.88 takes that reset for a failure of the exchange.)
    for _ in 0..ROUNDS {
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new("nghttp")
                .args(["-v", "-d"])
                .arg(&body)
                .args(["-H", ":method: PUT", &url])
                .output()
                .expect("nghttp (nghttp2-client, installed by ./dev)")
        });
        let text = String::from_utf8_lossy(&out.stdout);
        let status = text
            .lines()
            .find_map(|l| l.split(":status: ").nth(1))
            .unwrap_or("none");
        // The gateway's `RST_STREAM` for the rest of the body, if any: its error code is on the
        // line after (a GOAWAY's is too, so the two are told apart).
        let lines: Vec<&str> = text.lines().collect();
        let reset = lines
            .iter()
            .position(|l| l.contains("recv RST_STREAM"))
            .is_none_or(|i| {
                lines
                    .get(i + 1)
                    .is_some_and(|l| l.contains("error_code=NO_ERROR"))
            });
        codes.push(format!(
            "h2:{status}{}",
            if reset { "" } else { " (reset with an error)" }
        ));
    }
    let wrong: Vec<_> = codes.iter().filter(|c| !c.ends_with(":413")).collect();
    eprintln!(
        "{} of {} uploads answered the upstream's 413",
        codes.len() - wrong.len(),
        codes.len()
    );
    assert!(
        wrong.len() <= TOLERATED,
        "not the upstream's 413: {wrong:?} of {codes:?}"
    );
}
