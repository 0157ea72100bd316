//! `[router.upstream]` and `[clusters.NAME]` as written: endpoints, protocol, balancing,
//! timeouts, retries, limits, health and latency, each default next to its setting.

use std::fmt;

use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, IgnoredAny, MapAccess, Visitor},
};

use super::UpstreamTlsConfig;
#[cfg(doc)]
use crate::decide::{health, latency};

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
    /// `lb_policy = "consistent_hash"`: what a request is hashed on, so that requests with the
    /// same key go to the same endpoint while it is routable: `"client"` (the default: the
    /// client's address, or the client a trusted proxy names), `"header:NAME"` or
    /// `"cookie:NAME"`. A request without that header or cookie is balanced round robin.
    pub hash_on: Option<String>,
    /// `lb_policy = "consistent_hash"`: bounded loads (HAProxy's and Envoy's
    /// `hash_balance_factor`), in percent of the average: a key's endpoint takes a request only
    /// while it has fewer in flight than this share of the cluster's average (by weight), else
    /// the key's next endpoint does, so that a hot key cannot swamp one endpoint. From 100 to
    /// 1000 (125: at most a quarter above the average). Default: unbounded.
    pub hash_balance_factor: Option<u32>,
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
    /// `true` (default): the first 64 KiB of a request body (all of a smaller one) is read
    /// before an upstream connection is taken; `false`: bodies stream as they arrive. The
    /// default of the cluster's routes, which may set their own.
    pub request_buffering: Option<bool>,
    /// The HTTP/1.1 `Upgrade` protocols a client may switch to with the endpoints, compared
    /// without case with the whole `Upgrade` value (a version included, as clients send it:
    /// `"spdy/3.1"` for `kubectl exec`). Default [`DEFAULT_UPGRADES`]; `[]` tunnels none. Any
    /// other upgrade is dropped and its request answered as a plain one. `"h2c"` is refused.
    pub upgrades: Option<Vec<String>>,
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

/// `upgrades` unless set: WebSocket (RFC 6455 clients send exactly `websocket`).
pub const DEFAULT_UPGRADES: &[&str] = &["websocket"];

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
    /// Weighted rendezvous hashing of a key of the request (`hash_on`): the same key goes to
    /// the same endpoint, and an endpoint's going or coming moves only its own keys.
    ConsistentHash,
}

impl LbPolicy {
    pub fn name(self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::LeastRequest => "least_request",
            LbPolicy::PeakEwma => "peak_ewma",
            LbPolicy::ConsistentHash => "consistent_hash",
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
    /// Overall: from the request's arrival to the response head, across all attempts. While
    /// the client sends its body, it runs from the body's last byte so far: an upload that
    /// keeps coming is not cut, and one that stops for this long is `408
    /// client_body_timeout`. Default [`DEFAULT_REQUEST_TIMEOUT_MS`].
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
    /// Idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) whose upstream answered
    /// with one of these statuses, e.g. `[502, 503, 504]`, are sent to another endpoint, and
    /// the client gets the last answer when no retry is left. 400 to 599. Default: none.
    pub status_codes: Option<Vec<u16>>,
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
    /// Responses in a row with status 502, 503 or 504 (the upstream answers, but cannot serve:
    /// shutting down, overloaded, its own backend gone) before the endpoint is ejected as
    /// `error_status`; 0 disables. Default [`health::DEFAULT_ERROR_STATUSES_TO_EJECT`].
    pub error_statuses_to_eject: Option<u32>,
    /// When set, probes also send `GET probe_path` and expect `probe_expect_status`.
    pub probe_path: Option<String>,
    /// Default [`DEFAULT_PROBE_EXPECT_STATUS`].
    pub probe_expect_status: Option<u16>,
    /// Slow start: an endpoint back from an ejection, or a new address from a DNS refresh,
    /// takes a share of its weight that grows
    /// to the whole over this window, from 10 % (`decide::slow_start`), under every policy but
    /// `consistent_hash` with a key, which keeps its keys where they belong. 0 (default): the
    /// whole share at once. Up to an hour.
    pub slow_start_ms: Option<u64>,
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
