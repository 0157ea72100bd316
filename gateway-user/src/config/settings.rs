//! The validated settings the proxy runs on: every default filled in, every duration a
//! `Duration`, every endpoint parsed. Built only by `validate`, so holding a `Settings` means
//! the config was accepted.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use http::{HeaderName, HeaderValue, Method};

pub use super::model::{
    AccessLogFormat, ConnectionBalance, ExposeErrors, LbPolicy, RateLimitBy, UpstreamProtocol,
};

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Plain HTTP client listeners (at least one of these or `https`).
    pub listen: Vec<SocketAddr>,
    /// The HTTPS listeners and their TLS; `None` when HTTPS is off.
    pub https: Option<Https>,
    /// `[router] gateway_host`: `None` serves any host.
    pub gateway_host: Option<HostMatch>,
    pub shutdown_grace: Duration,
    /// Between `/healthz` turning 503 and the listeners closing (see `drain_delay_ms`).
    pub drain_delay: Duration,
    /// `None`: one per CPU.
    pub workers: Option<usize>,
    pub connection_balance: ConnectionBalance,
    pub downstream: Downstream,
    /// In the order written; matching picks the most specific, see `proxy::router`.
    pub routes: Vec<Route>,
    pub clusters: BTreeMap<String, ClusterSpec>,
    /// `None` when `[admin] enabled = false`.
    pub admin: Option<SocketAddr>,
    pub access_log: AccessLog,
    pub observer: Observer,
    /// `[router] expose_upstream_errors`; `None`: by listener (full on loopback, else reason).
    pub expose_errors: Option<ExposeErrors>,
    /// `None` when request IDs are off.
    pub request_id: Option<RequestId>,
    /// `[router.forwarded] trusted_proxies`: `None` when not set (every peer's
    /// `X-Forwarded-For` is appended to), else the peers whose forwarding headers are kept.
    pub trusted_proxies: Option<std::sync::Arc<[ipnet::IpNet]>>,
    /// `[router.proxy_protocol]`; `None` when off.
    pub proxy_protocol: Option<ProxyProtocol>,
    pub log: Log,
}

/// `[router.proxy_protocol]`: who opens connections with a PROXY protocol header.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyProtocol {
    /// The peers that send it; `None`: every peer.
    pub from: Option<std::sync::Arc<[ipnet::IpNet]>>,
    /// A listed peer's connection without a header is closed.
    pub required: bool,
    /// From the connection to its whole header.
    pub timeout: Duration,
}

impl ProxyProtocol {
    /// A connection from `peer` opens with a header (or may, when it is not `required`).
    pub fn expected_from(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.from
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&peer)))
    }
}

/// `[router.request_id]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId {
    pub header: HeaderName,
    pub keep_incoming: bool,
}

/// `[log]`: the gateway's own log (`crate::logging`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    pub format: crate::logging::LogFormat,
    /// Valid `tracing` directives; `None`: not configured (the default applies).
    pub level: Option<String>,
}

/// The HTTPS listeners (`https_port`, `https_listen`) and their TLS (`[router.tls]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Https {
    pub listen: Vec<SocketAddr>,
    pub tls: std::sync::Arc<crate::tls::ServerTls>,
    /// `[router.tls] forward_client_cert`.
    pub forward_client_cert: bool,
}

impl Settings {
    /// `[router.tls] forward_client_cert` is on.
    pub fn forwards_client_cert(&self) -> bool {
        self.https.as_ref().is_some_and(|h| h.forward_client_cert)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Observer {
    pub mode: super::model::ObserverMode,
    pub cgroup: ObserverCgroup,
    /// `[observer] max_connections`.
    pub max_connections: u32,
}

/// Where the observer attaches (`[observer] cgroup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObserverCgroup {
    /// A child of the process's own cgroup, named by this pattern (`{pid}` not yet replaced).
    Child(String),
    /// The process's own cgroup itself (`"."`).
    Own,
    /// An absolute cgroup v2 directory.
    Path(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Downstream {
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
    /// An HTTP/2 client connection with no stream open this long is closed (GOAWAY).
    pub http2_idle_timeout: Duration,
    pub max_request_header_bytes: usize,
    pub max_request_body_bytes: Option<u64>,
    /// HTTPS listener: connection to the end of the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Over all listeners and workers; `None`: unlimited.
    pub max_client_connections: Option<usize>,
    /// Per listener address; `None`: unlimited.
    pub max_accepts_per_second: Option<u32>,
    /// Request body bytes read ahead, over all requests.
    pub request_buffering_memory_bytes: u64,
    /// The HTTP/2 rapid-reset rule (`proxy::resets`).
    pub http2_premature_resets: PrematureResets,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` on client connections.
    pub http2_max_concurrent_streams: u32,
}

/// When an HTTP/2 client connection's resets close it: once at least half of its first
/// `streams` streams, or half of all its streams after that, were reset by the client less than
/// `lifetime` after they started. `streams` 0: never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrematureResets {
    pub streams: u64,
    pub lifetime: Duration,
}

impl Default for PrematureResets {
    /// Envoy's (`overload.premature_reset_total_stream_count`,
    /// `overload.premature_reset_min_stream_lifetime_seconds`).
    fn default() -> Self {
        PrematureResets {
            streams: super::model::DEFAULT_HTTP2_PREMATURE_RESET_STREAMS,
            lifetime: Duration::from_millis(
                super::model::DEFAULT_HTTP2_PREMATURE_RESET_LIFETIME_MS,
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub name: String,
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    pub cluster: String,
    /// `None`: any method.
    pub methods: Option<Vec<Method>>,
    pub headers: Vec<HeaderMatch>,
    pub rewrite_prefix: Option<String>,
    /// The cluster's timeouts and retries with this route's overrides applied.
    pub policy: RoutePolicy,
    /// The `Upgrade` protocols tunnelled on this route: its own `upgrades`, else its
    /// cluster's.
    pub upgrades: Vec<String>,
    /// `Some(port)`: a request that came over plain HTTP is redirected to HTTPS on `port`
    /// (this route's `https_redirect`, else the router's).
    pub https_redirect: Option<u16>,
    /// `Some`: only clients in these blocks reach the route.
    pub allow_clients: Option<std::sync::Arc<[ipnet::IpNet]>>,
    pub rate_limit: Option<RateLimit>,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
}

/// A route's `rate_limit`, checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    pub by: RateLimitBy,
    pub max_clients: usize,
}

/// A route's header condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub is: HeaderIs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderIs {
    Exactly(HeaderValue),
    Present,
    Absent,
}

/// Header rewriting: remove, then set, then add.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderRules {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// What a request on a route runs with: its cluster's settings, overridden by the route's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutePolicy {
    pub request_timeout: Duration,
    pub response_timeout: Duration,
    pub upgrade_idle_timeout: Duration,
    pub upgrade_max_duration: Duration,
    pub retry: RetryPolicy,
    /// Read the start of a request body before taking an upstream connection (the route's
    /// `request_buffering`, default on; see `proxy::request::read_ahead`).
    pub request_buffering: bool,
    /// The route's own `max_request_body_bytes`; `None`: `[router.downstream]`'s applies.
    pub max_request_body_bytes: Option<u64>,
}

impl RoutePolicy {
    /// A cluster's own policy, for a route that overrides nothing.
    pub fn of(spec: &ClusterSpec) -> RoutePolicy {
        RoutePolicy {
            request_timeout: spec.timeouts.request,
            response_timeout: spec.timeouts.response,
            upgrade_idle_timeout: spec.timeouts.upgrade_idle,
            upgrade_max_duration: spec.timeouts.upgrade_max_duration,
            retry: spec.retry,
            request_buffering: spec.request_buffering,
            max_request_body_bytes: None,
        }
    }
}

/// A route's host condition, lowercase, without port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`; it matches `a.example.com`, not
    /// `example.com`.
    Suffix(String),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSpec {
    pub name: String,
    pub endpoints: Vec<EndpointSpec>,
    pub lb_policy: LbPolicy,
    /// What `consistent_hash` hashes a request on.
    pub hash_on: HashOn,
    /// `consistent_hash`'s bound on an endpoint's load, in percent of the average; `None`:
    /// unbounded.
    pub hash_balance_factor: Option<u32>,
    pub dns_refresh: Duration,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    pub limits: Limits,
    pub health: HealthPolicy,
    /// The latency-aware policy's knobs (`decide::latency`).
    pub latency: crate::decide::latency::LatencyPolicy,
    /// TLS to the endpoints; `None`: plain HTTP.
    pub tls: Option<std::sync::Arc<crate::tls::ClientTls>>,
    /// What the gateway speaks to the endpoints (`auto` without TLS is validated to `http1`).
    pub protocol: UpstreamProtocol,
    /// Its routes' default `request_buffering`.
    pub request_buffering: bool,
    /// The `Upgrade` protocols tunnelled to the endpoints, lowercase (`upgrades`).
    pub upgrades: Vec<String>,
}

/// `hash_on`: the key of a request that `lb_policy = "consistent_hash"` hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HashOn {
    /// The client's address (or the client a trusted proxy names).
    #[default]
    Client,
    Header(http::HeaderName),
    Cookie(String),
}

impl fmt::Display for HashOn {
    /// As written in the config: `client`, `header:NAME`, `cookie:NAME`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::Client => f.write_str("client"),
            HashOn::Header(name) => write!(f, "header:{name}"),
            HashOn::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

impl HashOn {
    /// `"client"`, `"header:NAME"` or `"cookie:NAME"`; `None` for anything else.
    pub fn parse(text: &str) -> Option<HashOn> {
        match text.split_once(':') {
            None if text == "client" => Some(HashOn::Client),
            // Not a field that describes the connection: it never reaches the gateway's
            // routing as the client sent it.
            Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
                .ok()
                .filter(|n| {
                    !matches!(
                        n.as_str(),
                        "connection"
                            | "keep-alive"
                            | "proxy-connection"
                            | "te"
                            | "trailer"
                            | "transfer-encoding"
                            | "upgrade"
                    )
                })
                .map(HashOn::Header),
            Some(("cookie", name))
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)) =>
            {
                Some(HashOn::Cookie(name.to_owned()))
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSpec {
    pub address: EndpointAddr,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddr {
    Ip(SocketAddr),
    /// Resolved at start-up and every `dns_refresh`; each address becomes an endpoint.
    Host {
        host: String,
        port: u16,
    },
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddr::Ip(a) => write!(f, "{a}"),
            EndpointAddr::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Every upstream timeout, named; see `model::TimeoutsConfig` for what each covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// The hard cap of every connect, and the deadline until SYN-RTTs are known.
    pub connect: Duration,
    /// `None`: adaptive deadlines off.
    pub connect_deadline_floor: Option<Duration>,
    pub response: Duration,
    pub write: Duration,
    pub request: Duration,
    pub idle: Duration,
    /// TLS upstreams: the TLS handshake, after the TCP connect.
    pub tls_handshake: Duration,
    /// Upgraded connections: no byte either way for this long closes them.
    pub upgrade_idle: Duration,
    /// Upgraded connections: closed this long after the `101`.
    pub upgrade_max_duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub hedge: bool,
    pub hedge_budget_percent: u32,
    pub max_retries: u32,
    pub on_response_timeout: bool,
    pub on_reset: bool,
    pub budget_percent: u32,
    pub min_retry_concurrency: u32,
    /// gRPC statuses retried when a response carries one and nothing else.
    pub grpc_status_codes: crate::decide::grpc::GrpcCodes,
    /// HTTP statuses of an idempotent request's response that are retried elsewhere.
    pub status_codes: crate::decide::retry::StatusCodes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_idle_per_endpoint: usize,
    /// HTTP/2 upstreams: requests in flight per connection.
    pub max_concurrent_streams: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// The state machine's knobs (`decide::health`).
    pub machine: crate::decide::health::HealthPolicy,
    /// `GET` this path on probes, expecting `probe_expect_status`.
    pub probe_path: Option<String>,
    pub probe_expect_status: u16,
    /// `slow_start_ms`: zero when off.
    pub slow_start: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AccessLog {
    pub format: AccessLogFormat,
    pub output: LogOutput,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOutput {
    Stdout,
    Stderr,
    Off,
    File(PathBuf),
}
