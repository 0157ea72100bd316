//! The lab the two proxy fuzz targets share: the real gateway (`gateway::proxy::start`, the
//! same code `gateway run` serves with) on loopback, in front of one upstream, driven with raw
//! bytes. One lab per fuzzing process, built on first use.
//!
//! - `client_head`: the fuzzer's bytes are what a client sends; the upstream is a real HTTP
//!   server (hyper) that reads each request body and answers with its size.
//! - `upstream_response`: a fixed client request; the fuzzer's bytes are what the upstream
//!   answers, after which it closes the connection (so close-delimited bodies end).
//! - `proxy_header`: as `client_head`, with `[router.proxy_protocol]` on, so that the bytes
//!   start with what a load balancer sends first (a PROXY protocol header, v1 or v2).
//!
//! Both check that the gateway answers or closes within [`ANSWER_LIMIT`] (a hang is a
//! finding), that whatever it answers starts like HTTP/1.1, and, through libFuzzer's panic
//! hook, that nothing in the gateway panics on any thread.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

/// How long the gateway may take to answer or close a connection. Its own timeouts in the lab
/// config are all well below this: PROXY header 500 ms, header read 500 ms, response 500 ms,
/// request 1 s.
pub const ANSWER_LIMIT: Duration = Duration::from_secs(5);

/// The most the harness reads back from the gateway per connection.
const MAX_READ: u64 = 1 << 20;

pub struct Lab {
    pub rt: Runtime,
    pub gateway: SocketAddr,
    /// What the raw upstream answers (`upstream_response`).
    pub reply: Arc<Mutex<Vec<u8>>>,
    _handle: gateway::proxy::GatewayHandle,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// A real HTTP/1.1 server.
    Http,
    /// Reads a request head, writes [`Lab::reply`], closes.
    Raw,
    /// [`UpstreamKind::Http`], with the gateway expecting a PROXY protocol header on every
    /// connection.
    HttpBehindProxyProtocol,
}

static HTTP_LAB: OnceLock<Lab> = OnceLock::new();
static RAW_LAB: OnceLock<Lab> = OnceLock::new();
static PROXIED_LAB: OnceLock<Lab> = OnceLock::new();

pub fn lab(kind: UpstreamKind) -> &'static Lab {
    let cell = match kind {
        UpstreamKind::Http => &HTTP_LAB,
        UpstreamKind::Raw => &RAW_LAB,
        UpstreamKind::HttpBehindProxyProtocol => &PROXIED_LAB,
    };
    cell.get_or_init(|| Lab::start(kind))
}

/// The lab's gateway config; `proxied`: with `[router.proxy_protocol]` on.
fn config(upstream: SocketAddr, proxied: bool) -> String {
    let proxy_protocol = if proxied {
        "[router.proxy_protocol]\nenabled = true\ntimeout_ms = 500\n"
    } else {
        ""
    };
    format!(
        r#"[router]
listen = ["127.0.0.1:0"]
shutdown_grace_ms = 100

{proxy_protocol}
[router.downstream]
header_read_timeout_ms = 500
write_timeout_ms = 500
max_request_header_bytes = 8192
max_request_body_bytes = 65536

[admin]
enabled = false

[access_log]
output = "off"

[[routes]]
path_prefix = "/"
cluster = "up"

[clusters.up]
endpoints = ["{upstream}"]

[clusters.up.timeouts]
connect_timeout_ms = 500
response_timeout_ms = 500
request_timeout_ms = 1000

[clusters.up.retry]
max_retries = 0
hedge = false

[clusters.up.limits]
max_idle_per_endpoint = 0
"#
    )
}

impl Lab {
    fn start(kind: UpstreamKind) -> Lab {
        // libFuzzer's C `main` leaves SIGPIPE at its default (Rust's own `main` ignores it): a
        // write to a connection the gateway already closed must be an error, not a death.
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let reply = Arc::new(Mutex::new(Vec::new()));
        let (gateway, handle) = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("upstream bind");
            let upstream = listener.local_addr().expect("upstream addr");
            match kind {
                UpstreamKind::Http | UpstreamKind::HttpBehindProxyProtocol => {
                    tokio::spawn(http_upstream(listener));
                }
                UpstreamKind::Raw => {
                    tokio::spawn(raw_upstream(listener, reply.clone()));
                }
            }
            let text = config(upstream, kind == UpstreamKind::HttpBehindProxyProtocol);
            let settings = gateway::config::load_str(&text, Path::new("fuzz-lab.toml"))
                .unwrap_or_else(|e| panic!("the fuzz lab's config is refused: {e}"))
                .settings;
            let handle = gateway::proxy::start(
                settings,
                Arc::new(gateway::signals::UserspaceOnly::new("fuzzing")),
            )
            .await
            .expect("the gateway starts");
            (handle.listen_addrs()[0], handle)
        });
        Lab {
            rt,
            gateway,
            reply,
            _handle: handle,
        }
    }

    /// Sends `bytes` to the gateway on a new connection, half-closes when `half_close` (so
    /// that an incomplete request ends), and returns everything it answers until it closes.
    /// Panics if it neither answers nor closes in [`ANSWER_LIMIT`].
    pub fn exchange(&self, bytes: &[u8], half_close: bool) -> Vec<u8> {
        self.rt.block_on(async {
            let mut s = TcpStream::connect(self.gateway).await.expect("connect to the gateway");
            // The gateway may answer (and close) before it has read everything: a failed write
            // is not a finding.
            let _ = s.write_all(bytes).await;
            if half_close {
                let _ = s.shutdown().await;
            }
            let mut out = Vec::new();
            let mut limited = (&mut s).take(MAX_READ);
            match tokio::time::timeout(ANSWER_LIMIT, limited.read_to_end(&mut out)).await {
                Ok(_) => out,
                Err(_) => panic!(
                    "the gateway neither answered nor closed within {ANSWER_LIMIT:?}; it sent {} bytes: {:?}",
                    out.len(),
                    String::from_utf8_lossy(&out[..out.len().min(512)])
                ),
            }
        })
    }
}

/// HTTP/2 with prior knowledge: the gateway answers in HTTP/2 frames.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whatever the gateway sends a client starts with an HTTP/1.x status line (or, after the
/// HTTP/2 preface, is HTTP/2).
pub fn assert_http_answer(request: &[u8], answer: &[u8]) {
    if answer.is_empty() || request.starts_with(H2_PREFACE) {
        return;
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "the gateway sent something other than HTTP: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(256)])
    );
}

async fn http_upstream(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                let path = req.uri().path().to_owned();
                let n = match req.into_body().collect().await {
                    Ok(b) => b.to_bytes().len(),
                    Err(_) => 0,
                };
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                    "{path} {n}\n"
                )))))
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn raw_upstream(listener: TcpListener, reply: Arc<Mutex<Vec<u8>>>) {
    while let Ok((mut s, _)) = listener.accept().await {
        let reply = reply.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let bytes = reply.lock().expect("reply lock").clone();
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
        });
    }
}
