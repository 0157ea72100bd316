//! Getting a connection for a request, and giving it back.
//!
//! [`checkout`]: a connection already open — an idle HTTP/1.1 one, or a stream on an HTTP/2
//! one with room (`multiplex`) — if there is one; else a new one if a connection slot
//! (`max_connections`) is free; else another worker's, or an idle connection to another
//! endpoint closed to free its slot; else the request waits in the pending queue (at most
//! `max_pending_requests`, beyond which it is answered 503 `overloaded` at once) for a
//! connection or a stream to come back or a slot to free up. An HTTP/2 request whose worker is
//! already making a connection with room for it waits for that one instead of making its own.
//!
//! [`release`]: an HTTP/1.1 connection whose response was read to the end goes back to the
//! idle list once hyper has seen the end too; an HTTP/2 stream just ends (its connection stays
//! with the endpoint).

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    Cluster,
    connect::new_connection,
    endpoint::{Endpoint, InFlight},
    hedge::Hedging,
    multiplex::Wait,
    pool::UpstreamConn,
};
use crate::{config::UpstreamProtocol, proxy::error::ProxyError};

/// An upstream connection lent to one request, with the endpoint's in-flight count.
pub(crate) struct Lease {
    pub conn: UpstreamConn,
    pub endpoint: Arc<Endpoint>,
    pub idle_timeout: Duration,
    pub _in_flight: InFlight,
}

impl Lease {
    /// The response was read to the end: the connection may serve another request.
    pub fn release(self) {
        release(self.endpoint, self.conn, self.idle_timeout);
    }
}

/// What a request asks of `checkout`.
pub(crate) struct Want<'a> {
    /// Endpoints this request tried (never a hedge's target).
    pub tried: &'a (dyn Fn(SocketAddr) -> bool + Sync),
    /// A new connection only, never one already open (after a stale one broke, or a GOAWAY).
    pub fresh: bool,
    pub hedging: Hedging,
    /// Whether the request could go elsewhere if this connect were given up: another
    /// endpoint, and a retry its policy and the retry budget allow
    /// (`decide::deadline::gives_up_at_deadline`).
    /// Asked only when a connect passes its deadline.
    pub elsewhere: &'a (dyn Fn() -> bool + Sync),
    /// Set while the request waits for a connection to free up, every one of the cluster's
    /// `max_connections` being in use: what a request timeout that ends the wait says.
    pub waiting: &'a AtomicBool,
}

/// A connection already open to `ep`, taken at once: an idle HTTP/1.1 one, or a stream on an
/// HTTP/2 one. `now` may be a little in the past (the request's arrival).
pub(crate) fn reuse(cluster: &Cluster, ep: &Endpoint, now: Instant) -> Option<UpstreamConn> {
    match cluster.spec.protocol {
        UpstreamProtocol::Http1 => ep.pool.take(now),
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => ep.mux.take(),
        UpstreamProtocol::Auto => ep.mux.take().or_else(|| ep.pool.take(now)),
    }
}

/// Whether new connections to `ep` speak HTTP/2 (so that requests may wait for one being
/// made): always for `h2c` and `h2`, for `auto` once the endpoint chose it.
fn multiplexed(cluster: &Cluster, ep: &Endpoint) -> bool {
    match cluster.spec.protocol {
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => true,
        UpstreamProtocol::Auto => ep.mux.speaks_h2.load(Ordering::Relaxed),
    }
}

/// A connection to `ep`, or to another endpoint when a hedged connect won (see `hedge`).
pub(crate) async fn checkout(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    want: Want<'_>,
) -> Result<(Arc<Endpoint>, UpstreamConn), ProxyError> {
    let fresh = want.fresh;
    let h2 = multiplexed(cluster, ep) && !fresh;
    loop {
        want.waiting.store(false, Ordering::Relaxed);
        if !fresh && let Some(c) = reuse(cluster, ep, Instant::now()) {
            return Ok((ep.clone(), c));
        }
        // HTTP/2: registered before looking again, so that a stream or a connection freed
        // from here on wakes this request.
        let mut freed = h2.then(|| ep.mux.freed.waiter());
        let mut connecting = None;
        if let Some(w) = freed.as_mut() {
            if let Some(c) = ep.mux.take() {
                return Ok((ep.clone(), c));
            }
            match ep.mux.plan() {
                Wait::Connect(c) => connecting = Some(c),
                Wait::ForConnect(_waiting) => {
                    w.await;
                    continue;
                }
            }
        }
        if let Ok(slot) = cluster.slots.clone().try_acquire_owned() {
            // Other requests to the endpoint wait on an HTTP/2 connection being made.
            let awaited = connecting.is_some();
            let mut made = new_connection(cluster, ep, slot, &want, awaited).await;
            if let (Ok((_, c)), Some(k)) = (made.as_mut(), connecting) {
                c.hold_connecting(k);
            }
            return made;
        }
        drop(connecting);
        // All slots busy: use another worker's connection to this endpoint, or close an idle
        // connection to another endpoint to make room.
        if !fresh && let Some(c) = steal(ep) {
            return Ok((ep.clone(), c));
        }
        if cluster.set.evict_idle_except(ep)
            || (fresh && (ep.pool.evict_oldest() || ep.mux.evict_idle()))
        {
            continue;
        }
        let limit = cluster.spec.limits.max_pending_requests;
        if cluster.pending.fetch_add(1, Ordering::AcqRel) >= limit {
            cluster.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(ProxyError::Overloaded {
                cluster: cluster.spec.name.clone(),
                limit,
            });
        }
        let _pending = Decrement(&cluster.pending);
        ep.pool.waiters.fetch_add(1, Ordering::AcqRel);
        let _waiting = Decrement(&ep.pool.waiters);
        let stream_freed = async {
            match freed.as_mut() {
                Some(w) => w.await,
                None => std::future::pending().await,
            }
        };
        want.waiting.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = ep.pool.returned.notified(), if !fresh => continue,
            _ = stream_freed => continue,
            slot = cluster.slots.clone().acquire_owned() => {
                let slot = slot.expect("the cluster never closes its semaphore");
                want.waiting.store(false, Ordering::Relaxed);
                return new_connection(cluster, ep, slot, &want, false).await;
            }
        }
    }
}

fn steal(ep: &Endpoint) -> Option<UpstreamConn> {
    ep.mux.steal().or_else(|| ep.pool.steal())
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Puts an HTTP/1.1 connection whose response was read to the end back in the idle list,
/// once hyper has seen the end too (at most `idle_timeout` later; else it is closed). An
/// HTTP/2 stream is over: dropping it frees its place on the shared connection.
pub(crate) fn release(ep: Arc<Endpoint>, mut conn: UpstreamConn, idle_timeout: Duration) {
    if conn.is_http2() {
        return;
    }
    if conn.is_ready() {
        ep.pool.put(conn);
        return;
    }
    if conn.is_closed() {
        return;
    }
    tokio::spawn(async move {
        let ready = poll_fn(|cx| conn.poll_ready(cx));
        if let Ok(Ok(())) = tokio::time::timeout(idle_timeout, ready).await {
            ep.pool.put(conn);
        }
    });
}
