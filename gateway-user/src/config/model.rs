//! The config file's serde tree, exactly as written by the operator.
//!
//! Every table denies unknown keys. Optional settings stay `Option` here so that a cluster can
//! inherit from `[router.upstream]` and both can fall back to the defaults. Each default is
//! defined once, as a `const`: next to the setting here, or, for the knobs of a pure policy
//! (health, connect deadlines), next to the policy in `crate::decide`. `config::validate` turns
//! this tree into the typed settings the proxy runs on.

use std::{collections::BTreeMap, fmt, net::SocketAddr};

use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, IgnoredAny, MapAccess, Visitor},
};

#[cfg(doc)]
use crate::decide::{health, latency};

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, client-side limits, and the defaults every upstream cluster inherits.
    pub router: RouterConfig,
    /// Routes by host and path prefix, to clusters. With none, every request goes to the
    /// cluster `default` defined by `[router.upstream] endpoints`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Named upstream clusters.
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub access_log: AccessLogConfig,
    #[serde(default)]
    pub observer: ObserverConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[log]`: the gateway's own log on stderr (not the access log). See `crate::logging`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` (default) or `"json"` (one object per line). A change needs a restart.
    pub format: Option<crate::logging::LogFormat>,
    /// `tracing` directives: a level (`"info"`, default [`DEFAULT_LOG_LEVEL`]) or e.g.
    /// `"info,gateway::proxy=debug"`. `RUST_LOG`, when set, wins; `PUT /logging` on the admin
    /// listener changes it until the next reload.
    pub level: Option<String>,
}

pub const DEFAULT_LOG_LEVEL: &str = "info";

/// `[observer]`: the kernel (eBPF) signals that drive health, deadlines and hedging.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObserverConfig {
    /// `auto` (default): attach the eBPF observer, and if that fails run on userspace timing
    /// and say why; `kernel`: refuse to start without it; `off`: userspace timing only.
    pub mode: Option<ObserverMode>,
    /// The cgroup v2 the gateway moves itself into before opening any upstream socket, and
    /// where the observer attaches. A name (default [`DEFAULT_OBSERVER_CGROUP`]) is a child of
    /// the process's **own** cgroup (the systemd unit's with `Delegate=yes`, the container's):
    /// never a new cgroup at the root. `{pid}` is replaced by the process id. Created at
    /// start, removed on exit; one left by a killed gateway is removed at the next start.
    /// `"."`: attach to the own cgroup itself, without a child (for containers whose cgroup
    /// filesystem is read-only; only right when nothing but the gateway runs in that cgroup).
    /// An absolute path names a cgroup v2 directory explicitly.
    pub cgroup: Option<String>,
}

pub const DEFAULT_OBSERVER_CGROUP: &str = "gateway-{pid}";

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ObserverMode {
    #[default]
    Auto,
    Kernel,
    Off,
}

/// `[router]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Which `Host` the gateway serves: `"*"` (default) any; a name (`"api.example.com"`) or a
    /// wildcard (`"*.example.com"`, any one or more labels before `.example.com`) only requests
    /// for it; every other request gets 404 `no_route`, on every listener, before routes are
    /// looked at. Matched like a route's `host`: without the port, whatever the case.
    pub gateway_host: Option<String>,
    /// Shorthand for `listen = ["0.0.0.0:PORT"]`: plain HTTP.
    pub listener_port: Option<u16>,
    /// Addresses to accept plain HTTP client connections on, e.g.
    /// `["127.0.0.1:8080", "[::1]:8080"]`.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Adds the HTTPS listener (on `https_port` and `https_listen`), with the certificate of
    /// `[router.tls]`. Default: on when `https_port` or `https_listen` is set.
    pub https_enabled: Option<bool>,
    /// Shorthand for `https_listen = ["0.0.0.0:PORT"]`.
    pub https_port: Option<u16>,
    /// Addresses to accept HTTPS client connections on.
    #[serde(default)]
    pub https_listen: Vec<SocketAddr>,
    /// The HTTPS listener's certificates and TLS settings; required when HTTPS is on.
    pub tls: Option<ServerTlsConfig>,
    /// On SIGTERM or SIGINT, how long in-flight requests may run, once listening has stopped,
    /// before the gateway exits anyway. Default [`DEFAULT_SHUTDOWN_GRACE_MS`].
    pub shutdown_grace_ms: Option<u64>,
    /// On SIGTERM or SIGINT, how long the gateway keeps accepting and serving new connections
    /// after `/healthz` and `/readyz` turn 503, so that load balancers deregister it before
    /// it stops listening. Meanwhile HTTP/1 responses carry `Connection: close` and HTTP/2
    /// connections get GOAWAY, so clients move to other hosts. 0: stop listening at once.
    /// A second SIGTERM or SIGINT cuts the delay short. Default [`DEFAULT_DRAIN_DELAY_MS`].
    pub drain_delay_ms: Option<u64>,
    /// Worker threads, each with its own event loop and listening sockets (like nginx's
    /// `worker_processes`). Default: one per CPU.
    pub workers: Option<usize>,
    #[serde(default)]
    pub downstream: DownstreamConfig,
    #[serde(default)]
    pub upstream: ClusterConfig,
    /// What the gateway's own error responses say about the upstream: `"full"` (the reason,
    /// the endpoint, the attempts and the kernel's evidence, in headers and body), `"reason"`
    /// (the reason code only: no internal address) or `"none"` (a bare status). Default:
    /// `"full"` on loopback listeners, `"reason"` on every other. The access log and
    /// `/status` keep the full evidence in every mode.
    pub expose_upstream_errors: Option<ExposeErrors>,
    /// Request IDs: kept from the client or generated, passed upstream, returned and logged.
    #[serde(default)]
    pub request_id: RequestIdConfig,
}

/// `expose_upstream_errors`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExposeErrors {
    Full,
    Reason,
    None,
}

/// `[router.request_id]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestIdConfig {
    /// `false`: no request ID is added, passed or returned (a client's header still passes
    /// through as any other header). Default `true`.
    pub enabled: Option<bool>,
    /// The header that carries it. Default [`DEFAULT_REQUEST_ID_HEADER`].
    pub header: Option<String>,
    /// Keep a client's own ID (1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters; anything
    /// else is replaced). `false`: always generate one, e.g. on an edge that does not trust
    /// its clients. Default `true`.
    pub keep_incoming: Option<bool>,
}

pub const DEFAULT_REQUEST_ID_HEADER: &str = "x-request-id";
/// Longer incoming IDs are replaced by a generated one.
pub const MAX_REQUEST_ID_LEN: usize = 200;

pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 30_000;

/// `[router.tls]`: the HTTPS listener's TLS. Paths are relative to the config file's
/// directory.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The default certificate chain (PEM, leaf first): for clients whose SNI matches no
    /// `[[router.tls.certificates]]` entry, or who send none.
    pub cert_file: Option<String>,
    /// The default certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<String>,
    /// More certificates, each for the SNI names it lists.
    #[serde(default)]
    pub certificates: Vec<SniCertificateConfig>,
    /// Lowest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    pub min_version: Option<crate::tls::MinVersion>,
    /// ALPN protocols offered, in preference order. Default [`DEFAULT_SERVER_ALPN`].
    pub alpn: Option<Vec<String>>,
    /// Require client certificates signed by these CAs (PEM) (mutual TLS).
    pub client_ca_file: Option<String>,
}

pub const DEFAULT_SERVER_ALPN: [&str; 2] = ["h2", "http/1.1"];

/// `[[router.tls.certificates]]`: a certificate for the SNI names it lists.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniCertificateConfig {
    /// `"api.example.com"`, or `"*.example.com"` for any one label before `.example.com`.
    pub server_names: Vec<String>,
    pub cert_file: String,
    pub key_file: String,
}

/// `[router.upstream.tls]` (the default of every cluster) or `[clusters.NAME.tls]`: TLS to
/// the upstream. Each key is looked up in the cluster's table, then in `[router.upstream.tls]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// `false` turns off TLS for a cluster that would inherit it. Default `true`.
    pub enabled: Option<bool>,
    /// CA certificates (PEM) the upstream's certificate must chain to. Default: the system's.
    pub ca_file: Option<String>,
    /// The name sent as SNI and verified against the certificate. Default: the endpoint's host
    /// name (`host:port` endpoints), else its IP address.
    pub server_name: Option<String>,
    /// A client certificate (PEM chain) to present, with `key_file`.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// Accept any certificate for any name (signatures are still checked). Only for tests and
    /// broken internal PKI: validation warns, and the gateway logs it at every start.
    pub insecure_skip_verify: Option<bool>,
    /// ALPN protocols offered, `"h2"` and `"http/1.1"`. Default: from the cluster's
    /// `protocol` (`http1`: `["http/1.1"]`, `h2`: `["h2"]`, `auto`: `["h2", "http/1.1"]`).
    pub alpn: Option<Vec<String>>,
    /// Lowest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    pub min_version: Option<crate::tls::MinVersion>,
}

/// Longer than a typical load balancer's health-check interval × unhealthy threshold
/// (e.g. 2 × 2 s), so that it has stopped sending before the listener closes.
pub const DEFAULT_DRAIN_DELAY_MS: u64 = 5_000;

/// `[router.downstream]`: what the gateway accepts from clients.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DownstreamConfig {
    /// How long a client may take to send a complete request head, counted from when the
    /// connection starts waiting for one (a new connection, or the end of the previous response
    /// on a keep-alive connection). Cuts off slow-loris clients, and is also how long an idle
    /// HTTP/1 keep-alive connection is kept. Default [`DEFAULT_HEADER_READ_TIMEOUT_MS`].
    pub header_read_timeout_ms: Option<u64>,
    /// How long a write to a client may make no progress before the connection is closed
    /// (a client that stopped reading). Default [`DEFAULT_DOWNSTREAM_WRITE_TIMEOUT_MS`].
    pub write_timeout_ms: Option<u64>,
    /// Largest request head (request line and headers) answered normally; larger gets 431.
    /// Default [`DEFAULT_MAX_REQUEST_HEADER_BYTES`].
    pub max_request_header_bytes: Option<usize>,
    /// Largest request body forwarded; larger gets 413. Unlimited by default.
    pub max_request_body_bytes: Option<u64>,
    /// HTTPS listener: how long a client may take from its connection to the end of the TLS
    /// handshake. Default [`DEFAULT_DOWNSTREAM_TLS_HANDSHAKE_TIMEOUT_MS`].
    pub tls_handshake_timeout_ms: Option<u64>,
    /// Client connections open at once, over all listeners and workers together (one budget,
    /// sized like the process's file descriptors: each client connection may hold an upstream
    /// one too). A connection beyond it is answered at once, never left waiting: `503` with
    /// `x-gateway-error: overloaded` and `Connection: close` on a plain HTTP listener, a close
    /// on an HTTPS one; either way counted in `gateway_client_connections_rejected_total`.
    /// Unlimited by default; then the file descriptor limit (`ulimit -n`) is the limit.
    pub max_client_connections: Option<usize>,
    /// New connections each listener address accepts per second (all workers together),
    /// with bursts of up to one second's worth. Beyond it, answered like
    /// `max_client_connections`. Unlimited by default.
    pub max_accepts_per_second: Option<u32>,
}

pub const DEFAULT_DOWNSTREAM_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_DOWNSTREAM_WRITE_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;

/// `[router.upstream]` (the defaults every cluster inherits and, with `endpoints`, the cluster
/// `default`) and `[clusters.NAME]` (where `endpoints` is required). One type for both so that
/// a key means the same thing in either place.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `"ip:port"`, `"host:port"`, or `{ address = "host:port", weight = 2 }`.
    pub endpoints: Option<Vec<EndpointConfig>>,
    /// Default [`DEFAULT_LB_POLICY`].
    pub lb_policy: Option<LbPolicy>,
    /// How often `host:port` endpoints are resolved again. Default [`DEFAULT_DNS_REFRESH_MS`].
    pub dns_refresh_ms: Option<u64>,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub latency: LatencyConfig,
    /// TLS to the upstream; absent: plain HTTP.
    pub tls: Option<UpstreamTlsConfig>,
    /// What the gateway speaks to the endpoints: `"http1"` (HTTP/1.1, the default),
    /// `"h2c"` (HTTP/2 over plain TCP, with prior knowledge), `"h2"` (HTTP/2 over TLS, chosen
    /// by ALPN) or `"auto"` (over TLS, HTTP/2 when the upstream picks it by ALPN, else
    /// HTTP/1.1; without TLS, HTTP/1.1). Default [`DEFAULT_PROTOCOL`].
    pub protocol: Option<UpstreamProtocol>,
}

/// `protocol`: what the gateway speaks to a cluster's endpoints.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    H2c,
    H2,
    Auto,
}

impl UpstreamProtocol {
    pub fn name(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::Auto => "auto",
        }
    }
}

pub const DEFAULT_PROTOCOL: UpstreamProtocol = UpstreamProtocol::Http1;

pub const DEFAULT_LB_POLICY: LbPolicy = LbPolicy::RoundRobin;
pub const DEFAULT_DNS_REFRESH_MS: u64 = 30_000;

/// How a cluster spreads requests over its endpoints. Also `lb_policy` in `/status`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Weighted round robin (smooth: weights interleave rather than burst).
    RoundRobin,
    /// Power of two choices: the less loaded (in-flight requests / weight) of two random picks.
    LeastRequest,
    /// Power of two choices over a peak-EWMA of response time × (in flight + 1), fed by
    /// response latencies and kernel evidence; slow outliers get only a trickle (see
    /// `decide::latency` and the `latency` table).
    PeakEwma,
}

impl LbPolicy {
    pub fn name(self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::LeastRequest => "least_request",
            LbPolicy::PeakEwma => "peak_ewma",
        }
    }
}

/// `[router.upstream.timeouts]` or `[clusters.NAME.timeouts]`. All in milliseconds.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP connect, per attempt: from `connect()` to the SYN-ACK. Default
    /// [`DEFAULT_CONNECT_TIMEOUT_MS`].
    pub connect_timeout_ms: Option<u64>,
    /// Per attempt: from the end of the request (body included) to the upstream's response
    /// head, and then the longest gap allowed between two reads of the response body.
    /// Default [`DEFAULT_RESPONSE_TIMEOUT_MS`].
    pub response_timeout_ms: Option<u64>,
    /// How long a write to the upstream may make no progress. Default
    /// [`DEFAULT_UPSTREAM_WRITE_TIMEOUT_MS`].
    pub write_timeout_ms: Option<u64>,
    /// Overall: from the request's arrival to the response head, across all attempts.
    /// Default [`DEFAULT_REQUEST_TIMEOUT_MS`].
    pub request_timeout_ms: Option<u64>,
    /// How long a pooled keep-alive upstream connection may stay idle. Default
    /// [`DEFAULT_IDLE_TIMEOUT_MS`].
    pub idle_timeout_ms: Option<u64>,
    /// Adapt each endpoint's connect deadline to its kernel-measured SYN-RTT:
    /// `clamp(p99 × 3 + 10 ms, connect_deadline_floor_ms, connect_timeout_ms)` over the last
    /// 60 s, once 8 clean handshakes are known (see `decide::deadline`). Default
    /// [`DEFAULT_ADAPTIVE_CONNECT_DEADLINE`].
    pub adaptive_connect_deadline: Option<bool>,
    /// The shortest adaptive connect deadline. Default
    /// [`crate::decide::deadline::DEFAULT_FLOOR`] (50 ms).
    pub connect_deadline_floor_ms: Option<u64>,
    /// TLS upstreams: from the TCP connection to the end of the TLS handshake, per
    /// connection. Default [`DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS`].
    pub tls_handshake_timeout_ms: Option<u64>,
    /// An upgraded connection (WebSocket, any HTTP/1.1 `Upgrade`) with no byte in either
    /// direction for this long is closed. Default [`DEFAULT_UPGRADE_IDLE_TIMEOUT_MS`].
    pub upgrade_idle_timeout_ms: Option<u64>,
    /// An upgraded connection is closed this long after its `101`, busy or not. Default
    /// [`DEFAULT_UPGRADE_MAX_DURATION_MS`].
    pub upgrade_max_duration_ms: Option<u64>,
}

/// nginx's `proxy_read_timeout` (60 s) cuts quiet WebSockets off; five minutes outlasts the
/// usual 30–60 s application pings.
pub const DEFAULT_UPGRADE_IDLE_TIMEOUT_MS: u64 = 300_000;
/// A day: long-lived, but no connection outlives every deploy.
pub const DEFAULT_UPGRADE_MAX_DURATION_MS: u64 = 86_400_000;

pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

pub const DEFAULT_ADAPTIVE_CONNECT_DEADLINE: bool = true;

/// Envoy's default; nginx uses 60 s and HAProxy none, which is why blackholed hosts hang them.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 15_000;
pub const DEFAULT_UPSTREAM_WRITE_TIMEOUT_MS: u64 = 15_000;
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Below the 60 s keep-alive timeout of most upstream servers, so that the gateway, not the
/// upstream, closes idle connections and never sends a request on a connection being closed.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 50_000;

/// `retry` table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt. A connect failure (refused, unreachable, timeout) is
    /// always retried on a different endpoint, while the budget allows. Default
    /// [`DEFAULT_MAX_RETRIES`].
    pub max_retries: Option<u32>,
    /// Also retry GET, HEAD, OPTIONS, PUT and DELETE requests without a body after a response
    /// timeout or a reset. Default [`DEFAULT_RETRY_ON_RESPONSE_TIMEOUT`] (`false`): a timed-out
    /// request may have had an effect.
    pub on_response_timeout: Option<bool>,
    /// Retries in flight may be at most this share of the cluster's requests in flight.
    /// Default [`DEFAULT_RETRY_BUDGET_PERCENT`].
    pub budget_percent: Option<u32>,
    /// Retries always allowed in flight, whatever the budget says. Default
    /// [`DEFAULT_MIN_RETRY_CONCURRENCY`].
    pub min_retry_concurrency: Option<u32>,
    /// Race a second connect to another healthy endpoint when the first has no SYN-ACK by its
    /// connect deadline; the first to establish wins. Default [`DEFAULT_HEDGE`].
    pub hedge: Option<bool>,
    /// Hedged connects allowed, as a share of requests in flight (at least one). Default
    /// [`DEFAULT_HEDGE_BUDGET_PERCENT`].
    pub hedge_budget_percent: Option<u32>,
    /// Retry idempotent requests whose connection was reset after the request reached the
    /// upstream. Default: the value of `on_response_timeout`.
    pub on_reset: Option<bool>,
    /// gRPC requests answered with one of these statuses before any response message (a
    /// trailers-only response) are retried, e.g. `["UNAVAILABLE", "RESOURCE_EXHAUSTED"]`
    /// (the names of gRPC's status codes). Default: none.
    pub grpc_status_codes: Option<Vec<String>>,
}

pub const DEFAULT_RETRY_ON_RESPONSE_TIMEOUT: bool = false;
pub const DEFAULT_HEDGE: bool = true;
pub const DEFAULT_HEDGE_BUDGET_PERCENT: u32 = 10;

pub const DEFAULT_MAX_RETRIES: u32 = 2;
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
pub const DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 3;

/// `limits` table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open upstream connections for the whole cluster. Default
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: Option<usize>,
    /// Requests waiting for a connection when `max_connections` are busy; beyond it the
    /// gateway answers 503 `overloaded` at once. Default [`DEFAULT_MAX_PENDING_REQUESTS`].
    pub max_pending_requests: Option<usize>,
    /// Idle keep-alive connections kept per endpoint. Default [`DEFAULT_MAX_IDLE_PER_ENDPOINT`].
    pub max_idle_per_endpoint: Option<usize>,
    /// HTTP/2 upstreams: requests in flight on one connection; beyond it a request takes
    /// another connection (within `max_connections`). The upstream's own
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`, when lower, is honoured too. Default
    /// [`DEFAULT_MAX_CONCURRENT_STREAMS`].
    pub max_concurrent_streams: Option<u32>,
}

/// gRPC servers commonly advertise 100 (grpc-go, Envoy's upstream default is higher).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;

pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_PENDING_REQUESTS: usize = 1024;
pub const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 128;

/// `health` table: how an endpoint's health follows the kernel's evidence and active probes
/// (the state machine of `crate::decide::health`, whose constants are the defaults).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Removed; any value is refused by validation with a message that names the keys that
    /// replaced it (see `config::validate`). Kept in the tree only so that the refusal can
    /// point at the line.
    pub consecutive_failures: Option<IgnoredAny>,
    /// How long the first ejection lasts; each further consecutive ejection doubles it, up to
    /// `max_ejection_ms`. Default [`health::DEFAULT_BASE_EJECTION`].
    pub ejection_ms: Option<u64>,
    /// Largest share of a cluster's endpoints ejected at once. Default
    /// [`health::DEFAULT_MAX_EJECTED_PERCENT`].
    pub max_ejected_percent: Option<u32>,
    /// The longest ejection (the back-off's cap). Default [`health::DEFAULT_MAX_EJECTION`].
    pub max_ejection_ms: Option<u64>,
    /// How often an ejected endpoint is probed once its ejection has run out. Default
    /// [`health::DEFAULT_PROBE_INTERVAL`].
    pub probe_interval_ms: Option<u64>,
    /// Probe successes in a row that bring an endpoint back. Default [`health::DEFAULT_RISE`].
    pub rise: Option<u32>,
    /// SYNs in a row unanswered by the connect deadline that eject (the first makes the
    /// endpoint suspect and probes it at once). Default
    /// [`health::DEFAULT_SYN_UNANSWERED_TO_EJECT`].
    pub syn_unanswered_to_eject: Option<u32>,
    /// Connects in a row that established only after SYN retransmits before the endpoint is
    /// deprioritised as overloaded. Default [`health::DEFAULT_SLOW_HANDSHAKES_TO_SUSPECT`].
    pub slow_handshakes_to_suspect: Option<u32>,
    /// Response timeouts in a row (request ACKed by the upstream's kernel) that eject the
    /// endpoint as a slow backend; 0 disables. Default
    /// [`health::DEFAULT_RESPONSE_TIMEOUTS_TO_EJECT`].
    pub response_timeouts_to_eject: Option<u32>,
    /// TLS handshakes in a row that failed or timed out on a healthy TCP connection (bad
    /// certificate, unknown CA, name mismatch, a TLS server that does not answer) before the
    /// endpoint is ejected as `tls_failure`; 0 disables. Default
    /// [`health::DEFAULT_TLS_FAILURES_TO_EJECT`].
    pub tls_failures_to_eject: Option<u32>,
    /// When set, probes also send `GET probe_path` and expect `probe_expect_status`.
    pub probe_path: Option<String>,
    /// Default [`DEFAULT_PROBE_EXPECT_STATUS`].
    pub probe_expect_status: Option<u16>,
}

pub const DEFAULT_PROBE_EXPECT_STATUS: u16 = 200;

/// `latency` table: the latency-aware policy of `lb_policy = "peak_ewma"` (the knobs of
/// `crate::decide::latency`, whose constants are the defaults). The estimate is kept and shown
/// under every policy; only `peak_ewma` acts on it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatencyConfig {
    /// Time constant of the peak-EWMA and of its decay towards zero. Default
    /// [`latency::DEFAULT_DECAY`].
    pub decay_ms: Option<u64>,
    /// An endpoint is slow above this multiple of the cluster's reference latency (the lower
    /// median)... Default [`latency::DEFAULT_SLOW_FACTOR`].
    pub slow_factor: Option<u32>,
    /// ... and above the reference plus this. Default [`latency::DEFAULT_SLOW_MARGIN`].
    pub slow_margin_ms: Option<u64>,
    /// A slow endpoint gets one request at a time, at most this often, so that its recovery
    /// is noticed. Default [`latency::DEFAULT_TRICKLE_INTERVAL`].
    pub slow_trickle_ms: Option<u64>,
}

/// One endpoint as written.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    pub address: String,
    /// Default [`DEFAULT_WEIGHT`].
    pub weight: Option<u32>,
}

pub const DEFAULT_WEIGHT: u32 = 1;
pub const MAX_WEIGHT: u32 = 1000;

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EndpointConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""ip:port", "host:port" or { address = "host:port", weight = N }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EndpointConfig, E> {
                Ok(EndpointConfig {
                    address: v.to_owned(),
                    weight: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EndpointConfig, A::Error> {
                const FIELDS: &[&str] = &["address", "weight"];
                let mut address = None;
                let mut weight = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "address" => address = Some(map.next_value::<String>()?),
                        "weight" => weight = Some(map.next_value::<u32>()?),
                        other => return Err(de::Error::unknown_field(other, FIELDS)),
                    }
                }
                let address = address.ok_or_else(|| de::Error::missing_field("address"))?;
                Ok(EndpointConfig { address, weight })
            }
        }
        d.deserialize_any(V)
    }
}

/// `[[routes]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in the access log. Default: `host` + `path_prefix`.
    pub name: Option<String>,
    /// `api.example.com`, or `*.example.com` for any subdomain. Absent: any host.
    pub host: Option<String>,
    /// Plain string prefix of the path. Default `/`.
    pub path_prefix: Option<String>,
    /// A key of `[clusters]`, or `default`.
    pub cluster: String,
    /// Only these methods, e.g. `["GET", "HEAD"]`. Absent: any.
    pub methods: Option<Vec<String>>,
    /// Every condition must hold: `{ name = "x-canary", value = "1" }` (exact value),
    /// `{ name = "x-debug", present = true }` (any value) or `present = false` (absent).
    #[serde(default)]
    pub headers: Vec<HeaderMatchConfig>,
    /// Replaces the matched `path_prefix` before the request goes upstream, e.g.
    /// `path_prefix = "/api/"`, `rewrite_prefix = "/"`: `/api/users` goes up as `/users`.
    pub rewrite_prefix: Option<String>,
    /// Overrides of the cluster's request and response timeouts for this route.
    #[serde(default)]
    pub timeouts: RouteTimeoutsConfig,
    /// Overrides of the cluster's retries and hedging for this route (same keys as a
    /// cluster's `retry` table).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Headers added, set or removed on the request before it goes upstream.
    #[serde(default)]
    pub request_headers: HeaderRulesConfig,
    /// Headers added, set or removed on the upstream's response (and the gateway's own).
    #[serde(default)]
    pub response_headers: HeaderRulesConfig,
}

/// One header condition of a route.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    /// The exact value.
    pub value: Option<String>,
    /// `true`: present with any value; `false`: absent.
    pub present: Option<bool>,
}

/// `[routes.timeouts]`: what a route may override (the connection-level timeouts stay the
/// cluster's).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeoutsConfig {
    pub request_timeout_ms: Option<u64>,
    pub response_timeout_ms: Option<u64>,
    pub upgrade_idle_timeout_ms: Option<u64>,
    pub upgrade_max_duration_ms: Option<u64>,
}

/// `[routes.request_headers]`, `[routes.response_headers]`: applied in the order remove,
/// set, add.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesConfig {
    /// Appended, beside any value already there: `add = { "x-env" = "prod" }`.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Replacing any value already there.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Removed: `remove = ["x-internal-token"]`.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `[admin]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serves `/healthz`. Default [`DEFAULT_ADMIN_LISTEN`], loopback only; a non-loopback
    /// address also needs `allow_remote = true`.
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback admin address.
    pub allow_remote: Option<bool>,
    /// Set to `false` to run no admin listener.
    pub enabled: Option<bool>,
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";

/// `[access_log]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Default `plain`.
    pub format: Option<AccessLogFormat>,
    /// `"stdout"` (default), `"stderr"`, `"off"`, or a file path (appended to).
    pub output: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    #[default]
    Plain,
    Json,
}
