//! Servers that run inside an upstream namespace: an HTTP/1.1 server whose behaviour (delay,
//! echo, status) can be changed while it runs, and a TCP listener that accepts connections and
//! holds them open without reading.
//!
//! Whatever its behaviour, the HTTP server also answers two kinds of request for long-lived
//! traffic:
//!
//! - `GET /trickle/<chunks>/<interval_ms>`: 200 with a body that comes in `chunks` pieces (the
//!   upstream's name and a newline each), the first at once and then one every interval: a
//!   slow response that keeps coming;
//! - any request with `Upgrade:` (a WebSocket handshake, say): `101 Switching Protocols` with
//!   the same `Upgrade`, then every byte that arrives is echoed back. It is an echo for the
//!   tunnel in front of it, not a WebSocket implementation: no `Sec-WebSocket-Accept`, no
//!   frames.
//!
//! Each server is one OS thread that entered the upstream namespace and runs a current-thread
//! tokio runtime, so its sockets are the namespace's. Stopping sends on a shutdown channel and
//! joins the thread; dropping the runtime closes every connection.

use std::{
    future::Future,
    net::{SocketAddr, TcpListener as StdListener},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use http_body_util::{BodyExt as _, Either, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::oneshot};

use super::{
    error::{LabError, LabResult},
    netns::Netns,
    registry::{Background, Registry},
};

/// Back-off after a failed `accept()` (EMFILE and the like), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// How the HTTP server answers every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBehaviour {
    /// Wait this long before answering (after reading the body when echoing): a slow backend.
    pub delay: Duration,
    /// Answer with the request body instead of the upstream's name.
    pub echo_body: bool,
    /// Status code of every response.
    pub status: StatusCode,
}

impl HttpBehaviour {
    /// 200 at once, body = the upstream's name (e.g. `upstream-1`).
    pub fn immediate() -> Self {
        Self {
            delay: Duration::ZERO,
            echo_body: false,
            status: StatusCode::OK,
        }
    }

    /// 200 after `delay`: the request reached the backend, which is slow to answer.
    pub fn slow(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::immediate()
        }
    }

    /// 200 at once with the request body echoed back.
    pub fn echo() -> Self {
        Self {
            echo_body: true,
            ..Self::immediate()
        }
    }
}

impl Default for HttpBehaviour {
    fn default() -> Self {
        Self::immediate()
    }
}

/// The thread behind a server, as the lab's registry and the caller's guard both see it.
struct ServerThread {
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Background for ServerThread {
    fn stop(&self) {
        if let Some(tx) = self
            .shutdown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = tx.send(());
        }
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::warn!("lab server thread panicked");
        }
    }

    fn is_stopped(&self) -> bool {
        self.handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

/// Stops its server on drop unless detached.
struct ServerGuard {
    thread: Arc<ServerThread>,
    detached: bool,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if !self.detached {
            self.thread.stop();
        }
    }
}

/// Binds `addrs` inside `netns` on a new thread and runs `serve` there until shutdown. With port
/// 0, the first address picks a port and the others reuse it. Returns the bound addresses.
fn spawn_server<F, Fut>(
    netns: &Netns,
    thread: &str,
    addrs: &[SocketAddr],
    registry: &Registry,
    serve: F,
) -> LabResult<(ServerGuard, Vec<SocketAddr>)>
where
    F: FnOnce(Vec<TcpListener>, oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let (addrs, ns_name) = (addrs.to_vec(), netns.name().to_owned());
    let handle = netns.spawn_thread(thread, move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(source) => {
                let _ = ready_tx.send(Err(LabError::Socket {
                    action: "starting a tokio runtime for",
                    netns: ns_name,
                    addr: addrs[0],
                    source,
                }));
                return;
            }
        };
        let listeners = {
            let _guard = rt.enter();
            bind_all(&addrs, &ns_name)
        };
        let listeners = match listeners {
            Ok(listeners) => listeners,
            Err(err) => {
                let _ = ready_tx.send(Err(err));
                return;
            }
        };
        let bound = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let _ = ready_tx.send(Ok(bound));
        rt.block_on(serve(listeners, shutdown_rx));
    })?;
    let bound = match ready_rx.recv() {
        Ok(Ok(bound)) => bound,
        Ok(Err(err)) => return Err(err),
        Err(_) => {
            return Err(LabError::ThreadDied {
                thread: thread.to_owned(),
            });
        }
    };
    let server = Arc::new(ServerThread {
        shutdown: Mutex::new(Some(shutdown_tx)),
        handle: Mutex::new(Some(handle)),
    });
    registry.register(Arc::clone(&server) as Arc<dyn Background>);
    Ok((
        ServerGuard {
            thread: server,
            detached: false,
        },
        bound,
    ))
}

fn bind_all(addrs: &[SocketAddr], netns: &str) -> LabResult<Vec<TcpListener>> {
    let mut port = None;
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let mut addr = *addr;
        if let (0, Some(p)) = (addr.port(), port) {
            addr.set_port(p);
        }
        let err = |action| {
            move |source| LabError::Socket {
                action,
                netns: netns.to_owned(),
                addr,
                source,
            }
        };
        // std sets SO_REUSEADDR, so a server restarted on the same port binds at once.
        let std = StdListener::bind(addr).map_err(err("binding"))?;
        std.set_nonblocking(true).map_err(err("configuring"))?;
        port = Some(std.local_addr().map_err(err("binding"))?.port());
        listeners.push(TcpListener::from_std(std).map_err(err("registering"))?);
    }
    Ok(listeners)
}

/// An HTTP/1.1 server in an upstream namespace. Stopped on drop (or with the lab).
pub struct HttpServer {
    guard: ServerGuard,
    addrs: Vec<SocketAddr>,
    behaviour: Arc<Mutex<HttpBehaviour>>,
    requests: Arc<AtomicU64>,
}

impl HttpServer {
    pub(crate) fn start(
        netns: &Netns,
        name: &str,
        addrs: &[SocketAddr],
        behaviour: HttpBehaviour,
        registry: &Registry,
    ) -> LabResult<Self> {
        let behaviour = Arc::new(Mutex::new(behaviour));
        let requests = Arc::new(AtomicU64::new(0));
        let shared = Shared {
            name: HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("upstream")),
            behaviour: Arc::clone(&behaviour),
            requests: Arc::clone(&requests),
        };
        let (guard, addrs) = spawn_server(
            netns,
            &format!("http-{name}"),
            addrs,
            registry,
            move |listeners, shutdown| serve_http(listeners, shutdown, shared),
        )?;
        Ok(Self {
            guard,
            addrs,
            behaviour,
            requests,
        })
    }

    /// The addresses it listens on (v4 and v6).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Changes how later requests are answered (e.g. turns a healthy upstream slow).
    pub fn set_behaviour(&self, behaviour: HttpBehaviour) {
        *self
            .behaviour
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = behaviour;
    }

    /// Requests received so far (counted when the request head arrives).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops the server now: the listeners close and open connections are dropped.
    pub fn stop(self) {}

    /// Keeps the server running until the lab is dropped.
    pub fn detach(mut self) {
        self.guard.detached = true;
    }
}

#[derive(Clone)]
struct Shared {
    name: HeaderValue,
    behaviour: Arc<Mutex<HttpBehaviour>>,
    requests: Arc<AtomicU64>,
}

async fn serve_http(listeners: Vec<TcpListener>, shutdown: oneshot::Receiver<()>, shared: Shared) {
    for listener in listeners {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| respond(req, shared.clone()));
                    // A client that hangs up mid-request is not the lab's problem.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
    }
    // Returning ends block_on; the runtime's drop then cancels the accept and connection tasks.
    let _ = shutdown.await;
}

/// What the HTTP server answers with: a whole body, or a trickle.
type LabBody = Either<Full<Bytes>, Trickle>;

async fn respond(
    mut req: Request<Incoming>,
    shared: Shared,
) -> Result<Response<LabBody>, hyper::Error> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(upgrade) = req.headers().get(header::UPGRADE).cloned() {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on.await {
                let (mut rx, mut tx) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut rx, &mut tx).await;
            }
        });
        let mut response = Response::new(Either::Left(Full::default()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert("x-upstream", shared.name);
        return Ok(response);
    }
    if let Some((chunks, every)) = trickle_request(req.uri().path()) {
        let mut chunk = shared.name.as_bytes().to_vec();
        chunk.push(b'\n');
        let mut response = Response::new(Either::Right(Trickle {
            chunk: Bytes::from(chunk),
            left: chunks,
            every,
            next: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }));
        let headers = response.headers_mut();
        headers.insert("x-upstream", shared.name);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    }
    let behaviour = shared
        .behaviour
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let body = if behaviour.echo_body {
        req.into_body().collect().await?.to_bytes()
    } else {
        Bytes::copy_from_slice(shared.name.as_bytes())
    };
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    let mut response = Response::new(Either::Left(Full::new(body)));
    *response.status_mut() = behaviour.status;
    let headers = response.headers_mut();
    headers.insert("x-upstream", shared.name);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

/// `/trickle/<chunks>/<interval_ms>`: how many chunks, how far apart.
fn trickle_request(path: &str) -> Option<(u32, Duration)> {
    let mut parts = path.strip_prefix("/trickle/")?.split('/');
    let chunks = parts.next()?.parse().ok()?;
    let every = Duration::from_millis(parts.next()?.parse().ok()?);
    parts.next().is_none().then_some((chunks, every))
}

/// A response body of `left` copies of `chunk`, the first at once and then one every
/// `every`.
struct Trickle {
    chunk: Bytes,
    left: u32,
    every: Duration,
    next: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.next.as_mut().poll(cx));
        self.left -= 1;
        let at = tokio::time::Instant::now() + self.every;
        self.next.as_mut().reset(at);
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// A TCP listener in an upstream namespace that accepts every connection and holds it open,
/// never reading or writing. Stopped on drop (or with the lab).
pub struct HoldServer {
    guard: ServerGuard,
    addrs: Vec<SocketAddr>,
    accepted: Arc<AtomicU64>,
}

impl HoldServer {
    pub(crate) fn start(
        netns: &Netns,
        name: &str,
        addrs: &[SocketAddr],
        registry: &Registry,
    ) -> LabResult<Self> {
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let (guard, addrs) = spawn_server(
            netns,
            &format!("hold-{name}"),
            addrs,
            registry,
            move |listeners, shutdown| serve_hold(listeners, shutdown, counter),
        )?;
        Ok(Self {
            guard,
            addrs,
            accepted,
        })
    }

    /// The addresses it listens on (v4 and v6).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops the listener now and closes the held connections.
    pub fn stop(self) {}

    /// Keeps the listener running until the lab is dropped.
    pub fn detach(mut self) {
        self.guard.detached = true;
    }
}

async fn serve_hold(
    listeners: Vec<TcpListener>,
    shutdown: oneshot::Receiver<()>,
    accepted: Arc<AtomicU64>,
) {
    for listener in listeners {
        let accepted = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        held.push(stream);
                    }
                    Err(_) => tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await,
                }
            }
        });
    }
    let _ = shutdown.await;
}
