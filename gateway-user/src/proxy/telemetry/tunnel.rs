//! The upgraded-connection families: how many are open, how each ended, and the bytes copied
//! each way, per cluster. Handles are made once per cluster and shared by its endpoints.

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use crate::metrics::{ClusterLabels, DirectionLabels, GatewayMetrics, UpgradeEndLabels};

/// How an upgraded connection ended (the `end` label of `gateway_upgrades_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TunnelEnd {
    ClientClosed = 0,
    UpstreamClosed = 1,
    IdleTimeout = 2,
    MaxDuration = 3,
    Shutdown = 4,
    Error = 5,
}

impl TunnelEnd {
    pub(crate) const NAMES: [&'static str; 6] = [
        "client_closed",
        "upstream_closed",
        "idle_timeout",
        "max_duration",
        "shutdown",
        "error",
    ];

    pub fn name(self) -> &'static str {
        TunnelEnd::NAMES[self as usize]
    }
}

pub(crate) struct TunnelMeter {
    active: Gauge,
    ended: [Counter; 6],
    pub to_upstream: Counter,
    pub to_client: Counter,
}

impl TunnelMeter {
    pub fn new(m: &GatewayMetrics, cluster: &str) -> TunnelMeter {
        let bytes = |direction| {
            m.upgrade_bytes
                .get_or_create(&DirectionLabels {
                    cluster: cluster.to_owned(),
                    direction,
                })
                .clone()
        };
        TunnelMeter {
            active: m
                .upgrades_active
                .get_or_create(&ClusterLabels {
                    cluster: cluster.to_owned(),
                })
                .clone(),
            ended: TunnelEnd::NAMES.map(|end| {
                m.upgrades
                    .get_or_create(&UpgradeEndLabels {
                        cluster: cluster.to_owned(),
                        end,
                    })
                    .clone()
            }),
            to_upstream: bytes("to_upstream"),
            to_client: bytes("to_client"),
        }
    }

    pub fn opened(&self) {
        self.active.inc();
    }

    pub fn closed(&self, end: TunnelEnd) {
        self.active.dec();
        self.ended[end as usize].inc();
    }
}
