//! A request's stream on a shared HTTP/2 connection ([`StreamGuard`]), and how a new
//! connection joins its endpoint's list once its first stream is in hyper's queue.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use super::{Connecting, H2Conn, Multiplexed, now_ms};

/// One stream's hold on its connection: counted while it lives.
pub(crate) struct StreamGuard {
    pub(super) conn: Arc<H2Conn>,
    /// The first stream of a new connection, which is not in its endpoint's list yet (boxed:
    /// the guard is in every request's future, this only in a connection's first).
    pub(super) unlisted: Option<Box<Unlisted>>,
}

/// Where a new connection goes once its first request is in hyper's queue
/// ([`Multiplexed::register`]).
pub(super) struct Unlisted {
    pub(super) mux: Arc<Multiplexed>,
    pub(super) shard: usize,
    /// Requests waiting for this connection see it when it is listed, not before.
    pub(super) connecting: Option<Connecting>,
}

impl StreamGuard {
    pub fn conn(&self) -> &Arc<H2Conn> {
        &self.conn
    }

    /// The first stream of a new connection: its request has been handed to hyper (or never
    /// will be), so other requests may take streams on it now, behind it.
    ///
    /// Not before the upstream's first SETTINGS frame, which says how many streams it allows
    /// (usually there already: a server sends it as soon as it accepts): the requests waiting
    /// for this connection wait for that too, up to [`SETTINGS_WAIT`], rather than pile onto
    /// a connection whose limit is not known yet.
    pub fn list(&mut self) {
        let Some(u) = self.unlisted.take() else {
            return;
        };
        if self.conn.settings.known() {
            return u.list(&self.conn);
        }
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SETTINGS_WAIT, conn.settings.first()).await;
            u.list(&conn);
        });
    }

    /// Keeps the count of the connection being made (which requests wait for) until the
    /// connection is listed.
    pub fn hold_connecting(&mut self, c: Connecting) {
        if let Some(u) = self.unlisted.as_mut() {
            u.connecting = Some(c);
        }
    }
}

impl Unlisted {
    fn list(self, conn: &Arc<H2Conn>) {
        let mut shard = self.mux.lock(self.shard);
        // Under the lock `close` takes after marking the endpoint closed: a connection made
        // before the close and listed after it is retired, not kept.
        if self.mux.closed.load(Ordering::Acquire) {
            conn.retire();
        } else {
            shard.conns.push(conn.clone());
        }
        drop(shard);
        // A limit of 0 is for now, not for how many a new connection will take.
        let said = conn.settings.max_streams();
        if conn.settings.known() && said > 0 {
            self.mux.advertised.store(said, Ordering::Relaxed);
        }
        self.mux.freed.notify();
        drop(self.connecting);
    }
}

/// How long the requests waiting for a new connection wait for its upstream's first SETTINGS
/// frame (see [`StreamGuard::list`]).
const SETTINGS_WAIT: Duration = Duration::from_secs(1);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // Listed now if it never was: its stream is over, whatever the settings.
        if let Some(u) = self.unlisted.take() {
            u.list(&self.conn);
        }
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        }
        self.conn.freed.notify();
    }
}
