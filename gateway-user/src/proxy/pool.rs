//! Keep-alive upstream connections: one bounded idle list per endpoint.
//!
//! A connection holds one of its cluster's connection slots (`max_connections`) for its whole
//! life, idle or busy, so dropping it frees the slot at once. The idle list is LIFO: the most
//! recently used connection is the likeliest to be alive and warm, and everything older than
//! the newest expired one is expired too. A connection goes back to the list only once hyper
//! says it is ready for another request, i.e. the previous response was read to the end.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper::client::conn::http1::SendRequest;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit},
    time::Instant,
};

use super::body::RequestBody;

/// One HTTP/1.1 connection to an upstream endpoint.
pub(crate) struct UpstreamConn {
    pub sender: SendRequest<RequestBody>,
    /// `SO_COOKIE` of the socket: the join key with the kernel's records.
    pub cookie: u64,
    /// How long the TCP connect took; `None` for a connection taken from the idle list.
    pub connect_time: Option<Duration>,
    idle_since: Instant,
    _slot: OwnedSemaphorePermit,
}

impl UpstreamConn {
    pub fn new(
        sender: SendRequest<RequestBody>,
        cookie: u64,
        connect_time: Duration,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        UpstreamConn {
            sender,
            cookie,
            connect_time: Some(connect_time),
            idle_since: Instant::now(),
            _slot: slot,
        }
    }
}

pub(crate) struct IdlePool {
    idle: Mutex<Vec<UpstreamConn>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Requests waiting for a connection of this endpoint (see `Cluster::checkout`).
    pub waiters: AtomicUsize,
    pub returned: Notify,
}

impl IdlePool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        IdlePool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            waiters: AtomicUsize::new(0),
            returned: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<UpstreamConn>> {
        // A panic while holding the lock cannot leave the list inconsistent.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently returned live connection, if any.
    pub fn take(&self) -> Option<UpstreamConn> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(mut c) = idle.pop() {
            if now.duration_since(c.idle_since) >= self.idle_timeout {
                idle.clear();
                return None;
            }
            if c.sender.is_ready() {
                c.connect_time = None;
                return Some(c);
            }
            // Closed by the upstream while idle: dropped here, which frees its slot.
        }
        None
    }

    /// Returns a connection that is ready for another request.
    pub fn put(&self, mut c: UpstreamConn) {
        c.idle_since = Instant::now();
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(c);
            drop(idle);
            if self.waiters.load(Ordering::Acquire) > 0 {
                self.returned.notify_one();
            }
        }
    }

    /// Closes the oldest idle connection, freeing its slot for another endpoint.
    pub fn evict_oldest(&self) -> bool {
        let mut idle = self.lock();
        if idle.is_empty() {
            false
        } else {
            idle.remove(0);
            true
        }
    }

    /// Closes expired and dead idle connections.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain(|c| {
            now.duration_since(c.idle_since) < self.idle_timeout && !c.sender.is_closed()
        });
    }
}
