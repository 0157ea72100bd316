//! Getting a connection for a request, and giving it back.
//!
//! [`checkout`]: an idle connection to the endpoint if there is one; else a new one if a
//! connection slot (`max_connections`) is free; else another worker's idle connection, or an
//! idle connection to another endpoint closed to free its slot; else the request waits in the
//! pending queue (at most `max_pending_requests`, beyond which it is answered 503
//! `overloaded` at once) for a connection to come back or a slot to free up.
//!
//! [`release`]: a connection whose response was read to the end goes back to the idle list
//! once hyper has seen the end too.

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    Cluster,
    connect::new_connection,
    endpoint::{Endpoint, InFlight},
    pool::UpstreamConn,
};
use crate::proxy::error::ProxyError;

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

/// A connection to `ep`, or to another endpoint when a hedged connect won (see `hedge`).
/// `fresh`: a new connection only, never an idle one (after a stale one broke).
pub(crate) async fn checkout(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    tried: &(dyn Fn(SocketAddr) -> bool + Sync),
    fresh: bool,
) -> Result<(Arc<Endpoint>, UpstreamConn), ProxyError> {
    loop {
        if !fresh && let Some(c) = ep.pool.take(Instant::now()) {
            return Ok((ep.clone(), c));
        }
        if let Ok(slot) = cluster.slots.clone().try_acquire_owned() {
            return new_connection(cluster, ep, slot, tried).await;
        }
        // All slots busy: use another worker's idle connection to this endpoint, or close an
        // idle connection to another endpoint to make room.
        if !fresh && let Some(c) = ep.pool.steal() {
            return Ok((ep.clone(), c));
        }
        if cluster.set.evict_idle_except(ep) || (fresh && ep.pool.evict_oldest()) {
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
        tokio::select! {
            _ = ep.pool.returned.notified(), if !fresh => continue,
            slot = cluster.slots.clone().acquire_owned() => {
                let slot = slot.expect("the cluster never closes its semaphore");
                return new_connection(cluster, ep, slot, tried).await;
            }
        }
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Puts a connection whose response was read to the end back in the idle list, once hyper has
/// seen the end too (at most `idle_timeout` later; else it is closed).
pub(crate) fn release(ep: Arc<Endpoint>, mut conn: UpstreamConn, idle_timeout: Duration) {
    if conn.sender.is_ready() {
        ep.pool.put(conn);
        return;
    }
    if conn.sender.is_closed() {
        return;
    }
    tokio::spawn(async move {
        let ready = poll_fn(|cx| conn.sender.poll_ready(cx));
        if let Ok(Ok(())) = tokio::time::timeout(idle_timeout, ready).await {
            ep.pool.put(conn);
        }
    });
}
