//! Serving one accepted connection: its TLS handshake, then hyper's automatic HTTP/1 or
//! HTTP/2 with the connection's timers (`quiet`) and the drain's phases, until it ends (and,
//! for HTTP/1 over TLS, lingers: `io::linger`). Plain HTTP/1 connections go to `park`.

use std::{
    convert::Infallible,
    future::Ready,
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
    service::{Service, service_fn},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
};
use tracing::debug;

use super::{
    Listener, Live, Phase, client,
    quiet::{self, Limits, Quiet, Stop},
    woken::WhenWoken,
};
use crate::proxy::{
    handshake,
    io::{Activity, Busy, Holding, Parkable, linger},
    request::{self, Client},
    response_body::ResponseBody,
    shared::Shared,
};

/// The TLS handshake (bounded by its own timeout), then HTTP over it. The connection counts
/// as live from the start, so a drain waits for handshakes in progress too.
pub(super) async fn serve_tls(
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

/// What a client connection speaks (see `serve`).
pub(super) const UNKNOWN: u8 = 0;
pub(super) const H1: u8 = 1;
pub(super) const H2: u8 = 2;

/// Serves a connection with hyper's automatic HTTP/1 or HTTP/2 (an HTTPS one, whatever ALPN
/// chose, or a plain one that opened with the HTTP/2 preface), until it ends. `h2`: ALPN
/// chose HTTP/2, or the preface said so. `tls_fd`: an HTTPS connection's socket, read under
/// TLS for a lingering close.
pub(super) async fn serve<I>(
    io: I,
    client: Arc<Client>,
    shared: Arc<Shared>,
    h2: bool,
    tls_fd: Option<RawFd>,
) where
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
    F: Future<Output = Answer> + Send + 'static,
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
    // What this connection speaks, known from its first request (`UNKNOWN` until then).
    let speaks = Arc::new(AtomicU8::new(speaks));
    let (shared_here, client_here) = (shared.clone(), client.clone());
    let svc = service(handle, (shared, client), (speaks.clone(), activity.clone()));
    // With upgrades: a `101` hands the connection over to the tunnel (`tunnel`), which holds
    // its own place among the live connections.
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut shutting_down = false;
    let failed = loop {
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
            r = conn.as_mut() => break r.err().map(|e| {
                idle.ended_with(&*e, &activity, (&shared_here, &client_here));
                e.downcast_ref::<hyper::Error>().is_some_and(answered_unparsed)
            }),
            event = rare => {
                let now_speaks = speaks.load(Ordering::Relaxed);
                match event {
                    None => idle.check(now_speaks, &activity, client_here.addr),
                    Some(alive) => {
                        let p = if alive { *phase.borrow() } else { Phase::Force };
                        on_phase(p, now_speaks, shutting_down)
                    }
                }
            }
        };
    };
    // An error ends the connection, unless hyper failed on a request it could not parse.
    let Some(unparsed) = failed.map_or(Some(false), |unparsed| unparsed.then_some(true)) else {
        return;
    };
    // hyper ended the connection and still holds its socket (`conn`, alive until the return),
    // unless a `101` handed it to a tunnel, which may even have closed it by now.
    let now_speaks = speaks.load(Ordering::Relaxed);
    linger_tls((tls_fd, unparsed), now_speaks, &activity, &mut phase).await;
}

/// A [`serve_with`] connection over TLS (its socket `tls_fd`) that hyper ended lingers when
/// [`lingers`] says so; `unparsed`: hyper failed on a request it could not parse.
async fn linger_tls(
    (tls_fd, unparsed): (Option<RawFd>, bool),
    speaks: u8,
    activity: &Activity,
    phase: &mut watch::Receiver<Phase>,
) {
    if let Some(fd) = tls_fd.filter(|_| lingers(speaks, activity, unparsed)) {
        let had_body = activity.had_body() || unparsed;
        linger::after_tls_response(fd, had_body, forced(phase)).await;
    }
}

/// The service hyper calls for each request of a [`serve_with`] connection: it notes what the
/// connection speaks (`speaks`, `UNKNOWN` on an HTTPS connection whose ALPN did not choose
/// HTTP/2, which it then answers as `serve_with` says), and counts the request as running in
/// `activity`, with whether it came with a body on HTTP/1 (which may be left partly unread: a
/// reason to linger).
fn service<H, F>(
    handle: H,
    (shared, client): (Arc<Shared>, Arc<Client>),
    (speaks, activity): (Arc<AtomicU8>, Arc<Activity>),
) -> impl Service<
    Request<Incoming>,
    Response = Response<ResponseBody>,
    Error = Infallible,
    Future = Either<F, Ready<Answer>>,
>
where
    H: Fn(Arc<Shared>, Arc<Client>, Request<Incoming>, Busy) -> F + Send + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let alpn_missing = speaks.load(Ordering::Relaxed) == UNKNOWN;
    service_fn(move |req: Request<Incoming>| {
        let v = speaks_of(&req);
        speaks.store(v, Ordering::Relaxed);
        if v == H2 && alpn_missing {
            return Either::Right(std::future::ready(Ok(h2_without_alpn())));
        }
        let busy = activity.busy(v == H1 && !req.body().is_end_stream());
        Either::Left(handle(shared.clone(), client.clone(), req, busy))
    })
}

/// What the service gives hyper for a request.
type Answer = Result<Response<ResponseBody>, Infallible>;

/// Whether a connection hyper ended may linger on its socket: HTTP/1 (or `unparsed`: hyper
/// answered a request it could not parse, which only HTTP/1 has, the connection's first
/// perhaps), and not handed to a tunnel by a `101` (the socket is the tunnel's then, and may
/// be closed already, its descriptor number another connection's).
fn lingers(speaks: u8, activity: &Activity, unparsed: bool) -> bool {
    (speaks == H1 || unparsed) && !activity.upgraded()
}

/// Whether hyper's connection failed on a request it could not parse. hyper then answers
/// `400`, `414` or `431` where it can, and the client may still be sending the request.
pub(super) fn answered_unparsed(e: &hyper::Error) -> bool {
    e.is_parse() || e.is_parse_too_large()
}

/// When the drain forces connections closed (or its sender is gone).
pub(super) async fn forced(phase: &mut watch::Receiver<Phase>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgraded_connection_never_lingers() {
        let activity = Arc::new(Activity::default());
        assert!(lingers(H1, &activity, false));
        assert!(!lingers(H2, &activity, false));
        assert!(!lingers(UNKNOWN, &activity, false));
        // A first request hyper could not parse: HTTP/1, though no request told so.
        assert!(lingers(UNKNOWN, &activity, true));
        activity.busy(false).upgrade();
        assert!(!lingers(H1, &activity, false));
    }
}
