//! The metric catalogue of `gateway run`: every family, its type, labels and help text, in one
//! table ([`CATALOGUE`]) that both registers the metrics and generates `METRICS.md`, so the
//! documentation cannot drift from the code (a test compares them).
//!
//! Label values are bounded: routes, clusters and endpoints come from the config, outcomes,
//! phases, reasons and errnos from closed sets in the code. Nothing a client sends becomes a
//! label. Kernel-sourced families say so in their help text. Series of routes, clusters and
//! endpoints that are gone (a reload, a DNS change) are removed (`proxy::telemetry::series`).
//!
//! Help texts are sentences ending in one period, which [`register`] takes off (the registry
//! adds its own; a test checks that no `# HELP` line ends in `..`). `gateway_build_info` and
//! the `process_*` family (the names every Prometheus client library exports, so existing
//! dashboards work) are shared with `gateway observe` ([`process`]).

mod doc;
use doc::family_name;
mod labels;
pub use labels::*;
pub mod process;

pub use doc::catalogue_markdown;

use std::time::Duration;

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::{Metric, Registry},
};

/// The lowest histogram bucket: 50 µs, below a loopback SYN-RTT.
pub const LOWEST_BUCKET: f64 = 50e-6;
/// Buckets double from [`LOWEST_BUCKET`]; there are at least this many (50 µs … 13.1 s).
pub const MIN_BUCKETS: u16 = 19;

/// Histogram buckets from 50 µs, doubling, up to the first bound at or above `longest` (at
/// least [`MIN_BUCKETS`]): a request that ran into its longest timeout still lands in a
/// bucket of its own, not only in `+Inf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyBuckets {
    count: u16,
}

impl LatencyBuckets {
    pub fn reaching(longest: Duration) -> LatencyBuckets {
        let mut count = MIN_BUCKETS;
        while LOWEST_BUCKET * 2f64.powi(i32::from(count) - 1) < longest.as_secs_f64() && count < 64
        {
            count += 1;
        }
        LatencyBuckets { count }
    }

    /// The highest finite bound.
    pub fn top(self) -> Duration {
        Duration::from_secs_f64(LOWEST_BUCKET * 2f64.powi(i32::from(self.count) - 1))
    }

    pub fn bounds(self) -> impl Iterator<Item = f64> {
        prometheus_client::metrics::histogram::exponential_buckets(LOWEST_BUCKET, 2.0, self.count)
    }
}

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.bounds())
    }
}

pub type HistogramFamily<L> = Family<L, Histogram, LatencyBuckets>;

/// Registers `metric` under `name` (without a counter's `_total`) with `help`, whose final
/// period the registry adds back.
pub fn register(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    let name = name.strip_suffix("_total").unwrap_or(name);
    registry.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// One row of the catalogue.
#[derive(Clone, Copy, Debug)]
pub struct MetricDoc {
    /// The exposed name (counters gain `_total` on the wire).
    pub name: &'static str,
    pub kind: &'static str,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! catalogue {
    ($($field:ident: $name:literal, $kind:literal, [$($label:literal),*], $help:literal;)*) => {
        /// Every metric `gateway run` exports.
        pub const CATALOGUE: &[MetricDoc] = &[
            $(MetricDoc { name: $name, kind: $kind, labels: &[$($label),*], help: $help },)*
        ];
        mod field_index {
            #![allow(non_upper_case_globals, dead_code)]
            catalogue!(@idx 0usize; $($field)*);
        }
    };
    (@idx $n:expr; $first:ident $($rest:ident)*) => {
        pub const $first: usize = $n;
        catalogue!(@idx $n + 1usize; $($rest)*);
    };
    (@idx $n:expr;) => {};
}

catalogue! {
    requests: "gateway_requests", "counter", ["route", "cluster", "status"],
        "Requests answered, by route, cluster and HTTP status (including the gateway's own 5xx).";
    responses_incomplete: "gateway_responses_incomplete", "counter", ["route", "cluster", "reason"],
        "Responses that began but did not reach the client whole, by route, cluster and reason: the upstream's body broke after its head (upstream_reset: the connection was closed or reset mid-body; invalid_upstream_response: its framing broke; response_timeout: it stalled for longer than the response timeout), grpc_deadline (a gRPC call's own deadline, grpc-timeout, passed while its response streamed: the client's choice, as in a watch call), client_closed (the client went away first), client_write_timeout (the gateway closed a client that stopped reading for write_timeout_ms) or shutdown (the drain's grace period ran out and the gateway closed what was still open). A response the client had whole is never counted, even when an HTTP/2 upstream's END_STREAM came after its last byte. gateway_requests_total counts these under the status of the head (a 200 cut short is a 200 there, as in the access log, where error or aborted says what happened). A client may have seen the head and part of the body, or nothing; a gRPC client gets a status in trailers the gateway writes.";
    request_duration: "gateway_request_duration_seconds", "histogram", ["route", "cluster"],
        "Time from request headers received to the end of the response (the access log's total_ms), by route and cluster.";
    upstream_attempts: "gateway_upstream_attempts", "counter", ["cluster", "endpoint", "outcome"],
        "Upstream connects made for requests (probes excluded) by outcome: established, refused (RST), timeout (the kernel's SYN retries ran out, ETIMEDOUT), unreachable (ICMP), aborted (the gateway closed the socket before a SYN-ACK: its connect deadline passed, or a hedged connect lost the race), addr_unavailable (no local port). The outcome is the kernel's (eBPF sock_ops) when the observer is attached, else the proxy's own reading of the same event.";
    syn_rtt: "gateway_upstream_syn_rtt_seconds", "histogram", ["cluster", "endpoint"],
        "SYN sent to SYN-ACK received on upstream connects made for requests, measured by the kernel (eBPF sock_ops); not observed without kernel signals.";
    syn_retransmits: "gateway_upstream_syn_retransmits", "counter", ["cluster", "endpoint"],
        "SYNs retransmitted on upstream connects made for requests (whatever their outcome), counted by the kernel (eBPF sock_ops RETRANS).";
    connect_failures: "gateway_upstream_connect_failures", "counter", ["cluster", "endpoint", "errno"],
        "Failed upstream connects by errno (ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EADDRNOTAVAIL, ...): the kernel's errno (eBPF) when attached, else the one connect() returned; a connect the gateway abandoned at its connect deadline counts as ETIMEDOUT.";
    socket_errors: "gateway_socket_errors", "counter", ["errno"],
        "Errors the gateway read through getsockopt(SO_ERROR) on its upstream sockets: a connect that failed after its SYN went out (refused, timeout, unreachable) reports its error that way; the errno is the kernel's (eBPF). Counted only with kernel signals.";
    timeouts: "gateway_timeouts", "counter", ["cluster", "phase"],
        "Gateway timers that fired on requests, by phase: connect (an attempt's connect deadline), response (response_timeout_ms, before the head or between body reads), write (write_timeout_ms to the upstream), request (request_timeout_ms), tls_handshake (tls_handshake_timeout_ms to a TLS upstream).";
    rtos: "gateway_upstream_rtos", "counter", ["cluster", "endpoint"],
        "Retransmission timeouts on established upstream connections, from the kernel (eBPF sock_ops RTO); added when a connection closes, from the kernel's final record of it.";
    connect_deadline: "gateway_upstream_connect_deadline_seconds", "gauge", ["cluster", "endpoint"],
        "The connect deadline currently applied to the endpoint (adaptive from kernel SYN-RTT, capped by connect_timeout_ms).";
    health_state: "gateway_endpoint_health_state", "gauge", ["cluster", "endpoint", "state"],
        "1 for the endpoint's current health state (healthy, slow, suspect, ejected, probing), 0 for the others.";
    latency: "gateway_upstream_latency_ewma_seconds", "gauge", ["cluster", "endpoint"],
        "The endpoint's peak-EWMA of response-head latency (decay towards zero included), fed by responses, response timeouts, kernel SYN-RTTs and stalled requests (see decide::latency); what lb_policy peak_ewma weighs. Absent until the first sample.";
    h2_requests_per_connection: "gateway_upstream_h2_requests_per_connection", "gauge", ["cluster", "endpoint"],
        "How many requests the HTTP/2 upstream lets one connection carry (nginx's keepalive_requests, for one), learned when two of its connections ended by a graceful GOAWAY within a minute after processing as many (at least 2; see upstream::lifetime). Later connections to it carry at most that many and are then replaced, so the upstream refuses no stream. 0 when none is known: not learned, or forgotten 10 minutes after it was learned, so that a raised limit is noticed. Absent until a limit is first learned.";
    slowdowns: "gateway_endpoint_slowdowns", "counter", ["cluster", "endpoint"],
        "Times lb_policy peak_ewma found the endpoint slow (a latency outlier against the cluster's lower median) and sent it only a trickle; health_state{state=\"slow\"} is 1 while it lasts. Never an ejection.";
    hash_spills: "gateway_endpoint_hash_spills", "counter", ["cluster", "endpoint"],
        "Requests whose consistent_hash key belongs to the endpoint that went to the key's next endpoint instead, because it had as many requests in flight as hash_balance_factor allows (bounded loads): a hot key, or an endpoint slower than the rest. Counted once per request, at its first pick (not for retries or hedges); always 0 without hash_balance_factor.";
    ejections: "gateway_endpoint_ejections", "counter", ["cluster", "endpoint", "reason"],
        "Endpoint ejections by reason (syn_unanswered, refused, unreachable, host_died, overloaded, slow_backend, probe_failed, unexpected_status, tls_failure, error_status).";
    hedges: "gateway_hedged_connects", "counter", ["cluster", "reason", "result"],
        "Hedged connects: a connect to a second endpoint raced against one with no SYN-ACK by its deadline (reason deadline), by result: won (the hedge connected first), lost (the first endpoint won, or the hedge failed too), budget_exhausted (no hedge: the hedge budget or the connection limit did not allow one).";
    retries: "gateway_retries", "counter", ["cluster", "reason"],
        "Requests retried, by reason (connect_failed, unacked_request, stale_connection, response_timeout, upstream_reset, refused_stream: an HTTP/2 upstream refused the stream unprocessed by GOAWAY or REFUSED_STREAM, grpc_status: a gRPC status the route retries, upstream_status: a response status the route retries for an idempotent request).";
    retry_budget_exhausted: "gateway_retry_budget_exhausted", "counter", ["cluster"],
        "Retries not made because the cluster's retry budget was spent.";
    access_log_lost: "gateway_access_log_lines_lost", "counter", ["reason"],
        "Access-log lines lost, by reason: queue_full (the writer thread could not keep up; the log itself also says how many at that point), write_error (the output refused them: a full disk, a closed pipe; logged as an error at most every 10 s).";
    log_lost: "gateway_log_lines_lost", "counter", ["reason"],
        "Lines of the gateway's own log (stderr) lost, by reason: queue_full (stderr did not take lines as fast as they came, and its queue of 8192 lines was full: a stalled journald, a container log driver that blocks, a pipe nobody reads; the log says how many once it has room again), write_error (stderr refused them: a closed pipe). Logging never holds the proxy: a line that cannot be queued is dropped.";
    panics: "gateway_panics", "counter", [],
        "Panics in the process, on any thread: a bug. Each is logged as an error (`panic: …`, with the thread and the source location). A panic in a request's task ends that request (over HTTP/1, its connection) and the worker serves on; one that ends a worker (in its accept loop, say) drains the gateway and exits it with status 1, for its service manager to restart it. Alert on any increase.";
    dns_failures: "gateway_dns_resolution_failures", "counter", ["cluster"],
        "Host-name endpoints of the cluster that did not resolve, counted per name at each resolution (at start and every dns_refresh_ms). While a name fails, the cluster keeps the addresses it last had; an alert on this is how a DNS outage is seen before those addresses go stale.";
    observer_kernel: "gateway_observer_kernel_signals", "gauge", [],
        "1 when kernel (eBPF) signals drive the gateway, 0 when it runs on userspace timing alone.";
    observer_mode: "gateway_observer_mode", "gauge", ["mode"],
        "1 for the observer mode in effect (kernel, userspace).";
    events_lost: "gateway_observer_events_lost", "counter", [],
        "Connect records the kernel could not queue because the ring buffer was full (read from the observer every second).";
    tls_handshakes: "gateway_tls_handshakes", "counter", ["side", "result", "version"],
        "TLS handshakes by side (downstream: clients of the HTTPS listener; upstream: the gateway to TLS clusters), result (ok, error) and negotiated version (TLSv1.3, TLSv1.2; unknown when it failed).";
    tls_handshake_errors: "gateway_tls_handshake_errors", "counter", ["side", "reason"],
        "Failed TLS handshakes by reason. Downstream: timeout (tls_handshake_timeout_ms), plain_http (an HTTP request on the HTTPS port, answered 400), not_tls, unknown_sni (no certificate for the name), client_rejected_certificate, client_alert, bad_client_certificate (mTLS: one the CA did not issue, expired, …), no_client_certificate (mTLS: none shown), no_shared_parameters, no_shared_alpn, protocol, client_closed, io. Upstream: timeout, unknown_ca, name_mismatch, expired, bad_certificate, alert, protocol, closed, io.";
    tls_handshake_duration: "gateway_tls_handshake_duration_seconds", "histogram", ["side"],
        "Time from the TCP connection to the end of successful TLS handshakes, by side.";
    tls_certificate_expiry: "gateway_tls_certificate_expiry_timestamp_seconds", "gauge", ["role", "file", "subject"],
        "When each certificate the gateway presents stops being valid (Unix seconds): the earliest notAfter of the chain in file, for the HTTPS listener (role server) and upstream client certificates (role client). Set at start and at every reload.";
    kernel_anomalies: "gateway_observer_kernel_anomalies", "counter", ["kind"],
        "Rare kernel-side failures of the observer, by kind: dest_insert_failed, conn_insert_failed (a map insert failed), slot_reused (a connect still waiting for its SYN-ACK lost its record: more connects started meanwhile than the kernel's table of records holds), unexpected_state (a TCP state transition the observer does not expect). Counted by the kernel (eBPF); each is also logged (target gateway::kernel), at most once per second per kind and CPU.";
    upstream_connections: "gateway_upstream_connections", "gauge", ["cluster"],
        "Upstream connections the cluster holds now, busy, idle or being made (an upgraded connection's included, until it ends): what max_connections limits. Read every second.";
    upstream_max_connections: "gateway_upstream_max_connections", "gauge", ["cluster"],
        "The cluster's max_connections: gateway_upstream_connections at this value means that a request finding no idle connection waits for one to free up (counted in gateway_upstream_pending_requests), up to its request timeout.";
    upstream_pending: "gateway_upstream_pending_requests", "gauge", ["cluster"],
        "Requests waiting now for one of the cluster's connections to free up, every one of its max_connections being in use (max_pending_requests limits them; past it a request is answered 503 overloaded). Read every second.";
    upgrades_active: "gateway_upgraded_connections", "gauge", ["cluster"],
        "Upgraded connections (WebSocket, any HTTP/1.1 Upgrade) open now: from the 101 to their end.";
    upgrades: "gateway_upgrades", "counter", ["cluster", "end"],
        "Upgraded connections ended, by how: client_closed, upstream_closed (that side closed first), idle_timeout (upgrade_idle_timeout_ms), max_duration (upgrade_max_duration_ms), shutdown (the drain's grace ran out), error (a read or write failed, or a write stalled past write_timeout_ms).";
    upgrade_bytes: "gateway_upgrade_bytes", "counter", ["cluster", "direction"],
        "Bytes copied through upgraded connections, by direction: to_upstream (from the client) and to_client.";
    kernel_anomaly_logs_suppressed: "gateway_observer_kernel_anomaly_logs_suppressed", "counter", [],
        "Kernel anomaly log lines not written because of the once-per-second rate limit per kind and CPU (the anomalies are still counted in gateway_observer_kernel_anomalies_total). Counted by the kernel (eBPF).";
    build_info: "gateway_build_info", "info", ["version", "revision", "rustc", "profile"],
        "The running build: its version, the git revision it was built from (unknown outside a git checkout), the rustc that compiled it and the cargo profile (release, debug).";
    process_cpu: "process_cpu_seconds", "counter", [],
        "User and system CPU time spent by the process (/proc/self/stat), in seconds.";
    process_rss: "process_resident_memory_bytes", "gauge", [],
        "Resident memory of the process (/proc/self/stat rss), in bytes.";
    process_vsize: "process_virtual_memory_bytes", "gauge", [],
        "Virtual memory of the process (/proc/self/stat vsize), in bytes.";
    process_fds: "process_open_fds", "gauge", [],
        "File descriptors the process holds open (entries of /proc/self/fd).";
    process_max_fds: "process_max_fds", "gauge", [],
        "The process's limit on open file descriptors (RLIMIT_NOFILE, soft).";
    process_threads: "process_threads", "gauge", [],
        "Threads of the process (/proc/self/stat).";
    process_start: "process_start_time_seconds", "gauge", [],
        "When the process started, in Unix seconds.";
    client_connections: "gateway_client_connections", "gauge", [],
        "Client connections open now, over every listener and worker (what max_client_connections limits).";
    client_parked: "gateway_client_connections_parked", "gauge", [],
        "Plain HTTP client connections parked: held as a bare socket, without the HTTP parser's buffers, until the client sends again. Idle HTTP/1 keep-alive connections (quiet for a second, no request running) wait in their worker's parking lot; new connections wait so until their first bytes. Counted in gateway_client_connections too.";
    client_rejected: "gateway_client_connections_rejected", "counter", ["listener", "reason"],
        "Client connections accepted and turned away at once, by listener address and reason: max_connections (max_client_connections reached), accept_rate (max_accepts_per_second exceeded), fd_exhausted (no file descriptor left: accepted on a reserved one and closed). Plain HTTP listeners answer 503 with x-gateway-error: overloaded and Connection: close; HTTPS listeners, and fd_exhausted, close.";
    client_proxy_protocol: "gateway_client_proxy_protocol", "counter", ["result"],
        "Client connections from the peers [router.proxy_protocol] expects a PROXY protocol header from, by result: served with a header that names the client (v1, v2), with one that names none (local: v2 LOCAL or v1 UNKNOWN, the load balancer's own health checks; the peer is the client), or with none (absent, as required = false allows); closed for want of one: missing (no header), malformed, too_large (over 4096 bytes), timeout (not whole within timeout_ms), closed (the peer closed first), io.";
    client_reset_floods: "gateway_client_http2_reset_floods", "counter", [],
        "HTTP/2 client connections closed because their client reset most of its streams soon after opening them, before their response was over (rapid reset, CVE-2023-44487): by default, within a second, at least 250 of its first 500 streams, or half of all its streams after that ([router.downstream] http2_premature_reset_streams and http2_premature_reset_lifetime_ms). Also those h2 closed with a GOAWAY ENHANCE_YOUR_CALM of its own: most often for reset streams waiting to be accepted (past the rule's threshold at once; with the rule off, ten times http2_max_concurrent_streams), else for a flood of stream errors, header or CONTINUATION frames, or DATA frames, which h2 does not tell apart. Also logged (warn) with the client's address, at most once per 10 s with the number not logged.";
    rate_limit_untracked: "gateway_rate_limit_untracked", "counter", ["route", "cluster"],
        "Requests a route's rate_limit let pass uncounted because its table of clients (max_clients) was full of clients ahead of the rate: a flood from that many addresses. Logged (warn) at most once per 10 s per route.";
    accept_errors: "gateway_accept_errors", "counter", ["listener", "errno"],
        "accept() failures on client listeners by errno (EMFILE, ENFILE: out of file descriptors; ENOBUFS, ENOMEM: out of memory). The listener backs off and retries; logged at most once per 10 s per listener with the count suppressed.";
    worker_connections: "gateway_worker_client_connections", "gauge", ["worker"],
        "Client connections open now on each worker thread (parked ones included). With [router] connection_balance = \"exact\" (the default) a worker that accepts a connection while another serves fewer hands it over, so the workers stay within one connection of each other; with \"kernel\" they get what SO_REUSEPORT's hash gives them.";
    read_ahead_bytes: "gateway_request_read_ahead_bytes", "gauge", [],
        "Request body bytes held read ahead now: the start of a body (its first 64 KiB, or all of a smaller one) read before any upstream is asked, so that a client sending its body slowly holds no upstream connection. All requests together hold at most [router.downstream] request_buffering_memory_bytes (64 MiB by default) with what is kept for retries (gateway_request_retry_copy_bytes), give or take one read each.";
    read_ahead_over_budget: "gateway_request_read_ahead_over_budget", "counter", [],
        "Request bodies that were not read ahead, or not to the end of their first 64 KiB, because all requests together held request_buffering_memory_bytes: they streamed to their upstream as they arrived, as with request_buffering = false, holding an upstream connection while the client sends. Also logged (warn), at most once per 10 s with the number not logged.";
    retry_copy_bytes: "gateway_request_retry_copy_bytes", "gauge", [],
        "Request body bytes kept now so that a request can be sent again after a failed attempt, until it has its response: bodies of up to 64 KiB (a larger one is not kept), of requests that may be retried. They share [router.downstream] request_buffering_memory_bytes with the bytes read ahead (gateway_request_read_ahead_bytes): the two together stay within it, give or take one read each.";
    retry_copy_over_budget: "gateway_request_retry_copy_over_budget", "counter", [],
        "Request bodies not kept for a retry because all requests together held request_buffering_memory_bytes (read ahead and kept): such a request is not sent again once its body went upstream, as a body over 64 KiB is not. Also logged (warn), at most once per 10 s with the number not logged.";
}

/// The registered families. Cloning is cheap (every family is an `Arc` inside).
#[derive(Clone)]
pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub responses_incomplete: Family<IncompleteLabels, Counter>,
    pub request_duration: HistogramFamily<RouteLabels>,
    pub upstream_attempts: Family<EndpointOutcome, Counter>,
    pub syn_rtt: HistogramFamily<EndpointLabels>,
    pub syn_retransmits: Family<EndpointLabels, Counter>,
    pub connect_failures: Family<EndpointErrno, Counter>,
    pub socket_errors: Family<ErrnoLabels, Counter>,
    pub timeouts: Family<PhaseLabels, Counter>,
    pub rtos: Family<EndpointLabels, Counter>,
    pub connect_deadline: Family<EndpointLabels, FloatGauge>,
    pub health_state: Family<StateLabels, Gauge>,
    pub latency: Family<EndpointLabels, FloatGauge>,
    pub h2_requests_per_connection: Family<EndpointLabels, Gauge>,
    pub slowdowns: Family<EndpointLabels, Counter>,
    pub hash_spills: Family<EndpointLabels, Counter>,
    pub ejections: Family<EndpointReason, Counter>,
    pub hedges: Family<HedgeLabels, Counter>,
    pub retries: Family<ClusterReason, Counter>,
    pub retry_budget_exhausted: Family<ClusterLabels, Counter>,
    pub dns_failures: Family<ClusterLabels, Counter>,
    pub access_log_lost: Family<ReasonLabels, Counter>,
    /// The same family as `logging::output::LOST`.
    pub log_lost: Family<ReasonLabels, Counter>,
    /// The same counter as `logging::panic::PANICS`.
    pub panics: Counter,
    pub observer_kernel: Gauge,
    pub observer_mode: Family<ModeLabels, Gauge>,
    pub worker_connections: Family<WorkerLabels, Gauge>,
    pub events_lost: Counter,
    pub tls_handshakes: Family<TlsHandshakeLabels, Counter>,
    pub tls_handshake_errors: Family<TlsErrorLabels, Counter>,
    pub tls_handshake_duration: HistogramFamily<SideLabels>,
    pub tls_certificate_expiry: Family<CertificateLabels, Gauge>,
    pub kernel_anomalies: Family<KindLabels, Counter>,
    pub upstream_connections: Family<ClusterLabels, Gauge>,
    pub upstream_max_connections: Family<ClusterLabels, Gauge>,
    pub upstream_pending: Family<ClusterLabels, Gauge>,
    pub upgrades_active: Family<ClusterLabels, Gauge>,
    pub upgrades: Family<UpgradeEndLabels, Counter>,
    pub upgrade_bytes: Family<DirectionLabels, Counter>,
    pub kernel_anomaly_logs_suppressed: Counter,
    /// The histograms' buckets.
    pub buckets: LatencyBuckets,
    pub client_connections: Gauge,
    pub client_parked: Gauge,
    pub client_reset_floods: Counter,
    pub client_rejected: Family<ListenerReason, Counter>,
    pub client_proxy_protocol: Family<ResultLabels, Counter>,
    pub accept_errors: Family<ListenerErrno, Counter>,
    pub rate_limit_untracked: Family<RouteLabels, Counter>,
    pub read_ahead_bytes: Gauge,
    pub read_ahead_over_budget: Counter,
    pub retry_copy_bytes: Gauge,
    pub retry_copy_over_budget: Counter,
}

impl GatewayMetrics {
    /// Registers every family; histograms get `buckets`.
    pub fn new(registry: &mut Registry, buckets: LatencyBuckets) -> GatewayMetrics {
        let m = GatewayMetrics {
            requests: Family::default(),
            responses_incomplete: Family::default(),
            request_duration: Family::new_with_constructor(buckets),
            upstream_attempts: Family::default(),
            syn_rtt: Family::new_with_constructor(buckets),
            syn_retransmits: Family::default(),
            connect_failures: Family::default(),
            socket_errors: Family::default(),
            timeouts: Family::default(),
            rtos: Family::default(),
            connect_deadline: Family::default(),
            health_state: Family::default(),
            latency: Family::default(),
            h2_requests_per_connection: Family::default(),
            slowdowns: Family::default(),
            hash_spills: Family::default(),
            ejections: Family::default(),
            hedges: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            dns_failures: Family::default(),
            access_log_lost: Family::default(),
            log_lost: crate::logging::output::LOST.clone(),
            panics: crate::logging::panic::PANICS.clone(),
            observer_kernel: Gauge::default(),
            observer_mode: Family::default(),
            events_lost: Counter::default(),
            tls_handshakes: Family::default(),
            tls_handshake_errors: Family::default(),
            tls_handshake_duration: Family::new_with_constructor(buckets),
            tls_certificate_expiry: Family::default(),
            kernel_anomalies: Family::default(),
            upstream_connections: Family::default(),
            upstream_max_connections: Family::default(),
            upstream_pending: Family::default(),
            upgrades_active: Family::default(),
            upgrades: Family::default(),
            upgrade_bytes: Family::default(),
            kernel_anomaly_logs_suppressed: Counter::default(),
            buckets,
            client_connections: Gauge::default(),
            client_parked: Gauge::default(),
            client_reset_floods: Counter::default(),
            client_rejected: Family::default(),
            client_proxy_protocol: Family::default(),
            accept_errors: Family::default(),
            rate_limit_untracked: Family::default(),
            worker_connections: Family::default(),
            read_ahead_bytes: Gauge::default(),
            read_ahead_over_budget: Counter::default(),
            retry_copy_bytes: Gauge::default(),
            retry_copy_over_budget: Counter::default(),
        };
        m.register(registry);
        m
    }

    /// The observer gauges: kernel signals drive the gateway, or userspace timing alone.
    pub fn observer(&self, kernel: bool) {
        self.observer_kernel.set(i64::from(kernel));
        for (mode, on) in [("kernel", kernel), ("userspace", !kernel)] {
            let labels = ModeLabels { mode };
            self.observer_mode.get_or_create(&labels).set(i64::from(on));
        }
    }

    /// Registers every family under its [`CATALOGUE`] name and help, in catalogue order.
    fn register(&self, registry: &mut Registry) {
        use field_index as f;
        macro_rules! reg {
            ($i:expr, $metric:expr) => {{
                let d = CATALOGUE[$i];
                register(registry, d.name, d.help, $metric.clone());
            }};
        }
        reg!(f::requests, self.requests);
        reg!(f::responses_incomplete, self.responses_incomplete);
        reg!(f::request_duration, self.request_duration);
        reg!(f::upstream_attempts, self.upstream_attempts);
        reg!(f::syn_rtt, self.syn_rtt);
        reg!(f::syn_retransmits, self.syn_retransmits);
        reg!(f::connect_failures, self.connect_failures);
        reg!(f::socket_errors, self.socket_errors);
        reg!(f::timeouts, self.timeouts);
        reg!(f::rtos, self.rtos);
        reg!(f::connect_deadline, self.connect_deadline);
        reg!(f::health_state, self.health_state);
        reg!(f::latency, self.latency);
        reg!(
            f::h2_requests_per_connection,
            self.h2_requests_per_connection
        );
        reg!(f::slowdowns, self.slowdowns);
        reg!(f::hash_spills, self.hash_spills);
        reg!(f::ejections, self.ejections);
        reg!(f::hedges, self.hedges);
        reg!(f::retries, self.retries);
        reg!(f::retry_budget_exhausted, self.retry_budget_exhausted);
        reg!(f::dns_failures, self.dns_failures);
        reg!(f::access_log_lost, self.access_log_lost);
        reg!(f::log_lost, self.log_lost);
        reg!(f::panics, self.panics);
        reg!(f::observer_kernel, self.observer_kernel);
        reg!(f::observer_mode, self.observer_mode);
        reg!(f::events_lost, self.events_lost);
        reg!(f::tls_handshakes, self.tls_handshakes);
        reg!(f::tls_handshake_errors, self.tls_handshake_errors);
        reg!(f::tls_handshake_duration, self.tls_handshake_duration);
        reg!(f::tls_certificate_expiry, self.tls_certificate_expiry);
        reg!(f::kernel_anomalies, self.kernel_anomalies);
        reg!(f::upstream_connections, self.upstream_connections);
        reg!(f::upstream_max_connections, self.upstream_max_connections);
        reg!(f::upstream_pending, self.upstream_pending);
        reg!(f::upgrades_active, self.upgrades_active);
        reg!(f::upgrades, self.upgrades);
        reg!(f::upgrade_bytes, self.upgrade_bytes);
        reg!(
            f::kernel_anomaly_logs_suppressed,
            self.kernel_anomaly_logs_suppressed
        );
        process::register(registry);
        reg!(f::client_connections, self.client_connections);
        reg!(f::client_parked, self.client_parked);
        reg!(f::client_rejected, self.client_rejected);
        reg!(f::client_proxy_protocol, self.client_proxy_protocol);
        reg!(f::client_reset_floods, self.client_reset_floods);
        reg!(f::accept_errors, self.accept_errors);
        reg!(f::rate_limit_untracked, self.rate_limit_untracked);
        reg!(f::worker_connections, self.worker_connections);
        reg!(f::read_ahead_bytes, self.read_ahead_bytes);
        reg!(f::read_ahead_over_budget, self.read_ahead_over_budget);
        reg!(f::retry_copy_bytes, self.retry_copy_bytes);
        reg!(f::retry_copy_over_budget, self.retry_copy_over_budget);
    }
}

#[cfg(test)]
mod tests;
