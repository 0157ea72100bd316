//! Plain HTTP client connections, parked while idle: an idle keep-alive connection is held as
//! its bare socket in the worker's parking lot (`lot`), not as a task with a hyper connection
//! and its buffers.
//!
//! hyper's HTTP/1 connection keeps a read buffer and a write buffer of 8 KiB each for its
//! whole life, idle or not: about 21 KiB of memory per idle keep-alive client connection,
//! where nginx documents about 250 bytes. So a plain HTTP/1 connection is served by one hyper
//! connection after another: once nothing moved on it for [`PARK_AFTER`] and no request is
//! running, hyper is asked to stop (`graceful_shutdown`, which closes an idle HTTP/1
//! connection at once) without shutting the socket down (`Parkable` swallows the shutdown),
//! and gives the socket back with what it had read but not parsed (`into_parts`). With
//! nothing left over, the socket goes to the lot and the task ends; the lot starts a new one
//! ([`resume`]) when the client sends again, and closes the socket at the header-read timeout
//! (which bounds an idle keep-alive connection, as before) or at the drain. A new connection
//! waits for its first bytes with no hyper connection either; they also tell HTTP/1 from
//! HTTP/2 with prior knowledge (served as before, never parked).
//!
//! What is never parked: a request in flight or a response being written (a request counts
//! as running until its response is over), an upgraded connection (the tunnel owns the
//! socket), a connection whose last request had a body (hyper may not have read all of it,
//! and what is left must never be read as a request), and one that sent part of its next
//! head (hyper will not give it up: asked to stop, it serves that request with `Connection:
//! close`). A connection that does not end with no more I/O once asked to stop was busy after
//! all: hyper finished it and meant to close it, and it is closed. Bytes hyper read but did
//! not parse are handed to the next hyper connection first; such a connection is not parked
//! again until that request starts. HTTPS connections are not parked: rustls keeps its own
//! buffers per connection.

use std::{os::fd::AsRawFd as _, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use hyper::{
    body::{Body as _, Incoming},
    server::conn::http1::UpgradeableConnection,
    service::{HttpService, service_fn},
};
use hyper_util::rt::TokioIo;
use tokio::{io::Interest, net::TcpStream, sync::watch, time::Instant};
use tracing::debug;

use super::{
    super::{
        admission::Permit,
        io::{Activity, Holding, Parkable, StallGuard, linger, peek},
        request::{self, Client},
        shared::Shared,
    },
    Listener, Phase,
    lot::{Lot, Parked},
    woken::WhenWoken,
};

/// How long an HTTP/1 client connection is quiet (no byte read or written, no request
/// running) before it is parked; it is parked within twice this.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);

/// How often a connection that sent part of the HTTP/2 preface is looked at again.
const PREFACE_POLL: Duration = Duration::from_millis(5);

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client socket with its place in the counts: dropped together, whoever holds them (an
/// upgraded connection's tunnel too).
type Socket = Holding<StallGuard<TcpStream>, Permit>;

/// Serves a plain client connection until it ends or is parked.
pub(super) async fn serve(
    stream: TcpStream,
    client: Arc<Client>,
    permit: Permit,
    shared: Arc<Shared>,
    lot: Lot,
) {
    let mut phase = client.drain.phase.clone();
    let (header_timeout, write_timeout) = {
        let rt = shared.runtime.load();
        let ds = &rt.settings.downstream;
        (ds.header_read_timeout, ds.write_timeout)
    };
    let deadline = Instant::now() + header_timeout;
    let parked = shared.admission.park();
    let h2 = first_bytes(&stream, deadline, &mut phase).await;
    drop(parked);
    match h2 {
        None => {}
        Some(h2) => {
            let io = Holding::new(StallGuard::new(stream, write_timeout), permit);
            if h2 {
                // Boxed: the connection's task stays small for the common case, HTTP/1.
                Box::pin(super::serve(io, client, shared, true, None)).await;
            } else {
                serve_h1(io, client, shared, lot, phase).await;
            }
        }
    }
}

/// Serves a connection the lot woke up: its client sent something, or closed.
pub(super) async fn resume(
    stream: TcpStream,
    client: Arc<Client>,
    permit: Permit,
    shared: Arc<Shared>,
    lot: Lot,
) {
    let write_timeout = shared.runtime.load().settings.downstream.write_timeout;
    let phase = client.drain.phase.clone();
    let io = Holding::new(StallGuard::new(stream, write_timeout), permit);
    serve_h1(io, client, shared, lot, phase).await;
}

/// One hyper HTTP/1 connection after another on one socket, until it ends or is parked (in
/// the worker's lot, which ends this task).
async fn serve_h1(
    mut io: Socket,
    client: Arc<Client>,
    shared: Arc<Shared>,
    lot: Lot,
    mut phase: watch::Receiver<Phase>,
) {
    let activity = Arc::new(Activity::default());
    let svc = {
        let (shared, client, activity) = (shared.clone(), client.clone(), activity.clone());
        service_fn(move |req: http::Request<Incoming>| {
            let busy = activity.busy(!req.body().is_end_stream());
            request::handle(shared.clone(), client.clone(), req, busy)
        })
    };
    let mut pending = Bytes::new();
    loop {
        let (builder, header_timeout) = {
            let rt = shared.runtime.load();
            (rt.http1.clone(), rt.settings.downstream.header_read_timeout)
        };
        activity.set_parking(false);
        // Part of a head carried over: not parked again until that request starts, so that
        // the head's read timeout restarts at most once.
        let park_after_request = (!pending.is_empty()).then(|| activity.requests());
        let io_ = Parkable::new(io, std::mem::take(&mut pending), activity.clone());
        let mut conn = Box::new(
            builder
                .serve_connection(TokioIo::new(io_), svc.clone())
                .with_upgrades(),
        );
        let parked_at = drive(
            &mut conn,
            &activity,
            (park_after_request, header_timeout),
            &mut phase,
            (&shared, &client),
        );
        let parked_at = match parked_at.await {
            Driven::Parked(at) => at,
            Driven::Cut => return,
            Driven::Closed { unparsed } => {
                // The socket alone: hyper's buffers (64 KiB and more after an upload) are
                // freed before the wait.
                let socket = conn.into_parts().map(|p| p.io.into_inner().into_inner().0);
                let had_body = activity.had_body() || unparsed;
                return linger_closed(socket, had_body, &mut phase).await;
            }
        };
        let Some(parts) = conn.into_parts() else {
            // Upgraded: the tunnel has the socket (and with it the connection's place in the
            // counts), and shuts it down when it ends.
            activity.set_parking(false);
            return;
        };
        let (socket, unread) = parts.io.into_inner().into_inner();
        io = socket;
        pending = leftover(parts.read_buf, unread);
        if pending.is_empty() {
            // Quiet since at least `PARK_AFTER` before: the head-read timeout ran from then.
            let deadline = parked_at - PARK_AFTER + header_timeout;
            let (io, permit) = io.into_parts();
            let Ok(stream) = io.into_inner().into_std() else {
                return;
            };
            // A lot that is gone (the drain started) closes the connection.
            let _ = lot.park(Parked {
                stream,
                peer: client.addr,
                on: Listener::of(&client),
                permit,
                deadline,
            });
            return;
        }
    }
}

/// The socket of a connection hyper ended (`None`: upgraded, the tunnel has it) lingers before
/// it closes (`io::linger`), holding its permit meanwhile.
async fn linger_closed(socket: Option<Socket>, had_body: bool, phase: &mut watch::Receiver<Phase>) {
    if let Some(socket) = socket {
        let (io, _permit) = socket.into_parts();
        linger::after_response(&io.into_inner(), had_body, super::forced(phase)).await;
    }
}

/// How [`drive`] ended.
enum Driven {
    /// Stopped to be parked, quiet since [`PARK_AFTER`] before this instant.
    Parked(Instant),
    /// hyper ended the connection (a response with `Connection: close`, the client's end of
    /// the stream, or, `unparsed`, a request it could not parse, which the client may still be
    /// sending); it shut the socket down unless a parking attempt swallowed that. The socket
    /// may linger (`io::linger`).
    Closed { unparsed: bool },
    /// Ended otherwise: an error, the header-read timeout, the drain's force.
    Cut,
}

/// Polls hyper's connection until it ends, or until it stopped to be parked. With
/// `park_after_request`, only once more requests than that have started.
///
/// It also enforces the header-read timeout (hyper's is off on these connections, see
/// `shared::http1_builder`): a connection with no request running (no response in flight
/// either) and no new request for `header_timeout` is closed, as hyper's timer would have
/// closed it. Looked at every [`head_check_step`], never before the timeout and at most two
/// steps (a quarter of it) after.
async fn drive<S>(
    conn: &mut UpgradeableConnection<TokioIo<Parkable<Socket>>, S>,
    activity: &Activity,
    (park_after_request, header_timeout): (Option<u64>, Duration),
    phase: &mut watch::Receiver<Phase>,
    (shared, client): (&Shared, &Client),
) -> Driven
where
    S: HttpService<Incoming, ResBody = crate::proxy::response_body::ResponseBody> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let start = Instant::now();
    let step = head_check_step(header_timeout);
    let mut seen = activity.ticks();
    let mut park_due = start + PARK_AFTER;
    let mut check = start + step;
    let mut head = HeadWait(Some((start, activity.requests())));
    // When the connection was asked to stop for parking, and its I/O count then.
    let mut parking: Option<(Instant, u64)> = None;
    let mut closing = false;
    loop {
        // The checks' timer and the drain's watch, polled only when one of them woke the
        // task, not at each of the connection's wake-ups (see `woken`).
        let rare = WhenWoken::new(async {
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(check), if parking.is_none() => Rare::Check,
                changed = phase.changed() => Rare::Phase { sender_gone: changed.is_err() },
            }
        });
        tokio::select! {
            // The connection first: it is what wakes this task, several times per request,
            // and an unbiased select would draw a random number at each wake-up.
            biased;
            r = &mut *conn => {
                if let Err(e) = r {
                    return ended_with(&e, shared, client);
                }
                // An idle connection ends with no more I/O. One that read or wrote after it
                // was asked to stop was busy after all (a response still being flushed): hyper
                // finished it and meant to close it, as it would have without parking.
                return match parking {
                    Some((at, t)) if !closing && activity.ticks() == t => Driven::Parked(at),
                    _ => Driven::Closed { unparsed: false },
                };
            }
            event = rare => match event {
                Rare::Check => {
                    let now = Instant::now();
                    check = now + step;
                    if head.overdue(activity, now, header_timeout) {
                        debug!(client = %client.addr, "header read timeout");
                        return Driven::Cut;
                    }
                    if closing || now < park_due {
                        continue;
                    }
                    let ticks = activity.ticks();
                    let may = park_after_request.is_none_or(|r| activity.requests() > r);
                    if ticks == seen && activity.idle() && may {
                        activity.set_parking(true);
                        std::pin::Pin::new(&mut *conn).graceful_shutdown();
                        parking = Some((now, ticks));
                    } else {
                        seen = ticks;
                        park_due = now + PARK_AFTER;
                    }
                }
                Rare::Phase { sender_gone } => {
                    let p = if sender_gone { Phase::Force } else { *phase.borrow() };
                    if on_phase(conn, activity, p, &mut closing) {
                        return Driven::Cut;
                    }
                }
            }
        }
    }
}

/// hyper's connection failed with `e`: noted; `Closed` when it failed on a request it could not
/// parse (answered `400`, `414` or `431` where hyper could), an answer not to be reset away,
/// `Cut` otherwise.
fn ended_with(e: &hyper::Error, shared: &Shared, client: &Client) -> Driven {
    debug!(client = %client.addr, error = %e, "client connection ended with an error");
    super::rejected::note(shared, client, e);
    if super::answered_unparsed(e) {
        Driven::Closed { unparsed: true }
    } else {
        Driven::Cut
    }
}

/// The drain's phase changed to `p` (`Force` when its sender is gone): whether the connection
/// ends now. At `Drain`, one that has served a request is asked to close (`closing`).
fn on_phase<S>(
    conn: &mut UpgradeableConnection<TokioIo<Parkable<Socket>>, S>,
    activity: &Activity,
    p: Phase,
    closing: &mut bool,
) -> bool
where
    S: HttpService<Incoming, ResBody = crate::proxy::response_body::ResponseBody> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match p {
        // HTTP/1 connections close after their next response instead: closing an idle one
        // now would race the request its client may be sending.
        Phase::Run | Phase::Deregister => false,
        // Not cut off before its first request: it is served, with `Connection: close` (see
        // `super::serve`).
        Phase::Drain if activity.requests() == 0 || *closing => false,
        Phase::Drain => {
            activity.set_parking(false);
            std::pin::Pin::new(&mut *conn).graceful_shutdown();
            *closing = true;
            false
        }
        Phase::Force => true,
    }
}

/// Since when a connection has had no request running and no new one started, with the
/// request count then, as of [`drive`]'s latest look: its next head has been awaited at least
/// since then (`None` while a request runs).
struct HeadWait(Option<(Instant, u64)>);

impl HeadWait {
    /// Looks at `now`: whether the next head has been awaited for `timeout`.
    fn overdue(&mut self, activity: &Activity, now: Instant, timeout: Duration) -> bool {
        let requests = activity.requests();
        self.0 = match self.0 {
            _ if !activity.between_requests() => None,
            Some((since, r)) if r == requests => {
                if now.saturating_duration_since(since) >= timeout {
                    return true;
                }
                Some((since, r))
            }
            _ => Some((now, requests)),
        };
        false
    }
}

/// How often [`drive`] looks at a connection: every [`PARK_AFTER`], or an eighth of the
/// header-read timeout when that is shorter (so that the timeout is late by a quarter at most).
fn head_check_step(header_timeout: Duration) -> Duration {
    PARK_AFTER
        .min(header_timeout / 8)
        .max(Duration::from_millis(1))
}

/// What woke one of [`drive`]'s rare branches.
enum Rare {
    /// The header-read and park checks are due.
    Check,
    /// The drain's phase changed, or its sender is gone.
    Phase { sender_gone: bool },
}

/// Waits, holding no buffer, for the client's first bytes, and says whether they are the
/// HTTP/2 connection preface (prior knowledge), read with `MSG_PEEK` so that the server reads
/// them again. `None`: the client closed, sent nothing by `deadline`, or the drain was forced.
/// The drain itself does not end the wait: a connection accepted just before it is served
/// once, with `Connection: close`.
async fn first_bytes(
    stream: &TcpStream,
    deadline: Instant,
    phase: &mut watch::Receiver<Phase>,
) -> Option<bool> {
    if *phase.borrow_and_update() == Phase::Force {
        return None;
    }
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        tokio::select! {
            r = stream.readable() => r.ok()?,
            _ = tokio::time::sleep_until(deadline) => return None,
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Force {
                    return None;
                }
                continue;
            }
        }
        // tokio may say readable when it is not (a freshly accepted socket here often is):
        // a peek that would block clears that, and the loop waits again.
        let n = match stream.try_io(Interest::READABLE, || peek(stream.as_raw_fd(), &mut buf)) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // hyper meets the error and ends the connection.
            Err(_) => return Some(false),
        };
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A beginning of the preface: the socket stays readable, so look again later.
        tokio::time::sleep(PREFACE_POLL).await;
    }
}

/// What hyper had read and not parsed, then what it had not read of the previous leftover,
/// copied: even an empty `Bytes` split from hyper's read buffer keeps all 8 KiB of it.
fn leftover(read_buf: Bytes, unread: Bytes) -> Bytes {
    if read_buf.is_empty() && unread.is_empty() {
        return Bytes::new();
    }
    let mut b = BytesMut::with_capacity(read_buf.len() + unread.len());
    b.extend_from_slice(&read_buf);
    b.extend_from_slice(&unread);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_keeps_the_order_of_the_bytes() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(
            leftover(b("GET / HT"), b("TP/1.1\r\n")),
            b("GET / HTTP/1.1\r\n")
        );
        assert_eq!(leftover(b(""), b("x")), b("x"));
        assert_eq!(leftover(b("x"), b("")), b("x"));
    }
}
