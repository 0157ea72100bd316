//! Shared by the `proxy_*` tests: loopback upstream servers with scripted behaviour, the
//! gateway in-process or as the built binary, and a client. Everything binds 127.0.0.1 on
//! port 0; nothing leaves the host.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

use std::{
    convert::Infallible,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::{net::TcpListener, task::JoinHandle};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body of `n` bytes produced in 64 KiB chunks, never held whole.
pub fn generated(n: u64) -> Body {
    Generated {
        left: n,
        chunk: Bytes::from(vec![b'x'; 64 * 1024]),
    }
    .boxed()
}

struct Generated {
    left: u64,
    chunk: Bytes,
}

impl hyper::body::Body for Generated {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let take = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= take as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// A loopback HTTP/1.1 upstream. Paths:
/// - `/delay/MS...`: answers after MS milliseconds;
/// - `/bytes/N`: streams N bytes;
/// - `/sink`: reads the request body, answers with its length;
/// - `/stall/MS`: sends a first chunk of the body, then nothing for MS milliseconds;
/// - `/headers`: answers with the request headers, one `name: value` per line;
/// - anything else: answers with the upstream's name.
///
/// Every response carries `x-upstream: NAME`.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    pub sunk: Arc<AtomicU64>,
    /// Added before every response, in milliseconds.
    pub delay_ms: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let sunk = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (h, c, s, n, d) = (
            hits.clone(),
            connections.clone(),
            sunk.clone(),
            name.to_owned(),
            delay_ms.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, s, n, d) = (h.clone(), s.clone(), n.clone(), d.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (h, s, n, d) = (h.clone(), s.clone(), n.clone(), d.clone());
                        async move {
                            let delay = d.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            Ok::<_, Infallible>(upstream_respond(req, &n, &h, &s).await)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            name: name.to_owned(),
            addr,
            hits,
            connections,
            sunk,
            delay_ms,
            task,
        }
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn upstream_respond(
    req: Request<hyper::body::Incoming>,
    name: &str,
    hits: &AtomicUsize,
    sunk: &AtomicU64,
) -> Response<Body> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let body = if let Some(ms) = path.strip_prefix("/delay/") {
        let ms: u64 = ms.split('/').next().unwrap_or("0").parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        full(name.to_owned())
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        generated(n.parse().unwrap_or(0))
    } else if let Some(ms) = path.strip_prefix("/stall/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"first chunk\n")).await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let _ = tx.send(Bytes::from_static(b"late chunk\n")).await;
        });
        Channel(rx).boxed()
    } else if path == "/sink" {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        sunk.fetch_add(n, Ordering::SeqCst);
        full(n.to_string())
    } else if path == "/headers" {
        let mut s = String::new();
        for (k, v) in req.headers() {
            s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        full(s)
    } else {
        full(name.to_owned())
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    resp.headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    resp.headers_mut()
        .insert("x-hop", "secret".parse().unwrap());
    resp
}

struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Channel {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A listener that accepts connections and never reads from them (nor answers).
pub struct HoldListener {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for HoldListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn hold_listener() -> HoldListener {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    HoldListener { addr, task }
}

/// A listener that reads each request head, writes `reply` (possibly nothing, possibly not
/// HTTP) and closes the connection.
pub async fn raw_responder(reply: &'static [u8]) -> HoldListener {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    HoldListener { addr, task }
}

/// A port on 127.0.0.1 where nothing listens: connects are refused.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A listener that never accepts, with its accept queue filled: the kernel drops further SYNs
/// (`tcp_conn_request` in net/ipv4/tcp_input.c, "listen overflow"), so connects hang until the
/// caller's timeout. Keep the value alive for as long as the endpoint must stay silent.
pub struct SilentListener {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

pub fn silent_listener() -> SilentListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    // Backlog 0 admits one connection; a couple more fill the SYN side for good measure.
    for _ in 0..2 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(c);
        }
    }
    SilentListener {
        addr,
        _listener: s,
        _fillers: fillers,
    }
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "gateway-test-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The header of every test config: loopback listener and admin on port 0, access log to
/// `log` in JSON, no drain delay (a test that stops the gateway does not wait for load
/// balancers; `service_lifecycle` tests the delay).
pub fn base_config(log: &Path) -> String {
    format!(
        r#"[router]
listen = ["127.0.0.1:0"]
shutdown_grace_ms = 5000
drain_delay_ms = 0

[admin]
listen = "127.0.0.1:0"

[access_log]
format = "json"
output = "{}"
"#,
        log.display()
    )
}

/// The gateway in this process.
pub struct InProcess {
    pub handle: gateway::proxy::GatewayHandle,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub dir: PathBuf,
}

/// Starts the gateway in-process from `base_config` + `extra` (a config fragment).
pub async fn gateway(label: &str, extra: &str) -> InProcess {
    let dir = temp_dir(label);
    let log = dir.join("access.log");
    let text = format!("{}\n{extra}", base_config(&log));
    let settings = gateway::config::load_str(&text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config refused: {e}\n{text}"))
        .settings;
    let handle = gateway::proxy::start(
        settings,
        Arc::new(gateway::signals::UserspaceOnly::new("test")),
    )
    .await
    .expect("gateway starts");
    let addr = handle.listen_addrs()[0];
    InProcess {
        handle,
        addr,
        log,
        dir,
    }
}

/// Access-log lines (JSON) once at least `n` are written, or panics after 5 s.
pub fn log_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} access log lines, got {}: {text}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub type HttpClient = Client<HttpConnector, Body>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read to the end.
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }
}

pub async fn send(c: &HttpClient, req: Request<Body>) -> Got {
    let resp = c.request(req).await.expect("response from the gateway");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(c: &HttpClient, addr: SocketAddr, path: &str) -> Got {
    get_host(c, addr, "test.local", path).await
}

pub async fn get_host(c: &HttpClient, addr: SocketAddr, host: &str, path: &str) -> Got {
    let req = Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(empty())
        .unwrap();
    send(c, req).await
}

/// The gateway binary, started on a config file; its stderr is collected line by line.
pub struct GatewayProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    pub fn spawn(config: &Path) -> GatewayProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.args(["run", "--config"]).arg(config);
        GatewayProcess::spawn_with(cmd)
    }

    /// [`GatewayProcess::spawn`] with a command of the caller's (e.g. the binary run through
    /// `setpriv` as another user).
    pub fn spawn_with(mut cmd: Command) -> GatewayProcess {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the gateway binary");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if let Some(a) = field(&line, "listener=") {
                    let _ = tx.send(("listener", a));
                }
                if let Some(a) = field(&line, "admin=") {
                    let _ = tx.send(("admin", a));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut addr = None;
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while addr.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("listener", a)) => addr = Some(a),
                Ok((_, a)) => admin = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "the gateway did not report its listeners; stderr:\n{}",
                        stderr.lock().unwrap().join("\n")
                    );
                }
            }
        }
        GatewayProcess {
            child,
            addr: addr.unwrap(),
            admin,
            stderr,
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    /// Waits for exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address logged as `key` (a whole field: `listener=` is not `https_listener=`).
fn field(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))?
        .parse()
        .ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes `base_config` + `extra` to DIR/gateway.toml; the access log goes to DIR/access.log.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    let text = format!("{}\n{extra}", base_config(&dir.join("access.log")));
    std::fs::write(&path, text).unwrap();
    path
}

/// Sends raw bytes on a new connection and returns everything read until the peer closes
/// (or `limit` passes).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
