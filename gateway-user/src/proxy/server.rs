//! Client-facing listeners: accept, serve HTTP/1.1 and HTTP/2 (prior knowledge on plain
//! listeners, ALPN or prior knowledge on HTTPS ones, after `handshake`) on each connection,
//! and drain on shutdown.
//!
//! In production the gateway runs like nginx: one worker thread per core, each with its own
//! single-threaded tokio runtime and its own `SO_REUSEPORT` socket per listen address, so the
//! kernel spreads connections over workers and a connection, its requests and their upstream
//! connections stay on one thread (no cross-thread wake-ups, no work stealing). Tests run the
//! same worker as a task on their own runtime. A plain HTTP/1 connection that goes idle is
//! parked: its socket waits in the worker's parking lot with no task and no hyper connection
//! (`park`, `lot`).
//!
//! The kernel's split of connections over the workers is random; with `[router]
//! connection_balance = "exact"` a worker hands a connection it accepted to a worker with fewer
//! open (`spread`), through that worker's inbox.
//!
//! Shutdown has up to three steps, driven by a `watch` of [`Phase`]: `Deregister` (the drain
//! delay, while load balancers take the host out) still accepts, but moves clients elsewhere:
//! HTTP/1 responses carry `Connection: close` and HTTP/2 connections get GOAWAY; `Drain` stops
//! accepting and asks every connection to finish what it is doing (HTTP/1: the current
//! response, then close; HTTP/2: GOAWAY); `Force` closes whatever is left when the grace period
//! is over. Each connection task holds a clone of an `mpsc::Sender` that is never sent on: the
//! receiver sees the channel close when the last connection is gone.

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response, Version};
use hyper::{
    body::{Body as _, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tracing::{debug, warn};

use super::{
    admission::{self, AcceptFailure},
    handshake,
    headers::{self, Scheme},
    io::{Busy, Holding, Parkable, linger},
    listeners::ClientSocket,
    proxy_protocol,
    request::{self, Client},
    response_body::ResponseBody,
    shared::{Drain, Shared},
};

pub(crate) use super::shared::Phase;

mod anchor;
mod handoff;
mod lot;
mod park;
mod quiet;
mod rejected;
mod woken;

pub(crate) use handoff::Spread;
use handoff::{Handoff, take_handoffs};

use anchor::{AbortOnDrop, timer_anchor};
use lot::Lot;
use quiet::{Limits, Quiet, Stop};
use woken::WhenWoken;

/// One worker: accepts on its listeners (and takes the connections other workers hand over)
/// until the drain starts, then waits until its connections are done (or the drain is
/// forced). Dropping `done` tells the handle.
pub(crate) async fn worker(
    listeners: Vec<ClientSocket>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    done: mpsc::Sender<()>,
    (me, spread, inbox): (usize, Spread, mpsc::UnboundedReceiver<Handoff>),
) {
    let _anchor = AbortOnDrop(tokio::spawn(timer_anchor()));
    let (live, mut all_closed) = mpsc::channel::<()>(1);
    let drain = || Drain {
        phase: phase.clone(),
        live: live.clone(),
    };
    let lot = Lot::start(shared.clone(), drain());
    let mut loops = vec![tokio::spawn(take_handoffs(
        inbox,
        shared.clone(),
        drain(),
        lot.clone(),
    ))];
    for (scheme, l) in listeners {
        match TcpListener::from_std(l) {
            Ok(l) => loops.push(tokio::spawn(accept_loop(
                l,
                scheme,
                shared.clone(),
                (drain(), lot.clone()),
                (me, spread.clone()),
            ))),
            Err(e) => warn!(error = %e, "cannot register a listener with the worker's runtime"),
        }
    }
    drop((live, lot));
    // A loop that panicked (the panic hook logged it) would leave its socket in the kernel's
    // reuseport group with nobody accepting: the worker fails with it (`Shared::fatal`).
    if let Err(e) = futures_util::future::try_join_all(loops).await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    loop {
        tokio::select! {
            _ = all_closed.recv() => break,
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Force {
                    break;
                }
            }
        }
    }
    drop(done);
}

/// What a connection knows of where it came in.
#[derive(Clone, Copy)]
struct Listener {
    scheme: Scheme,
    /// Bound to a loopback address (the default of `expose_upstream_errors` follows it).
    loopback: bool,
}

impl Listener {
    /// Where `client` came in.
    fn of(client: &Client) -> Listener {
        Listener {
            scheme: client.scheme,
            loopback: client.loopback_listener,
        }
    }
}

/// Serves an accepted connection on this worker.
fn serve_accepted(
    stream: TcpStream,
    peer: SocketAddr,
    on: Listener,
    permit: admission::Permit,
    shared: &Arc<Shared>,
    drain: &Drain,
    lot: &Lot,
) {
    let (shared, drain) = (shared.clone(), drain.clone());
    let proxied = {
        let rt = shared.runtime.load();
        let pp = rt.settings.proxy_protocol.as_ref();
        pp.filter(|p| p.expected_from(peer.ip())).cloned()
    };
    if let Some(cfg) = proxied {
        let live = (drain, permit);
        tokio::spawn(serve_proxied(
            stream,
            peer,
            on,
            cfg,
            shared,
            live,
            lot.clone(),
        ));
        return;
    }
    match on.scheme {
        Scheme::Http => {
            let client = client(peer, on, None, drain);
            tokio::spawn(park::serve(stream, client, permit, shared, lot.clone()));
        }
        Scheme::Https => {
            tokio::spawn(serve_tls(stream, peer, on, shared, (drain, permit)));
        }
    }
}

/// A connection that opens with a PROXY protocol header (`proxy_protocol`): the header, then
/// HTTP or TLS as on any other, for the client it names. A client that spoke TLS to the load
/// balancer (v2's SSL TLV) is an HTTPS client.
async fn serve_proxied(
    mut stream: TcpStream,
    peer: SocketAddr,
    on: Listener,
    cfg: crate::config::ProxyProtocol,
    shared: Arc<Shared>,
    (drain, permit): Live,
    lot: Lot,
) {
    let Some(origin) = proxy_protocol::read(&mut stream, peer, &cfg, &shared).await else {
        return;
    };
    match on.scheme {
        Scheme::Http => {
            let scheme = if origin.tls { Scheme::Https } else { on.scheme };
            let on = Listener { scheme, ..on };
            let client = client(origin.client, on, None, drain);
            park::serve(stream, client, permit, shared, lot).await
        }
        Scheme::Https => serve_tls(stream, origin.client, on, shared, (drain, permit)).await,
    }
}

/// Accepts until the phase is `Drain` or `Force`. Each accepted connection passes the
/// listener's gate (`admission`) or is turned away at once, and is served here or handed to
/// the worker `spread` chooses.
async fn accept_loop(
    listener: TcpListener,
    scheme: Scheme,
    shared: Arc<Shared>,
    (drain, lot): (Drain, Lot),
    (me, spread): (usize, Spread),
) {
    let mut phase = drain.phase.clone();
    let gate = match listener.local_addr() {
        Ok(a) => shared.gate(a),
        Err(e) => {
            warn!(error = %e, "a client listener has no address");
            return;
        }
    };
    let on = Listener {
        scheme,
        loopback: listener.local_addr().is_ok_and(|a| a.ip().is_loopback()),
    };
    let mut reserve = admission::open_reserve();
    #[cfg(debug_assertions)]
    if super::failpoint::no_reserve() {
        reserve = None;
    }
    loop {
        tokio::select! {
            r = admission::accept(&listener) => match r {
                Ok((stream, peer)) => {
                    #[cfg(debug_assertions)]
                    super::failpoint::panic_on_accept();
                    let Some(stream) = gate.restock(stream, scheme, &mut reserve) else {
                        continue;
                    };
                    let (permit, balance) = {
                        let rt = shared.runtime.load();
                        let s = &rt.settings;
                        (gate.admit(&shared.admission, &s.downstream), s.connection_balance)
                    };
                    let permit = match permit {
                        Ok(p) => p,
                        Err(reason) => {
                            gate.reject(&shared.admission, stream, scheme, reason);
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    if let Some((stream, permit)) = spread.place(me, balance, stream, peer, on, permit) {
                        serve_accepted(stream, peer, on, permit, &shared, &drain, &lot);
                    }
                }
                Err(e) => {
                    // Out of descriptors: answer the connection waiting on the reserve one
                    // and go on (each round accepts one connection: no spin). A failed
                    // connection of its own: the next at once. Otherwise, or without a
                    // reserve, back off instead of spinning.
                    match gate.accept_failed(&shared.admission, &e) {
                        AcceptFailure::Connection => {}
                        AcceptFailure::OutOfFds
                            if gate.answer_on_reserve(&listener, scheme, &mut reserve) => {}
                        _ => tokio::time::sleep(admission::ACCEPT_ERROR_BACKOFF).await,
                    }
                }
            },
            _ = phase.changed() => {
                if !phase.borrow().accepting() {
                    return;
                }
            }
        }
    }
}

/// What a served connection holds until it ends: its place in the drain's count and in
/// `max_client_connections` (both of which an upgraded connection's tunnel keeps).
type Live = (Drain, admission::Permit);

/// The TLS handshake (bounded by its own timeout), then HTTP over it. The connection counts
/// as live from the start, so a drain waits for handshakes in progress too.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    on: Listener,
    shared: Arc<Shared>,
    (drain, permit): Live,
) {
    let fd = stream.as_raw_fd();
    if let Some(io) = handshake::accept(stream, peer, &shared).await {
        let tls = io.get_ref().1;
        let version = crate::tls::version_label(tls.protocol_version());
        let h2 = tls.alpn_protocol() == Some(b"h2");
        // Once per connection (only a `client_ca_file` listener asks for one); whether it goes
        // upstream is the config's of each request, so that a reload turning
        // `forward_client_cert` on applies to open connections too.
        let cert = tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| crate::tls::client_cert::forwarded(leaf));
        let mut client = client(peer, on, Some(version), drain);
        Arc::get_mut(&mut client)
            .expect("not shared yet")
            .client_cert = cert;
        let io = Holding::new(io, permit);
        serve(io, client, shared, h2, Some(fd)).await;
    }
}

fn client(peer: SocketAddr, on: Listener, tls: Option<&'static str>, drain: Drain) -> Arc<Client> {
    Arc::new(Client {
        addr: peer,
        ip: headers::client_value(peer.ip()),
        scheme: on.scheme,
        loopback_listener: on.loopback,
        tls,
        client_cert: None,
        drain,
    })
}

/// What a client connection speaks (see `serve`).
const UNKNOWN: u8 = 0;
const H1: u8 = 1;
const H2: u8 = 2;

/// Serves a connection with hyper's automatic HTTP/1 or HTTP/2 (an HTTPS one, whatever ALPN
/// chose, or a plain one that opened with the HTTP/2 preface), until it ends. `h2`: ALPN
/// chose HTTP/2, or the preface said so. `tls_fd`: an HTTPS connection's socket, read under
/// TLS for a lingering close.
async fn serve<I>(io: I, client: Arc<Client>, shared: Arc<Shared>, h2: bool, tls_fd: Option<RawFd>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // hyper runs each HTTP/2 stream as a task of its own, and the request's future (about
    // 5 KB) was copied six times on its way into the task: 2,600 instructions per request.
    // Boxed, one copy is left, and the allocation (together 1,600). An HTTP/1 connection
    // polls its request's future in place, where a box would only add both.
    if h2 {
        serve_with(
            io,
            client,
            shared,
            (H2, None),
            |shared, client, req, busy| Box::pin(request::handle(shared, client, req, busy)),
        )
        .await
    } else {
        serve_with(io, client, shared, (UNKNOWN, tls_fd), request::handle).await
    }
}

/// [`serve`], with `handle` making each request's future; `speaks` is `H2` when the
/// connection is known to speak HTTP/2 before its first request. An HTTP/1 connection over
/// TLS (`tls_fd`, its socket) that hyper ended lingers (`io::linger`) before it closes.
///
/// Besides hyper's own limits, the connection's timers (`quiet`): the first request's
/// deadline, HTTP/2's idle timeout, and a response stream its client stopped reading.
///
/// An HTTPS connection whose ALPN did not choose HTTP/2 (`UNKNOWN`) is answered 400 for each
/// HTTP/2 request: HTTP/2 over TLS needs ALPN (RFC 9113 section 3.2), and hyper, which takes
/// a preface on it for HTTP/2 all the same (hyper-util's `http1_only` does nothing with
/// upgrades), would serve it with none of the limits of a connection known to speak HTTP/2
/// (the stream watchdog, the rapid-reset rule).
async fn serve_with<I, H, F>(
    io: I,
    client: Arc<Client>,
    shared: Arc<Shared>,
    (speaks, tls_fd): (u8, Option<RawFd>),
    handle: H,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Arc<Shared>, Arc<Client>, Request<Incoming>, Busy) -> F + Send + 'static,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let (builder, limits) = {
        let rt = shared.runtime.load();
        (
            rt.http.clone(),
            Limits::of(&rt.settings.downstream, &shared),
        )
    };
    let activity = quiet::activity(speaks, &limits);
    // Counts what the client sent (`Quiet`); never parked.
    let io = TokioIo::new(Parkable::new(io, Bytes::new(), activity.clone()));
    let mut idle = Quiet::new(limits, speaks, &activity);
    let mut phase = client.drain.phase.clone();
    // A connection served only once the drain began (its first bytes or TLS handshake came
    // later) is treated as if open then: HTTP/2 gets its GOAWAY now, not at the grace
    // period's end; a first HTTP/1 request is still served, with `Connection: close`.
    let mut stop = on_phase(*phase.borrow_and_update(), speaks, false);
    let peer = client.addr;
    let alpn_missing = speaks == UNKNOWN;
    // What this connection speaks, known from its first request (`UNKNOWN` until then).
    let speaks = Arc::new(AtomicU8::new(speaks));
    let (svc_speaks, svc_activity) = (speaks.clone(), activity.clone());
    let (shared_here, client_here) = (shared.clone(), client.clone());
    let svc = service_fn(move |req: Request<Incoming>| {
        let v = speaks_of(&req);
        svc_speaks.store(v, Ordering::Relaxed);
        if v == H2 && alpn_missing {
            return Either::Right(std::future::ready(Ok(h2_without_alpn())));
        }
        // A body on HTTP/1 may be left partly unread: a reason to linger.
        let busy = svc_activity.busy(v == H1 && !req.body().is_end_stream());
        Either::Left(handle(shared.clone(), client.clone(), req, busy))
    });
    // With upgrades: a `101` hands the connection over to the tunnel (`tunnel`), which holds
    // its own place among the live connections.
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        let now_speaks = speaks.load(Ordering::Relaxed);
        match idle.go_away_when_ready(stop, now_speaks, &activity, shutting_down) {
            None => {}
            Some(Stop::Close) => return,
            Some(Stop::GoAway) => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
        // The drain's watch and the timers, polled only when they woke the task, not at each
        // of the several wake-ups per request that hyper's connection causes (see `woken`).
        let check = idle.next_check(now_speaks, shutting_down);
        let wake = activity.owed().map(|o| &o.wake);
        let rare = WhenWoken::new(quiet::next_event(check, &mut phase, wake));
        stop = tokio::select! {
            // The connection first: an unbiased select draws a random number at each wake-up.
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    idle.ended_with(&*e, &activity, (&shared_here, &client_here));
                    if !e.downcast_ref::<hyper::Error>().is_some_and(answered_unparsed) {
                        return;
                    }
                }
                break;
            }
            event = rare => {
                let now_speaks = speaks.load(Ordering::Relaxed);
                match event {
                    None => idle.check(now_speaks, &activity, peer),
                    Some(alive) => {
                        let p = if alive { *phase.borrow() } else { Phase::Force };
                        on_phase(p, now_speaks, shutting_down)
                    }
                }
            }
        };
    }
    // hyper ended the connection and still holds its socket (`conn`, alive until the return).
    if let Some(fd) = tls_fd
        && speaks.load(Ordering::Relaxed) == H1
    {
        linger::after_tls_response(fd, activity.had_body(), forced(&mut phase)).await;
    }
}

/// Whether hyper's connection ended after answering a request it could not parse (`400`,
/// `431`): the client may still be sending it.
fn answered_unparsed(e: &hyper::Error) -> bool {
    e.is_parse() || e.is_parse_too_large()
}

/// When the drain forces connections closed (or its sender is gone).
async fn forced(phase: &mut watch::Receiver<Phase>) {
    while *phase.borrow_and_update() != Phase::Force {
        if phase.changed().await.is_err() {
            return;
        }
    }
}

/// What a request says its connection speaks.
fn speaks_of(req: &Request<Incoming>) -> u8 {
    if req.version() == Version::HTTP_2 {
        H2
    } else {
        H1
    }
}

/// The answer to an HTTP/2 request on an HTTPS connection whose ALPN did not choose HTTP/2.
fn h2_without_alpn() -> Response<ResponseBody> {
    debug!("an HTTP/2 request over TLS without ALPN h2: 400");
    let mut r = Response::new(ResponseBody::full(
        Bytes::from_static(
            b"400 Bad Request: HTTP/2 over TLS needs ALPN \"h2\" (RFC 9113 section 3.2)\n",
        ),
        None,
    ));
    *r.status_mut() = http::StatusCode::BAD_REQUEST;
    r
}

/// The drain's phase changed to `p`: what the connection does, if anything.
fn on_phase(p: Phase, speaks: u8, shutting_down: bool) -> Option<Stop> {
    match p {
        Phase::Run => None,
        // HTTP/1 connections close after their next response instead (`request`): closing an
        // idle one now would race the request its client may be sending.
        Phase::Deregister if speaks == H2 && !shutting_down => Some(Stop::GoAway),
        Phase::Deregister => None,
        // A connection accepted just before the drain that has not sent its first request
        // yet is not cut off under it: the request is served, with `Connection: close` (the
        // first-request timer bounds a client that sends nothing, the grace period everything).
        Phase::Drain if speaks == UNKNOWN => None,
        Phase::Drain if !shutting_down => Some(Stop::GoAway),
        Phase::Drain => None,
        Phase::Force => Some(Stop::Close),
    }
}
