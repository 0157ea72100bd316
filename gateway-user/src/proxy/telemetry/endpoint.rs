//! An endpoint's metric handles: connect attempts and failures by outcome and errno, the
//! kernel's SYN-RTT and retransmits, the connect deadline, health state, latency estimate and
//! slowdowns, and bounded-load spills; the series go with the endpoint ([`Series`]).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use gateway_common::{Outcome, errno};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};

use super::{COMMON_ERRNOS, TunnelMeter, counter, errno_label, series::Series};
use crate::{
    decide::health::{State, Transition},
    metrics::{
        EndpointErrno, EndpointLabels, EndpointOutcome, EndpointReason, ErrnoLabels, FloatGauge,
        GatewayMetrics, StateLabels,
    },
    proxy::error::ProxyError,
    signals::ConnectEvidence,
};

/// An endpoint's handles.
pub(crate) struct EndpointMeter {
    metrics: GatewayMetrics,
    series: Arc<Series>,
    labels: EndpointLabels,
    /// By [`Outcome::ALL`] order.
    attempts: [OnceLock<Counter>; 6],
    /// By [`COMMON_ERRNOS`] order.
    failures: [OnceLock<Counter>; 5],
    syn_rtt: Histogram,
    syn_retransmits: Counter,
    /// Cloned into each connection's close task.
    pub rtos: Counter,
    connect_deadline: FloatGauge,
    /// The cluster's upgraded-connection handles.
    pub tunnels: std::sync::Arc<TunnelMeter>,
    /// By [`State::ALL`] order.
    states: [Gauge; 5],
    /// Set on first use: absent until the endpoint has a latency estimate.
    latency: OnceLock<FloatGauge>,
    /// Set on first use: absent until a per-connection request limit is learned.
    h2_requests_per_connection: OnceLock<Gauge>,
    slowdowns: Counter,
    hash_spills: Counter,
}

impl EndpointMeter {
    pub(super) fn new(
        m: &GatewayMetrics,
        series: &Arc<Series>,
        cluster: &str,
        addr: std::net::SocketAddr,
        connect_timeout: Duration,
        tunnels: std::sync::Arc<TunnelMeter>,
    ) -> EndpointMeter {
        let labels = EndpointLabels {
            cluster: cluster.to_owned(),
            endpoint: addr.to_string(),
        };
        series.take_endpoint(&labels);
        let states = State::ALL.map(|s| {
            m.health_state
                .get_or_create(&StateLabels {
                    cluster: labels.cluster.clone(),
                    endpoint: labels.endpoint.clone(),
                    state: s.name(),
                })
                .clone()
        });
        let meter = EndpointMeter {
            attempts: Default::default(),
            failures: Default::default(),
            syn_rtt: m.syn_rtt.get_or_create(&labels).clone(),
            syn_retransmits: counter(&m.syn_retransmits, &labels),
            rtos: counter(&m.rtos, &labels),
            connect_deadline: m.connect_deadline.get_or_create(&labels).clone(),
            states,
            tunnels,
            latency: OnceLock::new(),
            h2_requests_per_connection: OnceLock::new(),
            slowdowns: counter(&m.slowdowns, &labels),
            hash_spills: counter(&m.hash_spills, &labels),
            labels,
            metrics: m.clone(),
            series: series.clone(),
        };
        meter.deadline(connect_timeout);
        meter.state(State::Healthy);
        meter
    }

    pub fn deadline(&self, d: Duration) {
        self.connect_deadline.set(d.as_secs_f64());
    }

    /// 1 for `state`, 0 for the others.
    pub fn state(&self, state: State) {
        for (s, g) in State::ALL.iter().zip(&self.states) {
            g.set(i64::from(*s == state));
        }
    }

    /// The peak-EWMA latency estimate, every second.
    pub fn latency(&self, estimate: Option<Duration>) {
        if let Some(e) = estimate {
            self.latency
                .get_or_init(|| self.metrics.latency.get_or_create(&self.labels).clone())
                .set(e.as_secs_f64());
        }
    }

    /// The HTTP/2 upstream's learned limit of requests per connection, every second: the gauge
    /// appears with the first limit learned, and reads 0 while none is known after that.
    pub fn h2_requests_per_connection(&self, limit: Option<usize>) {
        let gauge = match limit {
            Some(_) => Some(self.h2_requests_per_connection.get_or_init(|| {
                self.metrics
                    .h2_requests_per_connection
                    .get_or_create(&self.labels)
                    .clone()
            })),
            None => self.h2_requests_per_connection.get(),
        };
        if let Some(g) = gauge {
            g.set(limit.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
        }
    }

    /// A request of one of this endpoint's `consistent_hash` keys went to the key's next
    /// endpoint: this one was at its `hash_balance_factor` bound.
    pub fn hash_spilled(&self) {
        self.hash_spills.inc();
    }

    /// `peak_ewma` found the endpoint slow (`slow`) or no longer slow; `now` is its state.
    pub fn slow(&self, slow: bool, now: State) {
        if slow {
            self.slowdowns.inc();
        }
        self.state(now);
    }

    /// A health transition: the ejection counter, and the state gauges.
    pub fn transition(&self, t: Transition, now: State) {
        if let Transition::Ejected { reason, .. } = t {
            self.series.note_reason(&self.labels, reason.name());
            counter(
                &self.metrics.ejections,
                &EndpointReason {
                    cluster: self.labels.cluster.clone(),
                    endpoint: self.labels.endpoint.clone(),
                    reason: reason.name(),
                },
            )
            .inc();
        }
        if t != Transition::None {
            self.state(now);
        }
    }

    fn attempt(&self, outcome: Outcome) {
        let i = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome is in ALL");
        self.attempts[i]
            .get_or_init(|| {
                counter(
                    &self.metrics.upstream_attempts,
                    &EndpointOutcome {
                        cluster: self.labels.cluster.clone(),
                        endpoint: self.labels.endpoint.clone(),
                        outcome: outcome.name(),
                    },
                )
            })
            .inc();
    }

    fn failure(&self, errno: u32) {
        let make = || {
            self.series.note_errno(&self.labels, errno_label(errno));
            counter(
                &self.metrics.connect_failures,
                &EndpointErrno {
                    cluster: self.labels.cluster.clone(),
                    endpoint: self.labels.endpoint.clone(),
                    errno: errno_label(errno),
                },
            )
        };
        match COMMON_ERRNOS.iter().position(|e| *e == errno) {
            Some(i) => self.failures[i].get_or_init(make).inc(),
            None => make().inc(),
        };
    }

    fn kernel_counts(&self, ev: &ConnectEvidence) {
        if ev.syn_retransmits > 0 {
            self.syn_retransmits.inc_by(u64::from(ev.syn_retransmits));
        }
    }

    /// A connect made for a request established; `ev` is the kernel's record of it.
    pub fn connected(&self, ev: Option<&ConnectEvidence>) {
        let Some(ev) = ev else {
            self.attempt(Outcome::Established);
            return;
        };
        self.attempt(ev.outcome);
        self.kernel_counts(ev);
        if let Some(rtt) = ev.syn_rtt {
            self.syn_rtt.observe(rtt.as_secs_f64());
        }
    }

    /// A connect made for a request failed with `e` (`connect()` returned an error).
    pub fn connect_failed(&self, e: &ProxyError) {
        let Some(failure) = e.connect_failure() else {
            return;
        };
        let evidence = e.connect_evidence();
        // The kernel's record decides the outcome; without one, the proxy's own reading.
        let outcome = evidence.map(|ev| ev.outcome).or(failure.outcome());
        if let Some(o) = outcome {
            self.attempt(o);
        }
        if let Some(ev) = evidence {
            self.kernel_counts(ev);
        }
        let errno = evidence.and_then(|ev| ev.errno).or(e.connect_errno());
        if let Some(errno) = errno {
            self.failure(errno);
        }
        // The error came through getsockopt(SO_ERROR) when it ended a connect whose SYN went
        // out (see the module doc).
        if let Some(ev) = evidence
            && matches!(
                ev.outcome,
                Outcome::Refused | Outcome::Timeout | Outcome::Unreachable
            )
            && let Some(errno) = ev.errno
        {
            self.metrics
                .socket_errors
                .get_or_create(&ErrnoLabels {
                    errno: errno_label(errno),
                })
                .inc();
        }
    }

    /// The gateway closed a connect before its SYN-ACK: at its connect deadline
    /// (`failure`, counted as ETIMEDOUT), or because a hedged race was won by the other
    /// endpoint. `ev` is the kernel's record when the socket is already closed.
    pub fn connect_abandoned(&self, ev: Option<&ConnectEvidence>, failure: bool) {
        let outcome = ev.map_or(Outcome::Aborted, |e| e.outcome);
        self.attempt(outcome);
        if let Some(ev) = ev {
            self.kernel_counts(ev);
        }
        if failure && outcome != Outcome::Established {
            self.failure(errno::ETIMEDOUT);
        }
    }
}

impl Drop for EndpointMeter {
    /// An endpoint that goes away (re-resolved, or its cluster removed by a reload) takes its
    /// series with it, unless a newer meter (its cluster rebuilt by a reload) still uses them.
    fn drop(&mut self) {
        self.series.give_back_endpoint(&self.metrics, &self.labels);
    }
}
