//! `GET /status`: what the gateway knows, as JSON. The status page and `/readyz` are rendered
//! from the same [`Status`], so the three never disagree, and `gateway diagnose --admin` reads
//! the JSON back into the same structs (`crate::diagnose::admin`). Times are Unix milliseconds.
//! The shape below is a contract: the structs serialise to exactly it, field by field, in this
//! order, and every closed set of words is an enum.
//!
//! ```text
//! {
//!   "version": "0.1.0",
//!   "uptime_s": 12.5,
//!   "started_unix_ms": 1763740000000,
//!   "now_unix_ms": 1763740012500,
//!   "draining": false,
//!   "ready": false,
//!   "not_ready": ["cluster `api`: no routable endpoint (2 endpoint(s), all ejected)"],
//!   "observer": {
//!     "mode": "kernel",                  // or "userspace"
//!     "kernel_signals": true,
//!     "reason": null,                    // userspace: why there are no kernel signals
//!     "cgroup": "/sys/fs/cgroup/gateway-4242",   // where the observer is attached, or null
//!     "events_lost": 0                   // null without the kernel observer
//!   },
//!   "clusters": [{
//!     "name": "api",
//!     "lb_policy": "round_robin",        // consistent_hash adds "hash_on": "header:x-user-id"
//!     "routable": 1,                     // endpoints healthy or suspect
//!     "endpoints": [{
//!       "address": "10.0.0.5:8080",
//!       "weight": 1,
//!       "state": "ejected",              // healthy | slow | suspect | ejected | probing
//!       "reason": "refused",             // why not healthy: syn_unanswered, refused, unreachable,
//!                                        // host_died, overloaded, slow_backend, slow_network,
//!                                        // probe_failed, unexpected_status, tls_failure,
//!                                        // error_status; or null
//!       "since_unix_ms": 1763740011000,
//!       "ejected_until_unix_ms": 1763740012000,   // null unless ejected
//!       "connect_deadline_ms": 250.0,
//!       "connect_deadline_source": "configured",  // or "measured" (from the SYN-RTT quantile)
//!       "syn_rtt": {"p50_us": 61, "p99_us": 140, "samples": 24},  // p50/p99 null without samples
//!       "in_flight": 0,
//!       "latency": {                     // response latency (every policy; peak_ewma acts on it)
//!         "ewma_ms": 0.61,               // peak-EWMA of response-head latency; null before any
//!         "samples": 1834,
//!         "source": "responses",         // what set its peak: responses | handshakes | stalls
//!         "awaiting_head": 0,            // requests waiting for their response head
//!         "slow_above_ms": null          // peak_ewma: the cluster's current slow threshold (ms)
//!       },
//!       "h2_requests_per_connection": null,  // an HTTP/2 upstream's learned limit (null: none known)
//!       "recent": [{                     // oldest first, at most 20
//!         "at_unix_ms": 1763740011000,
//!         "event": "ejected",            // failure | suspect | ejected | ejection_refused | probing | recovered
//!         "reason": "refused",
//!         "detail": "connection refused by 10.0.0.5:8080 after 0 ms; kernel: refused, 1 SYN sent, RST received, ECONNREFUSED"
//!       }],
//!       "history": {                     // the last 5 minutes, one entry per second (below)
//!         "first_unix_s": 1763739713,    // entry i is the second first_unix_s + i
//!         "requests": [412, 398, …],     // requests that ended, served by (or failed last on) it
//!         "latency_p50_us": [610, 598, …],   // their latency (the access log's total_ms); null: none
//!         "latency_p99_us": [2100, 1890, …],
//!         "syn_rtt_p50_us": [null, 62, …],   // its handshakes (requests' and probes')
//!         "syn_rtt_p99_us": [null, 140, …],
//!         "hedges": [0, 0, …],           // connects to it that passed their deadline and were hedged
//!         "errors": {"connect_refused": [0, 3, …]},  // failed attempts by x-gateway-error reason; only those seen
//!         "changes": [{…}]               // health transitions (as in `recent`, no plain failures), oldest first, at most 64
//!       }
//!     }],
//!     "dns": [{                          // host-name endpoint entries; absent without any
//!       "endpoint": "api.internal:8080",
//!       "resolves": false,               // at the latest resolution (start, every dns_refresh_ms)
//!       "error": "failed to lookup address information: Name or service not known",  // absent when it resolves
//!       "since_unix_ms": 1763740011000,  // since when it has resolved (or has not)
//!       "addresses": ["10.0.0.5:8080"]   // what it resolved to last: kept while it does not resolve
//!     }]
//!   }]
//! }
//! ```
//!
//! `state` is `slow` for an endpoint healthy by the kernel's evidence that `lb_policy =
//! "peak_ewma"` found to be a latency outlier (it gets only a trickle, see
//! `decide::latency`); `reason` then says what made it slow (`slow_backend`: responses,
//! `overloaded`: handshakes needing SYN retransmits, `slow_network`: request bytes unACKed).
//! `latency` was added after the first version of this shape: a reader of an older gateway
//! gets its default (no estimate); so was `h2_requests_per_connection` (null).
//! `history` was added after the first version of this shape: a reader of an older gateway
//! gets it empty. Seconds are closed just after they end, so the last entry is the last
//! complete second; an entry never changes once written.

use std::{net::SocketAddr, sync::atomic::Ordering, time::SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use super::super::upstream::{HealthEvent, HealthEventKind, HistorySeries};
use super::super::{
    shared::Shared,
    upstream::{Cluster, Endpoint},
};
use crate::{
    config::LbPolicy,
    decide::{
        deadline::DeadlineSource,
        health::{Reason, State},
        latency::Source as LatencySource,
    },
    signals::SignalMode,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_s: f64,
    pub started_unix_ms: u64,
    pub now_unix_ms: u64,
    pub draining: bool,
    pub ready: bool,
    /// Why `/readyz` says 503, one line per problem; empty when ready.
    pub not_ready: Vec<String>,
    pub observer: ObserverStatus,
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObserverStatus {
    pub mode: SignalOrigin,
    pub kernel_signals: bool,
    pub reason: Option<String>,
    pub cgroup: Option<String>,
    pub events_lost: Option<u64>,
}

/// `observer.mode`: where the gateway's signals come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalOrigin {
    /// The eBPF observer is attached.
    Kernel,
    /// Userspace timing only (`observer.reason` says why).
    Userspace,
}

impl From<&SignalMode> for SignalOrigin {
    fn from(mode: &SignalMode) -> SignalOrigin {
        match mode {
            SignalMode::Kernel => SignalOrigin::Kernel,
            SignalMode::UserspaceOnly { .. } => SignalOrigin::Userspace,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    pub lb_policy: LbPolicy,
    /// What a `consistent_hash` cluster hashes a request on (`client`, `header:NAME`,
    /// `cookie:NAME`); absent for any other policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    pub routable: usize,
    pub endpoints: Vec<EndpointStatus>,
    /// Each host-name entry of the cluster's `endpoints`, as its latest resolution found it;
    /// absent for a cluster of addresses only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<DnsName>,
}

/// A host-name endpoint entry (`api.internal:8080`) at its latest resolution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsName {
    pub endpoint: String,
    pub resolves: bool,
    /// Why it did not resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when it has resolved, or not.
    pub since_unix_ms: u64,
    /// What it resolved to last: while it does not resolve, the addresses it keeps (none if
    /// it never resolved).
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: State,
    pub reason: Option<Reason>,
    pub since_unix_ms: u64,
    pub ejected_until_unix_ms: Option<u64>,
    pub connect_deadline_ms: f64,
    pub connect_deadline_source: ConnectDeadlineSource,
    pub syn_rtt: SynRtt,
    pub in_flight: u64,
    #[serde(default)]
    pub latency: LatencyStatus,
    /// How many requests the upstream lets one HTTP/2 connection carry, once learned from its
    /// graceful GOAWAYs (`upstream::lifetime`); `None` while none is known.
    #[serde(default)]
    pub h2_requests_per_connection: Option<u64>,
    /// Slow start (`health.slow_start_ms`): the percent of its weight the endpoint takes now,
    /// while it is back from an ejection, or new from a DNS refresh, for less than the
    /// window; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_percent: Option<u32>,
    pub recent: Vec<HealthEvent>,
    #[serde(default)]
    pub history: EndpointHistory,
}

/// `history` of an endpoint: its last five minutes for the status page's plot and timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointHistory {
    #[serde(flatten)]
    pub series: HistorySeries,
    /// Health transitions, oldest first.
    pub changes: Vec<HealthEvent>,
}

/// `latency` of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStatus {
    pub ewma_ms: Option<f64>,
    pub samples: u64,
    pub source: LatencySource,
    pub awaiting_head: u64,
    pub slow_above_ms: Option<f64>,
}

/// `connect_deadline_source`: where an endpoint's connect deadline comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectDeadlineSource {
    /// `connect_timeout_ms`: adaptive deadlines are off, or too few handshakes are known.
    Configured,
    /// From the endpoint's kernel-measured SYN-RTT quantile.
    Measured,
}

impl ConnectDeadlineSource {
    pub const fn name(self) -> &'static str {
        match self {
            ConnectDeadlineSource::Configured => "configured",
            ConnectDeadlineSource::Measured => "measured",
        }
    }
}

impl From<&DeadlineSource> for ConnectDeadlineSource {
    fn from(source: &DeadlineSource) -> ConnectDeadlineSource {
        match source {
            DeadlineSource::Configured => ConnectDeadlineSource::Configured,
            DeadlineSource::Measured { .. } => ConnectDeadlineSource::Measured,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SynRtt {
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub samples: usize,
}

/// Milliseconds, to 0.01.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Why a slow endpoint is slow, from what set its latency estimate's peak.
fn slow_reason(source: LatencySource) -> Reason {
    match source {
        LatencySource::Responses => Reason::SlowBackend,
        LatencySource::Handshakes => Reason::Overloaded,
        LatencySource::Stalls => Reason::SlowNetwork,
    }
}

/// The cluster's host-name entries, as [`ClusterStatus::dns`] shows them.
fn dns_names(c: &Cluster) -> Vec<DnsName> {
    let names = c.names.snapshot();
    c.spec
        .endpoints
        .iter()
        .zip(names)
        .filter_map(|(e, n)| {
            let n = n?;
            Some(DnsName {
                endpoint: e.address.to_string(),
                resolves: n.error.is_none(),
                error: n.error,
                since_unix_ms: unix_ms(n.since),
                addresses: n.addresses,
            })
        })
        .collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Status {
    pub(crate) fn collect(shared: &Shared) -> Status {
        let now = Instant::now();
        let now_unix_ms = unix_ms(SystemTime::now());
        // A monotonic instant as Unix time, through the distance from now.
        let at = |t: Instant| -> u64 {
            if t <= now {
                now_unix_ms.saturating_sub((now - t).as_millis() as u64)
            } else {
                now_unix_ms + (t - now).as_millis() as u64
            }
        };
        let mode = shared.signals.mode();
        let observer = ObserverStatus {
            mode: SignalOrigin::from(&mode),
            kernel_signals: mode == SignalMode::Kernel,
            reason: match mode {
                SignalMode::Kernel => None,
                SignalMode::UserspaceOnly { reason } => Some(reason),
            },
            cgroup: shared.signals.cgroup().map(|p| p.display().to_string()),
            events_lost: shared.signals.events_lost(),
        };
        let draining = shared.draining.load(Ordering::Relaxed);
        let mut not_ready = Vec::new();
        if draining {
            not_ready.push("draining: shutdown has begun".to_owned());
        }
        let rt = shared.runtime.load();
        let clusters: Vec<ClusterStatus> = rt
            .clusters
            .iter()
            .map(|c| {
                let eps = c.endpoints();
                let routable = eps.iter().filter(|e| e.health.routable()).count();
                let endpoints: Vec<EndpointStatus> =
                    eps.iter().map(|ep| endpoint_status(c, ep, &at)).collect();
                if routable == 0 {
                    not_ready.push(if endpoints.is_empty() {
                        format!(
                            "cluster `{}`: no endpoints (a host name that did not resolve?)",
                            c.name
                        )
                    } else {
                        format!(
                            "cluster `{}`: no routable endpoint ({} endpoint(s), all ejected)",
                            c.name,
                            endpoints.len()
                        )
                    });
                }
                ClusterStatus {
                    name: c.name.to_string(),
                    lb_policy: c.spec.lb_policy,
                    hash_on: (c.spec.lb_policy == LbPolicy::ConsistentHash)
                        .then(|| c.spec.hash_on.to_string()),
                    routable,
                    endpoints,
                    dns: dns_names(c),
                }
            })
            .collect();
        let t = &shared.telemetry;
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: (t.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            started_unix_ms: unix_ms(t.started_at),
            now_unix_ms,
            draining,
            ready: not_ready.is_empty(),
            not_ready,
            observer,
            clusters,
        }
    }
}

/// One endpoint's entry; `at` turns a monotonic instant into Unix milliseconds.
fn endpoint_status(c: &Cluster, ep: &Endpoint, at: &dyn Fn(Instant) -> u64) -> EndpointStatus {
    let v = ep.health.view(&c.spec);
    let l = ep.latency.view(&c.spec.latency);
    let (state, reason) = match ep.state(&c.spec) {
        State::Slow => (State::Slow, Some(slow_reason(l.source))),
        _ => (v.state, v.reason),
    };
    EndpointStatus {
        address: ep.addr,
        weight: ep.weight,
        state,
        reason,
        since_unix_ms: at(v.since),
        ejected_until_unix_ms: v.ejected_until.map(at),
        connect_deadline_ms: v.deadline.value.as_secs_f64() * 1e3,
        connect_deadline_source: ConnectDeadlineSource::from(&v.deadline.source),
        syn_rtt: SynRtt {
            p50_us: v.rtt_p50.map(|d| d.as_micros() as u64),
            p99_us: v.rtt_p99.map(|d| d.as_micros() as u64),
            samples: v.rtt_samples,
        },
        in_flight: ep.in_flight.load(Ordering::Relaxed),
        latency: LatencyStatus {
            ewma_ms: l.estimate.map(ms),
            samples: l.samples,
            source: l.source,
            awaiting_head: l.awaiting,
            slow_above_ms: (c.spec.lb_policy == LbPolicy::PeakEwma)
                .then(|| c.set.latency.threshold().map(ms))
                .flatten(),
        },
        h2_requests_per_connection: ep.mux.learned_limit().map(|n| n as u64),
        slow_start_percent: Some(ep.health.slow_start_percent(c.spec.health.slow_start))
            .filter(|&p| p < 100),
        recent: v.recent,
        history: EndpointHistory {
            series: ep.health.history.series(),
            changes: v.changes,
        },
    }
}

#[cfg(test)]
mod tests;
