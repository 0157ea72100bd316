//! What the proxy tells [`GatewayMetrics`], from where things happen, without costing the
//! request path: label sets are built once, when a route, cluster or endpoint starts, and the
//! request path only touches ready handles (an atomic add; a histogram's own short lock).
//! Values that only occur on failures (an errno, an ejection reason) get their handle on first
//! use, then keep it. There is one [`Telemetry`] per gateway, in `Shared`, never a global.
//!
//! What is counted, and where:
//!
//! | family | fed at |
//! |---|---|
//! | requests, request_duration | the end of the response (the access-log point): status and `total_ms` |
//! | timeouts | the same point, from each attempt's error (connect, response, write, request) and a response body that stalled |
//! | upstream_attempts, syn_rtt, syn_retransmits, connect_failures, socket_errors | each connect made for a request, when it ends ([`EndpointMeter::connected`], [`EndpointMeter::connect_failed`], [`EndpointMeter::connect_abandoned`]) |
//! | rtos | when an upstream connection closes: the RTOs in the kernel's final record of it (`CONN_STATS`), so each is counted once however many requests the connection carried |
//! | connect_deadline | at each connect, and every second |
//! | health_state, ejections | at each health transition (`Cluster::log_transition`), and the state every second |
//! | latency, slowdowns | the estimate every second; a slowdown when `peak_ewma`'s evaluator marks the endpoint slow (`upstream::latency`) |
//! | hedges, retries, retry_budget_exhausted | where the cluster hedges, and where a request retries or is refused a retry |
//! | dns_failures | at each resolution of the cluster's host names (`upstream::resolve`) |
//! | upstream_connections, upstream_max_connections, upstream_pending | every second ([`ConnectionsMeter`]) |
//! | observer_kernel, observer_mode, build_info | at start |
//! | events_lost, kernel_anomalies, kernel_anomaly_logs_suppressed | every second, from the observer's counters |
//! | process_* | at each scrape, from `/proc/self` (`metrics::process`) |
//! | tls_handshakes, tls_handshake_errors, tls_handshake_duration | each TLS handshake, downstream (`handshake`) and upstream (`upstream::connect`) ([`TlsMeter`]) |
//! | tls_certificate_expiry | at start and at every reload, from the certificates the config loaded |
//!
//! Outcome labels mean the same with and without kernel signals: with them, the kernel's record
//! of the connect decides; without, the proxy reads the same event from `connect()`'s result
//! (`aborted` is always a socket the gateway closed before a SYN-ACK). `syn_rtt` and
//! `socket_errors` need the kernel and stay empty without it.
//!
//! `socket_errors`: a non-blocking `connect()` that fails after its SYN went out (refused,
//! timeout, unreachable) hands its error to the gateway through `getsockopt(SO_ERROR)` (tokio
//! reads it when the socket turns writable), so those failures are counted with the kernel's
//! errno. Errors `connect()` returns at once (EADDRNOTAVAIL, no route) are not `SO_ERROR` reads.
//!
//! Histograms get buckets up to the longest timeout configured at start ([`longest_timeout`]);
//! the series of routes, clusters and endpoints that are gone are removed ([`series`]).

mod connections;
mod endpoint;
mod series;
mod tls;
mod tunnel;

pub(crate) use self::series::INCOMPLETE_REASONS;
use self::series::Series;
pub(crate) use self::{
    connections::ConnectionsMeter,
    endpoint::EndpointMeter,
    tls::{Side, TlsMeter},
    tunnel::{TunnelEnd, TunnelMeter},
};

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use gateway_common::errno;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{access_log::Record, error::ErrorKind};
use crate::{
    config::Settings,
    decide::retry::RetryReason,
    metrics::{
        ClusterLabels, ClusterReason, GatewayMetrics, HedgeLabels, IncompleteLabels,
        LatencyBuckets, PhaseLabels, RequestLabels, RouteLabels,
    },
    signals::SignalSource,
};

/// The longest timeout in `settings` that a histogram can measure: every cluster's connect,
/// response, write, request and TLS handshake timeouts, and the HTTPS listener's handshake.
pub(crate) fn longest_timeout(settings: &Settings) -> Duration {
    settings
        .clusters
        .values()
        .flat_map(|c| {
            let t = &c.timeouts;
            [t.connect, t.response, t.write, t.request, t.tls_handshake]
        })
        .chain([settings.downstream.tls_handshake_timeout])
        .max()
        .unwrap_or_default()
}

/// The label of requests that matched no route (and of their cluster).
pub(crate) const UNROUTED: &str = "-";

/// `gateway_responses_incomplete_total`'s reason for a response whose client went away before
/// its end (`exchange`).
pub(crate) const CLIENT_CLOSED_REASON: &str = "client_closed";
/// A response cut short because the gateway closed a client that stopped reading for
/// `write_timeout_ms`.
pub(crate) const CLIENT_WRITE_TIMEOUT_REASON: &str = "client_write_timeout";
/// A response cut short by a forced drain: the grace period ran out.
pub(crate) const SHUTDOWN_REASON: &str = "shutdown";

/// `gateway_responses_incomplete_total`'s reason for a gRPC call whose own deadline
/// (`grpc-timeout`) passed while its response streamed (`response_body`).
pub(crate) const GRPC_DEADLINE_REASON: &str = "grpc_deadline";

/// Timeout phases, in label order.
const PHASES: [&str; 5] = ["connect", "response", "write", "request", "tls_handshake"];

fn phase_of(k: ErrorKind) -> Option<usize> {
    match k {
        ErrorKind::ConnectTimeout => Some(0),
        ErrorKind::ResponseTimeout => Some(1),
        ErrorKind::UpstreamWriteTimeout => Some(2),
        ErrorKind::RequestTimeout => Some(3),
        ErrorKind::TlsHandshakeTimeout => Some(4),
        _ => None,
    }
}

/// Retry reasons, in label order.
const RETRY_REASONS: [RetryReason; RetryReason::ALL.len()] = RetryReason::ALL;

/// How a hedged connect ended (the `result` label of `gateway_hedged_connects_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HedgeResult {
    Won = 0,
    Lost = 1,
    BudgetExhausted = 2,
}

const HEDGE_RESULTS: [&str; 3] = ["won", "lost", "budget_exhausted"];

/// Errnos whose `connect_failures` handle each endpoint keeps once seen.
const COMMON_ERRNOS: [u32; 5] = [
    errno::ETIMEDOUT,
    errno::ECONNREFUSED,
    errno::EHOSTUNREACH,
    errno::ENETUNREACH,
    errno::EADDRNOTAVAIL,
];

/// An errno as a label value: its symbolic name, or `other`.
fn errno_label(e: u32) -> &'static str {
    errno::name(e).unwrap_or("other")
}

fn counter<S>(family: &Family<S, Counter>, labels: &S) -> Counter
where
    S: Clone + std::hash::Hash + Eq,
{
    family.get_or_create(labels).clone()
}

/// The gateway's registry, its metric families, and what `/status` says about the process.
pub(crate) struct Telemetry {
    pub registry: Registry,
    pub metrics: GatewayMetrics,
    pub started: Instant,
    pub started_at: SystemTime,
    unrouted: RouteMeter,
    events_lost_seen: AtomicU64,
    pub tls: TlsMeter,
    /// The kernel's anomaly counts as last exported, by kind.
    anomalies_seen: std::sync::Mutex<Vec<(&'static str, u64)>>,
    logs_suppressed_seen: AtomicU64,
    series: Arc<Series>,
}

impl Telemetry {
    /// Registers every family and sets the observer gauges from `signals`; histogram buckets
    /// reach `longest` ([`longest_timeout`]).
    pub fn new(signals: &dyn SignalSource, longest: Duration) -> Telemetry {
        let mut registry = Registry::default();
        let metrics = GatewayMetrics::new(&mut registry, LatencyBuckets::reaching(longest));
        let series = Arc::new(Series::default());
        let unrouted = RouteMeter::new(&metrics, &series, UNROUTED, UNROUTED, false);
        let t = Telemetry {
            tls: TlsMeter::new(&metrics),
            registry,
            metrics,
            started: Instant::now(),
            started_at: SystemTime::now(),
            unrouted,
            events_lost_seen: AtomicU64::new(0),
            anomalies_seen: std::sync::Mutex::new(Vec::new()),
            logs_suppressed_seen: AtomicU64::new(0),
            series,
        };
        t.observer_mode(signals);
        t
    }

    /// The histograms' highest finite bucket: a reload that brings a longer timeout needs a
    /// restart for the buckets to reach it.
    pub fn buckets_top(&self) -> Duration {
        self.metrics.buckets.top()
    }

    pub fn route(&self, route: &str, cluster: &str) -> RouteMeter {
        RouteMeter::new(&self.metrics, &self.series, route, cluster, true)
    }

    pub fn cluster(&self, name: &str) -> ClusterMeter {
        ClusterMeter::new(&self.metrics, &self.series, name)
    }

    /// The kernel's count of anomaly log lines it suppressed, read every second.
    pub fn anomaly_logs_suppressed(&self, total: u64) {
        let before = self.logs_suppressed_seen.swap(total, Ordering::Relaxed);
        if total > before {
            self.metrics
                .kernel_anomaly_logs_suppressed
                .inc_by(total - before);
        }
    }

    /// A request is over (its access-log line is being written), `elapsed` after its
    /// arrival. `meter`: its route's handles, `None` when it matched no route.
    pub fn request_done(&self, record: &Record, elapsed: Duration, meter: Option<&RouteMeter>) {
        meter.unwrap_or(&self.unrouted).done(record, elapsed);
    }

    /// A request hyper's parser refused, answered `status` (`server::rejected`): counted, but
    /// no duration sample (it has none worth one: scanners would pull the unrouted latency
    /// toward zero).
    pub fn request_refused(&self, status: u16) {
        self.unrouted.count(status);
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// The observer's mode, read every second (its records may stop: `signals::kernel`).
    pub fn observer_mode(&self, signals: &dyn SignalSource) {
        self.metrics.observer(signals.kernel());
    }

    /// The observer's count of records the kernel could not queue, read every second.
    pub fn events_lost(&self, lost: u64) {
        let before = self.events_lost_seen.swap(lost, Ordering::Relaxed);
        if lost > before {
            self.metrics.events_lost.inc_by(lost - before);
        }
    }

    /// The kernel's anomaly counts by kind, read every second: each rise is exported.
    pub fn kernel_anomalies(&self, now: Vec<(&'static str, u64)>) {
        let mut seen = self
            .anomalies_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, n) in &now {
            let before = seen.iter().find(|(k, _)| k == kind).map_or(0, |(_, v)| *v);
            let c = self
                .metrics
                .kernel_anomalies
                .get_or_create(&crate::metrics::KindLabels { kind });
            if *n > before {
                c.inc_by(n - before);
            }
        }
        *seen = now;
    }
}

/// A route's handles (or the one for requests that matched no route).
pub(crate) struct RouteMeter {
    labels: RouteLabels,
    metrics: GatewayMetrics,
    series: Arc<Series>,
    requests: Family<RequestLabels, Counter>,
    /// Status 100..=599 at `status - 100`, each filled on first use.
    by_status: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    /// The route's cluster's `timeouts` by phase; none for unrouted requests.
    timeouts: Option<[Counter; 5]>,
}

const STATUS_MIN: u16 = 100;
const STATUS_MAX: u16 = 599;

impl RouteMeter {
    fn new(
        m: &GatewayMetrics,
        series: &Arc<Series>,
        route: &str,
        cluster: &str,
        timeouts: bool,
    ) -> RouteMeter {
        let labels = RouteLabels {
            route: route.to_owned(),
            cluster: cluster.to_owned(),
        };
        series.take_route(&labels);
        let duration = m.request_duration.get_or_create(&labels).clone();
        let timeouts = timeouts.then(|| {
            PHASES.map(|phase| {
                counter(
                    &m.timeouts,
                    &PhaseLabels {
                        cluster: cluster.to_owned(),
                        phase,
                    },
                )
            })
        });
        RouteMeter {
            labels,
            metrics: m.clone(),
            series: series.clone(),
            requests: m.requests.clone(),
            by_status: (STATUS_MIN..=STATUS_MAX).map(|_| OnceLock::new()).collect(),
            duration,
            timeouts,
        }
    }

    fn status(&self, status: u16) -> Counter {
        counter(
            &self.requests,
            &RequestLabels {
                route: self.labels.route.clone(),
                cluster: self.labels.cluster.clone(),
                status,
            },
        )
    }

    /// The request, `elapsed` after its arrival, is over.
    fn done(&self, ex: &Record, elapsed: Duration) {
        self.count(ex.status);
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(reason) = ex.cut_short {
            counter(
                &self.metrics.responses_incomplete,
                &IncompleteLabels {
                    route: self.labels.route.clone(),
                    cluster: self.labels.cluster.clone(),
                    reason,
                },
            )
            .inc();
        }
        if let Some(t) = &self.timeouts {
            for a in &ex.attempts {
                if let Some(p) = a.error.and_then(phase_of) {
                    t[p].inc();
                }
            }
            // A final error the attempts do not show: a response body that stalled after the
            // head arrived, or a request timeout between attempts.
            if let Some(k) = ex.error
                && ex.attempts.last().and_then(|a| a.error) != Some(k)
                && let Some(p) = phase_of(k)
            {
                t[p].inc();
            }
        }
    }
}

impl RouteMeter {
    /// One more request answered `status`.
    fn count(&self, status: u16) {
        match status
            .checked_sub(STATUS_MIN)
            .filter(|_| status <= STATUS_MAX)
        {
            Some(i) => self.by_status[usize::from(i)]
                .get_or_init(|| self.status(status))
                .inc(),
            None => self.status(status).inc(),
        };
    }

    /// A request the route's full `rate_limit` table let pass uncounted.
    pub fn rate_limit_untracked(&self) {
        let m = &self.metrics.rate_limit_untracked;
        m.get_or_create(&self.labels).inc();
    }
}

impl Drop for RouteMeter {
    fn drop(&mut self) {
        self.series.give_back_route(&self.metrics, &self.labels);
    }
}

/// A cluster's handles; it hands out its endpoints' ([`ClusterMeter::endpoint`]).
pub(crate) struct ClusterMeter {
    /// Upstream TLS handshakes.
    pub tls: TlsMeter,
    metrics: GatewayMetrics,
    series: Arc<Series>,
    name: String,
    retries: [Counter; RETRY_REASONS.len()],
    hedges: [Counter; 3],
    retry_budget_exhausted: Counter,
    dns_failures: Counter,
    /// Upgraded connections, shared with the endpoints.
    tunnels: std::sync::Arc<TunnelMeter>,
    pub connections: ConnectionsMeter,
}

impl ClusterMeter {
    fn new(m: &GatewayMetrics, series: &Arc<Series>, name: &str) -> ClusterMeter {
        series.take_cluster(name);
        let cluster = ClusterLabels {
            cluster: name.to_owned(),
        };
        ClusterMeter {
            tls: TlsMeter::new(m),
            retries: RETRY_REASONS.map(|r| {
                counter(
                    &m.retries,
                    &ClusterReason {
                        cluster: name.to_owned(),
                        reason: r.name(),
                    },
                )
            }),
            hedges: HEDGE_RESULTS.map(|result| {
                counter(
                    &m.hedges,
                    &HedgeLabels {
                        cluster: name.to_owned(),
                        reason: "deadline",
                        result,
                    },
                )
            }),
            retry_budget_exhausted: counter(&m.retry_budget_exhausted, &cluster),
            dns_failures: counter(&m.dns_failures, &cluster),
            tunnels: std::sync::Arc::new(TunnelMeter::new(m, name)),
            connections: ConnectionsMeter::new(m, name),
            metrics: m.clone(),
            series: series.clone(),
            name: name.to_owned(),
        }
    }

    pub fn endpoint(&self, addr: std::net::SocketAddr, connect_timeout: Duration) -> EndpointMeter {
        EndpointMeter::new(
            &self.metrics,
            &self.series,
            &self.name,
            addr,
            connect_timeout,
            self.tunnels.clone(),
        )
    }

    pub fn retry(&self, reason: RetryReason) {
        if let Some(i) = RETRY_REASONS.iter().position(|r| *r == reason) {
            self.retries[i].inc();
        }
    }

    pub fn retry_budget_exhausted(&self) {
        self.retry_budget_exhausted.inc();
    }

    pub fn dns_names_unresolved(&self, names: usize) {
        self.dns_failures.inc_by(names as u64);
    }

    pub fn hedge(&self, result: HedgeResult) {
        self.hedges[result as usize].inc();
    }
}

impl Drop for ClusterMeter {
    fn drop(&mut self) {
        let retry_reasons = RETRY_REASONS.map(RetryReason::name);
        self.series.give_back_cluster(
            &self.metrics,
            &self.name,
            &PHASES,
            &retry_reasons,
            &HEDGE_RESULTS,
        );
    }
}

#[cfg(test)]
mod tests;
