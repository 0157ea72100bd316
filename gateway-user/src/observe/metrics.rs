//! Prometheus metrics of `gateway observe`, and the tiny HTTP listener that serves them.
//! The registry is built once and passed down; label sets are typed. The SYN-RTT histogram's
//! buckets reach the kernel's own SYN budget (`tcp_syn_retries`, `tcp_syn_linear_timeouts` of
//! the observer's network namespace: 131 s with the stock sysctls), the longest a handshake
//! can take; `gateway_build_info` and the `process_*` family are `gateway run`'s
//! (`crate::metrics::process`).

use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    metrics::{LatencyBuckets, register},
    observer::records::{ConnectRecord, OutcomeName, SoErrorRead, comm_str, errno_name},
};

/// The SYN-RTT buckets: up to the kernel's SYN budget in this network namespace.
pub fn syn_rtt_buckets() -> LatencyBuckets {
    let budget = crate::diagnose::budget::read();
    LatencyBuckets::reaching(std::time::Duration::from_millis(budget.budget_ms))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DstOutcome {
    pub dst: String,
    pub outcome: OutcomeName,
}

/// An outcome label is its contract name (`established`, `refused`, …).
impl EncodeLabelValue for OutcomeName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.0.name())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceOutcome {
    pub service: String,
    pub outcome: OutcomeName,
}

/// Label value for connects whose cgroup path names no service of the chosen kind.
pub const NO_SERVICE: &str = "none";

/// `gateway_connect_attempts_by_service_total`, when asked for (`observe --metrics-by`).
struct ByService {
    attempts: Family<ServiceOutcome, Counter>,
    by: super::attribution::ServiceLabel,
    known: HashSet<String>,
    max: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Dst {
    pub dst: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrnoComm {
    pub errno: String,
    pub comm: String,
}

/// Label value used once `max_destinations` distinct destinations have been seen, so that a
/// host talking to millions of peers cannot blow up the metric set.
pub const OTHER_DST: &str = "other";

pub struct ObserverMetrics {
    attempts: Family<DstOutcome, Counter>,
    syn_rtt: Family<Dst, Histogram, LatencyBuckets>,
    syn_retransmits: Family<Dst, Counter>,
    socket_errors: Family<ErrnoComm, Counter>,
    events_lost: Counter,
    late_so_errors: Counter,
    kernel_attached: Gauge,
    anomalies: Family<Kind, Counter>,
    anomaly_logs_suppressed: Counter,
    dest_tracked: Gauge,
    dest_evicted: Counter,
    /// The kernel counters as last exported, to add deltas.
    kernel_seen: crate::observer::KernelCounters,
    evicted_seen: u64,
    known_dsts: HashSet<String>,
    max_destinations: usize,
    lost_seen: u64,
    by_service: Option<ByService>,
}

impl ObserverMetrics {
    /// Registers every family; the SYN-RTT histogram gets `buckets` ([`syn_rtt_buckets`]).
    pub fn new(
        registry: &mut Registry,
        max_destinations: usize,
        buckets: LatencyBuckets,
    ) -> ObserverMetrics {
        let m = ObserverMetrics {
            attempts: Family::default(),
            syn_rtt: Family::new_with_constructor(buckets),
            syn_retransmits: Family::default(),
            socket_errors: Family::default(),
            events_lost: Counter::default(),
            late_so_errors: Counter::default(),
            kernel_attached: Gauge::default(),
            anomalies: Family::default(),
            anomaly_logs_suppressed: Counter::default(),
            dest_tracked: Gauge::default(),
            dest_evicted: Counter::default(),
            kernel_seen: Default::default(),
            evicted_seen: 0,
            known_dsts: HashSet::new(),
            max_destinations,
            lost_seen: 0,
            by_service: None,
        };
        m.register_connects(registry);
        m.register_health(registry);
        crate::metrics::process::register(registry);
        m
    }

    /// What the kernel saw of connects.
    fn register_connects(&self, registry: &mut Registry) {
        register(
            registry,
            "gateway_connect_attempts",
            "TCP connects by destination and outcome (established, refused, timeout, unreachable, aborted, addr_unavailable), as seen by the kernel (eBPF sock_ops).",
            self.attempts.clone(),
        );
        register(
            registry,
            "gateway_connect_syn_rtt_seconds",
            "Time from SYN sent to SYN-ACK received, measured by the kernel (eBPF sock_ops).",
            self.syn_rtt.clone(),
        );
        register(
            registry,
            "gateway_connect_syn_retransmits",
            "SYN retransmits by destination, counted by the kernel (eBPF sock_ops RETRANS).",
            self.syn_retransmits.clone(),
        );
        register(
            registry,
            "gateway_socket_errors",
            "Errors applications read through getsockopt(SO_ERROR), by errno and process name; seen by the kernel (eBPF cgroup getsockopt).",
            self.socket_errors.clone(),
        );
    }

    /// The kernel's per-destination table's two families: served unless the table is off
    /// (`--no-destination-table`), where they would read 0 for a table that does not exist.
    pub fn register_destination_table(&self, registry: &mut Registry) {
        register(
            registry,
            "gateway_observer_destinations_tracked",
            "Destinations the kernel's per-destination table (LRU, --max-destinations) holds now.",
            self.dest_tracked.clone(),
        );
        register(
            registry,
            "gateway_observer_destinations_evicted",
            "Destinations the kernel's per-destination table evicted (least recently used) to make room: added minus held.",
            self.dest_evicted.clone(),
        );
    }

    /// The observer's own health: losses, anomalies, whether it is attached.
    fn register_health(&self, registry: &mut Registry) {
        register(
            registry,
            "gateway_observer_events_lost",
            "Connect records the kernel could not queue because the ring buffer was full.",
            self.events_lost.clone(),
        );
        register(
            registry,
            "gateway_observer_late_so_errors",
            "SO_ERROR reads that arrived after their connect record had been released without theself.",
            self.late_so_errors.clone(),
        );
        register(
            registry,
            "gateway_observer_kernel_anomalies",
            "Rare kernel-side failures, by kind: dest_insert_failed (a destination could not be added to DEST_STATS), conn_insert_failed (CONN_STATS), slot_reused (a connect still waiting for its SYN-ACK lost its record: more connects started meanwhile than the kernel's table of records holds, --max-connections), unexpected_state (a TCP state transition the observer does not expect). Counted by the kernel (eBPF); each is also logged, at most once per second per kind and CPU.",
            self.anomalies.clone(),
        );
        register(
            registry,
            "gateway_observer_kernel_anomaly_logs_suppressed",
            "Kernel anomaly log lines not written because of the once-per-second rate limit (they are still counted).",
            self.anomaly_logs_suppressed.clone(),
        );
        register(
            registry,
            "gateway_observer_kernel_attached",
            "1 while the eBPF programs are attached and feeding this process.",
            self.kernel_attached.clone(),
        );
    }

    fn dst_label(&mut self, dst: &SocketAddr) -> String {
        let s = dst.to_string();
        if self.known_dsts.contains(&s) {
            return s;
        }
        if self.known_dsts.len() < self.max_destinations {
            self.known_dsts.insert(s.clone());
            s
        } else {
            OTHER_DST.to_owned()
        }
    }

    /// Registers `gateway_connect_attempts_by_service_total`, labelled by `by`, with at most
    /// `max` distinct services (the rest are `other`).
    pub fn count_by_service(
        &mut self,
        registry: &mut Registry,
        by: super::attribution::ServiceLabel,
        max: usize,
    ) {
        let attempts = Family::<ServiceOutcome, Counter>::default();
        register(
            registry,
            "gateway_connect_attempts_by_service",
            "TCP connects by the service that made them (its cgroup path, systemd unit, container id or pod UID, as chosen with --metrics-by; none where the path names none) and outcome, as seen by the kernel (eBPF sock_ops).",
            attempts.clone(),
        );
        self.by_service = Some(ByService {
            attempts,
            by,
            known: HashSet::new(),
            max,
        });
    }

    /// Counts `rec` under its service, when counting by service was asked for.
    pub fn record_service(&mut self, rec: &ConnectRecord, service: &super::attribution::Service) {
        let Some(b) = &mut self.by_service else {
            return;
        };
        let value = service.label(b.by).unwrap_or(NO_SERVICE);
        let label = if b.known.contains(value) {
            value.to_owned()
        } else if b.known.len() < b.max {
            b.known.insert(value.to_owned());
            value.to_owned()
        } else {
            OTHER_DST.to_owned()
        };
        b.attempts
            .get_or_create(&ServiceOutcome {
                service: label,
                outcome: rec.outcome,
            })
            .inc();
    }

    pub fn set_attached(&self, attached: bool) {
        self.kernel_attached.set(i64::from(attached));
    }

    pub fn record(&mut self, rec: &ConnectRecord) {
        let dst = self.dst_label(&rec.dst);
        self.attempts
            .get_or_create(&DstOutcome {
                dst: dst.clone(),
                outcome: rec.outcome,
            })
            .inc();
        if rec.syn_retransmits > 0 {
            self.syn_retransmits
                .get_or_create(&Dst { dst: dst.clone() })
                .inc_by(u64::from(rec.syn_retransmits));
        }
        if let Some(us) = rec.syn_rtt_us {
            self.syn_rtt
                .get_or_create(&Dst { dst })
                .observe(us as f64 / 1e6);
        }
    }

    pub fn so_error(&mut self, read: &SoErrorRead) {
        if read.value != 0 {
            self.socket_errors
                .get_or_create(&ErrnoComm {
                    errno: errno_name(read.value),
                    comm: comm_str(&read.comm),
                })
                .inc();
        }
    }

    /// Follows the kernel's own counters; `entries` is how many destinations its table holds.
    pub fn set_kernel_counters(
        &mut self,
        now: &crate::observer::KernelCounters,
        entries: Option<usize>,
    ) {
        for (index, kind) in gateway_common::anomaly::KINDS {
            let (n, before) = (now.get(index), self.kernel_seen.get(index));
            if n > before {
                self.anomalies
                    .get_or_create(&Kind { kind })
                    .inc_by(n - before);
            } else {
                // Present from the start, so that a dashboard sees 0 rather than nothing.
                let _ = self.anomalies.get_or_create(&Kind { kind });
            }
        }
        let idx = gateway_common::counter::ANOMALY_LOGS_SUPPRESSED;
        if now.get(idx) > self.kernel_seen.get(idx) {
            self.anomaly_logs_suppressed
                .inc_by(now.get(idx) - self.kernel_seen.get(idx));
        }
        if let Some(entries) = entries {
            self.dest_tracked.set(entries as i64);
            let evicted = now.dest_evicted(entries);
            if evicted > self.evicted_seen {
                self.dest_evicted.inc_by(evicted - self.evicted_seen);
                self.evicted_seen = evicted;
            }
        }
        self.kernel_seen = *now;
    }

    /// `total` is the kernel's running count; the counter follows it.
    pub fn set_events_lost(&mut self, total: u64) {
        if total > self.lost_seen {
            self.events_lost.inc_by(total - self.lost_seen);
            self.lost_seen = total;
        }
    }

    pub fn set_late_so_errors(&mut self, total: u64) {
        let seen = self.late_so_errors.get();
        if total > seen {
            self.late_so_errors.inc_by(total - seen);
        }
    }
}

/// Serves `GET /metrics` (OpenMetrics text) on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics at /metrics");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(%err, "metrics accept failed");
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &registry)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(
                b"not found; metrics are at /metrics\n",
            )))
            .expect("static response");
    }
    let mut body = String::new();
    match encode(&mut body, registry) {
        Ok(()) => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("static headers"),
        Err(_) => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Full::new(Bytes::from_static(b"encoding metrics failed\n")))
            .expect("static response"),
    }
}

#[cfg(test)]
mod tests {
    use gateway_common::Outcome;

    use super::*;

    use std::time::Duration;

    #[test]
    fn outcome_labels_are_the_contract_names() {
        let mut registry = Registry::default();
        let mut m = ObserverMetrics::new(
            &mut registry,
            10,
            LatencyBuckets::reaching(Duration::from_secs(131)),
        );
        let mut rec = ConnectRecord {
            dst: "10.0.0.5:8080".parse().unwrap(),
            outcome: OutcomeName(Outcome::AddrUnavailable),
            errno: Some("EADDRNOTAVAIL".into()),
            ..rec(1)
        };
        m.record(&rec);
        rec.outcome = OutcomeName(Outcome::Established);
        rec.syn_rtt_us = Some(100);
        m.record(&rec);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for h in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(h.ends_with('.') && !h.ends_with(".."), "{h}");
        }
        assert!(
            text.contains(
                "gateway_connect_syn_rtt_seconds_bucket{le=\"209.7152\",dst=\"10.0.0.5:8080\"} 1"
            ),
            "buckets reach the kernel's 131 s SYN budget:\n{text}"
        );
        assert!(text.contains("gateway_build_info{"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        for want in [
            "gateway_connect_attempts_total{dst=\"10.0.0.5:8080\",outcome=\"addr_unavailable\"} 1",
            "gateway_connect_attempts_total{dst=\"10.0.0.5:8080\",outcome=\"established\"} 1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }

    use crate::observer::records::{ConnectRecord, OutcomeName};

    fn rec(port: u16) -> ConnectRecord {
        ConnectRecord {
            ts_unix_ns: 0,
            dst: SocketAddr::from(([10, 0, 0, 1], port)),
            src_port: 1,
            cookie: u64::from(port),
            pid: 1,
            comm: "c".into(),
            cgroup_id: 1,
            outcome: OutcomeName(gateway_common::Outcome::Refused),
            syn_retransmits: 0,
            elapsed_us: 1,
            syn_rtt_us: None,
            errno: None,
            so_error: None,
            refused_by: None,
        }
    }

    /// SECURITY.md: however many destinations a host talks to, the `dst` label has at most
    /// `max_destinations` values plus `other`.
    #[test]
    fn destination_labels_are_capped() {
        let mut registry = Registry::default();
        let mut m = ObserverMetrics::new(
            &mut registry,
            10,
            LatencyBuckets::reaching(Duration::from_secs(131)),
        );
        for port in 0..5000 {
            m.record(&rec(port));
        }
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let dsts: HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("gateway_connect_attempts_total{"))
            .filter_map(|l| l.split("dst=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(dsts.len(), 11, "10 destinations and `other`: {dsts:?}");
        assert!(dsts.contains(OTHER_DST));
        assert!(
            text.contains("gateway_connect_attempts_total{dst=\"other\",outcome=\"refused\"} 4990")
        );
    }
}
