//! Series of routes, clusters and endpoints that are gone are removed from `/metrics`.
//!
//! A reload builds new meters for whatever it changed while requests in flight still hold the
//! old ones, and both share the same label sets (and so the same counters: a reload does not
//! reset them). A label set is therefore counted: each meter takes it when it is built and
//! gives it back when it is dropped, and only the last one out removes its series from every
//! family. An endpoint that a DNS refresh dropped, a cluster or a route deleted by a reload,
//! disappear from the next scrape once nothing uses them; Prometheus marks them stale.
//!
//! Values that only occur on failures (an errno, an ejection reason) are remembered as their
//! series are made, so that exactly those are removed. Nothing here runs per request: meters
//! are built and dropped with endpoints, clusters and config generations.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard},
};

use crate::{
    decide::health::State,
    metrics::{
        ClusterLabels, ClusterReason, EndpointErrno, EndpointLabels, EndpointOutcome,
        EndpointReason, GatewayMetrics, HedgeLabels, IncompleteLabels, PhaseLabels, RequestLabels,
        RouteLabels, StateLabels,
    },
};

/// Label values seen under one label set, beyond the closed sets that are removed whole.
#[derive(Debug, Default)]
struct Seen {
    users: usize,
    /// `errno` values of `connect_failures`.
    errnos: Vec<&'static str>,
    /// `reason` values of `ejections`.
    reasons: Vec<&'static str>,
}

/// Users of each label set.
#[derive(Debug)]
struct Users<K>(Mutex<HashMap<K, Seen>>);

impl<K> Default for Users<K> {
    fn default() -> Self {
        Users(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq + Clone> Users<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Seen>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, k: &K) {
        self.lock().entry(k.clone()).or_default().users += 1;
    }

    /// `Some` with what was seen when this was the last user.
    fn give_back(&self, k: &K) -> Option<Seen> {
        let mut m = self.lock();
        let seen = m.get_mut(k)?;
        seen.users = seen.users.saturating_sub(1);
        if seen.users == 0 { m.remove(k) } else { None }
    }

    fn note(&self, k: &K, f: impl FnOnce(&mut Seen)) {
        if let Some(seen) = self.lock().get_mut(k) {
            f(seen);
        }
    }
}

/// Who uses which label set; one per gateway, shared by its meters.
#[derive(Debug, Default)]
pub(crate) struct Series {
    endpoints: Users<EndpointLabels>,
    routes: Users<RouteLabels>,
    clusters: Users<String>,
}

/// Statuses a route's `requests` series may carry (hyper's range).
const STATUSES: std::ops::RangeInclusive<u16> = 100..=999;

/// Every reason of `gateway_responses_incomplete_total`: what `ResponseBody` records when the
/// upstream body fails (`classify::body_error`, the stall timer, a gRPC call's deadline) and
/// what `Exchange::finish` records when the client side ended it first.
pub(crate) const INCOMPLETE_REASONS: [&str; 7] = [
    "upstream_reset",
    "invalid_upstream_response",
    "response_timeout",
    super::GRPC_DEADLINE_REASON,
    super::CLIENT_CLOSED_REASON,
    super::CLIENT_WRITE_TIMEOUT_REASON,
    super::SHUTDOWN_REASON,
];

impl Series {
    pub fn take_endpoint(&self, l: &EndpointLabels) {
        self.endpoints.take(l);
    }

    /// An errno label made for `l` (`connect_failures`).
    pub fn note_errno(&self, l: &EndpointLabels, errno: &'static str) {
        self.endpoints.note(l, |s| {
            if !s.errnos.contains(&errno) {
                s.errnos.push(errno);
            }
        });
    }

    /// A reason label made for `l` (`ejections`).
    pub fn note_reason(&self, l: &EndpointLabels, reason: &'static str) {
        self.endpoints.note(l, |s| {
            if !s.reasons.contains(&reason) {
                s.reasons.push(reason);
            }
        });
    }

    /// An endpoint meter is dropped: the last one removes the endpoint's series.
    pub fn give_back_endpoint(&self, m: &GatewayMetrics, l: &EndpointLabels) {
        let Some(seen) = self.endpoints.give_back(l) else {
            return;
        };
        m.syn_rtt.remove(l);
        m.syn_retransmits.remove(l);
        m.rtos.remove(l);
        m.connect_deadline.remove(l);
        m.latency.remove(l);
        m.h2_requests_per_connection.remove(l);
        m.slowdowns.remove(l);
        m.hash_spills.remove(l);
        let (cluster, endpoint) = (l.cluster.clone(), l.endpoint.clone());
        for o in gateway_common::Outcome::ALL {
            m.upstream_attempts.remove(&EndpointOutcome {
                cluster: cluster.clone(),
                endpoint: endpoint.clone(),
                outcome: o.name(),
            });
        }
        for s in State::ALL {
            m.health_state.remove(&StateLabels {
                cluster: cluster.clone(),
                endpoint: endpoint.clone(),
                state: s.name(),
            });
        }
        for errno in seen.errnos {
            m.connect_failures.remove(&EndpointErrno {
                cluster: cluster.clone(),
                endpoint: endpoint.clone(),
                errno,
            });
        }
        for reason in seen.reasons {
            m.ejections.remove(&EndpointReason {
                cluster: cluster.clone(),
                endpoint: endpoint.clone(),
                reason,
            });
        }
    }

    pub fn take_route(&self, l: &RouteLabels) {
        self.routes.take(l);
    }

    /// A route meter is dropped: the last one removes the route's series.
    pub fn give_back_route(&self, m: &GatewayMetrics, l: &RouteLabels) {
        if self.routes.give_back(l).is_none() {
            return;
        }
        m.request_duration.remove(l);
        m.rate_limit_untracked.remove(l);
        for reason in INCOMPLETE_REASONS {
            m.responses_incomplete.remove(&IncompleteLabels {
                route: l.route.clone(),
                cluster: l.cluster.clone(),
                reason,
            });
        }
        for status in STATUSES {
            m.requests.remove(&RequestLabels {
                route: l.route.clone(),
                cluster: l.cluster.clone(),
                status,
            });
        }
    }

    pub fn take_cluster(&self, name: &str) {
        self.clusters.take(&name.to_owned());
    }

    /// A cluster meter is dropped: the last one removes the cluster's series.
    pub fn give_back_cluster(
        &self,
        m: &GatewayMetrics,
        name: &str,
        phases: &[&'static str],
        retry_reasons: &[&'static str],
        hedge_results: &[&'static str],
    ) {
        if self.clusters.give_back(&name.to_owned()).is_none() {
            return;
        }
        for &phase in phases {
            m.timeouts.remove(&PhaseLabels {
                cluster: name.to_owned(),
                phase,
            });
        }
        for &reason in retry_reasons {
            m.retries.remove(&ClusterReason {
                cluster: name.to_owned(),
                reason,
            });
        }
        for &result in hedge_results {
            m.hedges.remove(&HedgeLabels {
                cluster: name.to_owned(),
                reason: "deadline",
                result,
            });
        }
        m.retry_budget_exhausted.remove(&ClusterLabels {
            cluster: name.to_owned(),
        });
        m.dns_failures.remove(&ClusterLabels {
            cluster: name.to_owned(),
        });
        m.upgrades_active.remove(&ClusterLabels {
            cluster: name.to_owned(),
        });
        super::ConnectionsMeter::remove(m, name);
        for end in super::tunnel::TunnelEnd::NAMES {
            m.upgrades.remove(&crate::metrics::UpgradeEndLabels {
                cluster: name.to_owned(),
                end,
            });
        }
        for direction in ["to_upstream", "to_client"] {
            m.upgrade_bytes.remove(&crate::metrics::DirectionLabels {
                cluster: name.to_owned(),
                direction,
            });
        }
    }
}
