//! How full each cluster's connection limit is: the connections it holds, its
//! `max_connections`, and the requests waiting for one to free up. Read every second
//! (`proxy::refresh_metrics`); a request that waits out its timeout for a connection says so
//! too (`Phase::WaitingForAConnection`).

use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{ClusterLabels, GatewayMetrics};

pub(crate) struct ConnectionsMeter {
    held: Gauge,
    max: Gauge,
    pending: Gauge,
}

impl ConnectionsMeter {
    pub fn new(m: &GatewayMetrics, cluster: &str) -> ConnectionsMeter {
        let labels = ClusterLabels {
            cluster: cluster.to_owned(),
        };
        ConnectionsMeter {
            held: m.upstream_connections.get_or_create(&labels).clone(),
            max: m.upstream_max_connections.get_or_create(&labels).clone(),
            pending: m.upstream_pending.get_or_create(&labels).clone(),
        }
    }

    /// The connections held, of `max`, and the requests waiting for one.
    pub fn set(&self, held: usize, max: usize, pending: usize) {
        let g = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.held.set(g(held));
        self.max.set(g(max));
        self.pending.set(g(pending));
    }

    /// The cluster is gone: its series go too.
    pub fn remove(m: &GatewayMetrics, cluster: &str) {
        let labels = ClusterLabels {
            cluster: cluster.to_owned(),
        };
        m.upstream_connections.remove(&labels);
        m.upstream_max_connections.remove(&labels);
        m.upstream_pending.remove(&labels);
    }
}
