//! How many client connections each worker serves, and which worker should take the next one
//! (`[router] connection_balance = "exact"`).
//!
//! Each worker accepts on its own `SO_REUSEPORT` socket, and the kernel picks the socket by a
//! hash of the connection's 4-tuple: a random split. For many short connections that evens out;
//! for a few long-lived ones (a load balancer's keep-alive pool in front of the gateway) it
//! does not, and the split lasts as long as the connections do: 64 connections over two
//! workers came out 26/39 in one of five tries here, and 4 over 2 workers are 3/1 or 4/0 more
//! often than not. A worker with more connections than another makes each of its clients wait
//! longer, while the other has time to spare.
//!
//! So a worker that accepts a connection while another worker has fewer open hands it over
//! (`server`), and the workers stay within one connection of each other, as HAProxy's
//! accept queues and Envoy's `exact_balance` keep them. The cost is one cross-thread hand-over
//! per connection moved, none per request. The count is of connections open, parked ones
//! included: an idle keep-alive connection may be busy again any moment.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{GatewayMetrics, WorkerLabels};

/// Set in a retired worker's count: more than any worker will ever have open, and set once
/// however often a hand-over to it fails.
const RETIRED: usize = 1 << 40;

/// The connections open on each worker.
pub(crate) struct Loads {
    open: Box<[AtomicUsize]>,
    gauges: Box<[Gauge]>,
}

impl Loads {
    pub fn new(workers: usize, metrics: &GatewayMetrics) -> Arc<Loads> {
        let workers = workers.max(1);
        Arc::new(Loads {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            gauges: (0..workers)
                .map(|i| {
                    let worker = u16::try_from(i).unwrap_or(u16::MAX);
                    metrics
                        .worker_connections
                        .get_or_create(&WorkerLabels { worker })
                        .clone()
                })
                .collect(),
        })
    }

    pub fn workers(&self) -> usize {
        self.open.len()
    }

    /// The worker that should serve a connection worker `me` just accepted: `me`, unless
    /// another worker has fewer connections open (then the one with the fewest, the lowest
    /// index among equals).
    pub fn place(&self, me: usize) -> usize {
        let mut best = me;
        let mut least = self.open[me].load(Ordering::Relaxed);
        for (i, open) in self.open.iter().enumerate() {
            let n = open.load(Ordering::Relaxed);
            if n < least {
                (best, least) = (i, n);
            }
        }
        best
    }

    /// Takes `worker` out of [`Loads::place`]'s choices for good: it no longer takes
    /// connections (its runtime failed to start or it ended), and each connection sent its way
    /// would only come back. Its own connections still count down as they end.
    pub fn retire(&self, worker: usize) {
        self.open[worker].fetch_or(RETIRED, Ordering::Relaxed);
    }

    /// Counts a connection on `worker` until the returned [`Load`] is dropped.
    pub fn count(self: &Arc<Self>, worker: usize) -> Load {
        self.open[worker].fetch_add(1, Ordering::Relaxed);
        self.gauges[worker].inc();
        Load {
            loads: self.clone(),
            worker,
        }
    }
}

/// A connection's place in its worker's count.
pub(crate) struct Load {
    loads: Arc<Loads>,
    worker: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.loads.open[self.worker].fetch_sub(1, Ordering::Relaxed);
        self.loads.gauges[self.worker].dec();
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::metrics::LatencyBuckets;

    fn loads(workers: usize) -> Arc<Loads> {
        let m = GatewayMetrics::new(
            &mut Registry::default(),
            LatencyBuckets::reaching(std::time::Duration::ZERO),
        );
        Loads::new(workers, &m)
    }

    #[test]
    fn a_connection_goes_to_the_worker_with_the_fewest_and_stays_when_none_has_fewer() {
        let l = loads(3);
        let mut held = Vec::new();
        // Worker 0 accepts everything (the kernel's hash favoured it): the connections go
        // round the workers, never more than one apart.
        for _ in 0..10 {
            let to = l.place(0);
            held.push(l.count(to));
            let open: Vec<usize> = l.open.iter().map(|n| n.load(Ordering::Relaxed)).collect();
            assert!(
                open.iter().max().unwrap() - open.iter().min().unwrap() <= 1,
                "{open:?}"
            );
        }
        assert_eq!(l.place(1), 1, "4/3/3: worker 1 keeps what it accepts");
        assert_eq!(
            l.place(0),
            1,
            "worker 0 has 4: to the first with the fewest"
        );
        // Connections that end free their place.
        held.retain(|x| x.worker != 2);
        assert_eq!(l.place(0), 2);
        assert_eq!(l.gauges[2].get(), 0);
        assert_eq!(l.gauges[0].get(), 4);
    }

    #[test]
    fn a_retired_worker_is_never_chosen() {
        let l = loads(2);
        let _a = l.count(0);
        l.retire(1);
        assert_eq!(l.place(0), 0, "worker 1 has none open but takes none");
        assert_eq!(l.place(1), 0);
    }

    #[test]
    fn one_worker_keeps_everything() {
        let l = loads(1);
        let _a = l.count(l.place(0));
        assert_eq!(l.place(0), 0);
        assert_eq!(l.workers(), 1);
    }
}
