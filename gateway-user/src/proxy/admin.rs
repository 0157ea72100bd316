//! The admin listener (default `127.0.0.1:9901`; a non-loopback address needs
//! `[admin] allow_remote = true`, checked by config validation). Plain HTTP/1.1, on the main
//! runtime, apart from client traffic.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | every family of `METRICS.md`, as OpenMetrics text |
//! | `GET /status` | JSON: the process, the observer, every cluster and endpoint with its health and why (shape in [`status`]) |
//! | `GET /healthz` | 200 `ok` while serving, with the kernel-signal mode; 503 `draining` once shutdown began (load balancers stop sending) |
//! | `GET /readyz` | 200 when serving and every cluster has at least one routable (healthy or suspect) endpoint; else 503 and the reason, one line per problem |
//! | `GET /` | the status page: `/status` as server-rendered HTML that reloads itself every 2 s (`page`) |
//! | `GET /logging`, `PUT /logging` | the gateway's log level; `PUT` (loopback clients only) changes it at once, the directives as the body (`logging`) |
//!
//! Everything else is read-only: other methods get 405.
//!
//! At most [`MAX_CONNECTIONS`] connections at once (a new one closes the oldest; beyond
//! [`HARD_MAX_CONNECTIONS`], those closing included, a new one is closed at once), each
//! with [`HEADER_READ_TIMEOUT`] for a request's head (an idle one included) and closed after
//! its current response once it is [`MAX_CONNECTION_AGE`] old: the admin port may be open to
//! a whole cluster network (`allow_remote`), and its connections share the process's file
//! descriptors with the proxy's.

mod logging;
pub(crate) mod page;
mod plot;
pub mod status;
mod timeline;

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderValue, Method, Request, Response, StatusCode,
    header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE},
};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};
use tracing::warn;

use super::{log_every::LogEvery, server::Phase, shared::Shared};

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=utf-8";

/// Admin connections open at once: scrapers, probes and a few people's status pages. A new
/// one beyond it closes the oldest, so that a client that opens many, or holds them idle,
/// neither takes the file descriptors the proxy's own clients need nor locks out a health
/// probe (which a refused connection would fail, and a kubelet answer with a restart).
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// A request's head must arrive within this, the wait on an idle keep-alive connection
/// included.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection older than this is closed after its current response (a client that stops
/// reading a response holds its connection no longer), with [`CLOSE_GRACE`] to finish it.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// An evicted connection's current response gets this long to finish.
const EVICT_GRACE: Duration = Duration::from_secs(1);

/// Connections open at once, those closing included: beyond it a new one is closed at once.
/// An evicted connection may take [`EVICT_GRACE`] to go, so a client that opens connections
/// fast would otherwise hold more than [`MAX_CONNECTIONS`] descriptors.
const HARD_MAX_CONNECTIONS: usize = 2 * MAX_CONNECTIONS;

/// The admin connections open now: those not asked to close, oldest first, each with the
/// signal that closes it, and how many are open in all.
#[derive(Default)]
struct Open {
    next: u64,
    conns: VecDeque<(u64, Arc<Notify>)>,
    live: usize,
}

impl Open {
    /// A new connection: its id and the signal that closes it, with the oldest one's signal
    /// when it must make room; `None` (closed at once) beyond [`HARD_MAX_CONNECTIONS`].
    fn admit(&mut self) -> Option<(u64, Arc<Notify>, Option<Arc<Notify>>)> {
        if self.live >= HARD_MAX_CONNECTIONS {
            return None;
        }
        let evicted = if self.conns.len() >= MAX_CONNECTIONS {
            self.conns.pop_front().map(|(_, close)| close)
        } else {
            None
        };
        let (id, close) = (self.next, Arc::new(Notify::new()));
        self.next += 1;
        self.live += 1;
        self.conns.push_back((id, close.clone()));
        Some((id, close, evicted))
    }

    fn ended(&mut self, id: u64) {
        self.conns.retain(|(c, _)| *c != id);
        self.live -= 1;
    }
}

/// A connection's place in [`Open`], given back when dropped.
struct Ended(Arc<Mutex<Open>>, u64);

impl Drop for Ended {
    fn drop(&mut self) {
        lock(&self.0).ended(self.1);
    }
}

fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    let open: Arc<Mutex<Open>> = Arc::default();
    let full = LogEvery::new(Duration::from_secs(10));
    let mut handed_over = shared.admin_handed_over.subscribe();
    loop {
        tokio::select! {
            // The socket is the new process's now (`GatewayHandle::hand_over_admin`);
            // connections already open finish.
            Ok(()) = handed_over.changed() => {
                if *handed_over.borrow() {
                    // Kept-open connections too (a health checker that reuses its
                    // connection): each ends after the request it has in flight.
                    for (_, close) in lock(&open).conns.drain(..) {
                        close.notify_one();
                    }
                    return;
                }
            }
            r = super::admission::accept(&listener) => {
                let Ok((stream, peer)) = r else {
                    // Out of file descriptors (EMFILE) or memory: the error would come back at
                    // once, so back off instead of spinning.
                    tokio::time::sleep(super::admission::ACCEPT_ERROR_BACKOFF).await;
                    continue;
                };
                let Some((id, close, evicted)) = lock(&open).admit() else {
                    if let Some(suppressed) = full.due() {
                        warn!(client = %peer, max = HARD_MAX_CONNECTIONS, suppressed, "admin listener: too many connections still closing; closing new ones at once");
                    }
                    continue;
                };
                if let Some(oldest) = evicted {
                    oldest.notify_one();
                    if let Some(suppressed) = full.due() {
                        warn!(client = %peer, max = MAX_CONNECTIONS, suppressed, "admin listener: every connection slot is taken; closing the oldest connection for a new one");
                    }
                }
                // Ended however the task ends (a panic included): its place is given back.
                let ended = Ended(open.clone(), id);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ended = ended;
                    connection(stream, peer, shared, &close).await;
                });
            }
            _ = phase.changed() => {
                if *phase.borrow() == Phase::Force {
                    return;
                }
            }
        }
    }
}

/// One admin connection, until it ends, is [`MAX_CONNECTION_AGE`] old, or `close` says a newer
/// one needs its slot.
async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, close: &Notify) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            if req.uri().path() == "/logging" {
                return Ok::<_, Infallible>(logging::handle(peer, req).await);
            }
            Ok::<_, Infallible>(route(&shared, &req))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let grace = tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => CLOSE_GRACE,
        () = close.notified() => EVICT_GRACE,
    };
    // Closes an idle connection at once, and one with a response under way after it.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, conn).await;
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "the admin API is read-only: GET only (but PUT /logging)\n".into(),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let draining = shared.draining.load(Ordering::Relaxed);
    match req.uri().path() {
        "/healthz" if draining => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n".into()),
        "/healthz" => reply(
            StatusCode::OK,
            TEXT,
            format!("ok\nsignals: {}\n", shared.signals.mode()),
        ),
        "/readyz" => {
            let problems = status::Status::collect(shared).not_ready;
            if problems.is_empty() {
                reply(StatusCode::OK, TEXT, "ready\n".into())
            } else {
                let mut body = String::from("not ready\n");
                for p in problems {
                    body.push_str(&p);
                    body.push('\n');
                }
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
            }
        }
        "/metrics" => reply(StatusCode::OK, OPENMETRICS, shared.telemetry.encode()),
        "/status" => {
            let s = status::Status::collect(shared);
            let body = serde_json::to_string_pretty(&s).unwrap_or_default() + "\n";
            reply(StatusCode::OK, JSON, body)
        }
        "/" | "/index.html" => reply(
            StatusCode::OK,
            HTML,
            page::render(&status::Status::collect(shared)),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /, /status, /metrics, /healthz, /readyz or /logging\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_connection_makes_room_and_a_hard_ceiling_holds_those_closing() {
        let mut open = Open::default();
        let first: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| open.admit().unwrap())
            .collect();
        assert!(first.iter().all(|(_, _, evicted)| evicted.is_none()));
        // One more: the oldest is told to close.
        let (_, _, evicted) = open.admit().unwrap();
        assert!(Arc::ptr_eq(&evicted.unwrap(), &first[0].1));
        // Those told to close still count until they end.
        for _ in MAX_CONNECTIONS + 1..HARD_MAX_CONNECTIONS {
            assert!(open.admit().unwrap().2.is_some());
        }
        assert!(open.admit().is_none(), "beyond the hard ceiling");
        open.ended(first[0].0);
        assert!(open.admit().is_some(), "room again once one ended");
        assert_eq!(open.conns.len(), MAX_CONNECTIONS);
    }
}
