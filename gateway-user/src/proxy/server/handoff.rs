//! Connections handed from the worker that accepted them to the worker that serves them
//! (`[router] connection_balance = "exact"`; who takes which: `proxy::spread`).

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpStream, sync::mpsc};
use tracing::warn;

use super::{Listener, Lot, serve_accepted};
use crate::{
    config::ConnectionBalance,
    metrics::GatewayMetrics,
    proxy::{
        admission,
        shared::{Drain, Shared},
        spread::Loads,
    },
};

/// A connection one worker accepted and another is to serve.
pub(crate) struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    on: Listener,
    permit: admission::Permit,
}

/// What each worker knows of all: how many connections each serves, and where to hand one over.
#[derive(Clone)]
pub(crate) struct Spread {
    loads: Arc<Loads>,
    inboxes: Arc<[mpsc::UnboundedSender<Handoff>]>,
}

impl Spread {
    /// For `workers` workers: the view they share, and each one's inbox.
    pub fn new(
        workers: usize,
        metrics: &GatewayMetrics,
    ) -> (Spread, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let loads = Loads::new(workers, metrics);
        let (inboxes, receivers) = (0..loads.workers())
            .map(|_| mpsc::unbounded_channel())
            .unzip::<_, _, Vec<_>, Vec<_>>();
        let inboxes = inboxes.into();
        (Spread { loads, inboxes }, receivers)
    }

    /// Counts a connection worker `me` accepted on the worker that is to serve it; `None`
    /// when that is `me`, else the connection is on its way there, or given back when that
    /// worker has stopped taking connections (then counted on `me`).
    pub(super) fn place(
        &self,
        me: usize,
        balance: ConnectionBalance,
        stream: TcpStream,
        peer: SocketAddr,
        on: Listener,
        mut permit: admission::Permit,
    ) -> Option<(TcpStream, admission::Permit)> {
        let to = match balance {
            ConnectionBalance::Exact => self.loads.place(me),
            ConnectionBalance::Kernel => me,
        };
        permit.serve_on(self.loads.count(to));
        if to == me {
            return Some((stream, permit));
        }
        let back = match stream.into_std() {
            Ok(stream) => {
                let h = Handoff {
                    stream,
                    peer,
                    on,
                    permit,
                };
                let Err(mpsc::error::SendError(h)) = self.inboxes[to].send(h) else {
                    return None;
                };
                self.loads.retire(to);
                TcpStream::from_std(h.stream).map(|s| (s, h.permit))
            }
            Err(e) => Err(e),
        };
        match back {
            Ok((stream, mut permit)) => {
                permit.serve_on(self.loads.count(me));
                Some((stream, permit))
            }
            Err(e) => {
                warn!(client = %peer, error = %e, "could not move a client connection between workers; closed");
                None
            }
        }
    }
}

/// Serves the connections other workers hand over until the phase is `Drain` or `Force`, and
/// then those already on their way.
pub(super) async fn take_handoffs(
    mut inbox: mpsc::UnboundedReceiver<Handoff>,
    shared: Arc<Shared>,
    drain: Drain,
    lot: Lot,
) {
    let mut phase = drain.phase.clone();
    let take = |h: Handoff| match TcpStream::from_std(h.stream) {
        Ok(s) => serve_accepted(s, h.peer, h.on, h.permit, &shared, &drain, &lot),
        Err(e) => {
            warn!(client = %h.peer, error = %e, "cannot register a client connection another worker handed over; closed")
        }
    };
    loop {
        tokio::select! {
            h = inbox.recv() => match h {
                Some(h) => take(h),
                None => return,
            },
            changed = phase.changed() => {
                if changed.is_err() || !phase.borrow().accepting() {
                    break;
                }
            }
        }
    }
    inbox.close();
    while let Ok(h) = inbox.try_recv() {
        take(h);
    }
}
