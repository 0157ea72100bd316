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

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tracing::warn;

use super::{
    admission::{self, AcceptFailure},
    headers::{self, Scheme},
    listeners::ClientSocket,
    proxy_protocol,
    request::Client,
    shared::{Drain, Shared},
};

pub(crate) use super::shared::Phase;

mod anchor;
mod handoff;
mod lot;
mod park;
mod quiet;
mod rejected;
mod serve;
mod woken;

pub(crate) use handoff::Spread;
use handoff::{Handoff, take_handoffs};

use anchor::{AbortOnDrop, timer_anchor};
use lot::Lot;
use serve::{H1, H2, UNKNOWN, answered_unparsed, forced, serve, serve_tls};

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
