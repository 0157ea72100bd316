//! Scripted upstreams on 127.0.0.1, port 0: an HTTP/1.1 server whose paths choose its
//! behaviour (delay, stream, sink, stall, echo headers) and that counts hits and connections;
//! listeners that hold connections, answer with raw bytes, or never accept; and a plain
//! thread-per-connection server for tests without a tokio runtime. Nothing leaves the host.

use std::{
    convert::Infallible,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::{body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::http::{Body, full, generated};

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

/// A loopback HTTP/1.1 upstream on std threads that answers every request `200 up` and keeps
/// connections alive; it stops accepting when dropped.
pub struct BlockingUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl BlockingUpstream {
    pub fn start() -> BlockingUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let h = h.clone();
                        std::thread::spawn(move || serve_upstream(s, &h));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        BlockingUpstream { addr, hits, stop }
    }
}

impl Drop for BlockingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_upstream(s: TcpStream, hits: &AtomicU64) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).is_err() {
                return;
            }
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if h == "connection: close" {
                close = true;
            }
        }
        hits.fetch_add(1, Ordering::Relaxed);
        if r.get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nup")
            .is_err()
            || close
        {
            return;
        }
    }
}
