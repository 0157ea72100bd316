//! The config file's serde tree, exactly as written by the operator.
//!
//! Every table denies unknown keys. Optional settings stay `Option` here so that a cluster can
//! inherit from `[router.upstream]` and both can fall back to the defaults. Each default is
//! defined once, as a `const`: next to the setting here, or, for the knobs of a pure policy
//! (health, connect deadlines), next to the policy in `crate::decide`. `config::validate` turns
//! this tree into the typed settings the proxy runs on.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

mod cluster;
mod route;

pub use cluster::*;
pub use route::*;

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
    /// Connects in flight (SYN sent, no outcome yet) the kernel's table of connect records has
    /// room for: its slots, rounded up to a power of two, 128 bytes each, preallocated at
    /// start. Beyond it a connect in flight loses its record, counted and logged as the kernel
    /// anomaly `slot_reused`. Also the capacity of the table of established connections'
    /// signals. Default 65,536 (8 MiB); 1 to 16,777,216.
    pub max_connections: Option<u32>,
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
    /// How client connections are spread over the workers. `"exact"` (default): a worker that
    /// accepts a connection while another worker has fewer open hands it to that one, so the
    /// workers stay within one connection of each other (HAProxy's and Envoy's `exact_balance`
    /// way). `"kernel"`: each keeps what `SO_REUSEPORT`'s hash of the 4-tuple gives it, which
    /// for a few long-lived connections (a load balancer's keep-alive pool) can leave one worker
    /// with most of them for their whole life. Applies to connections accepted after a reload.
    pub connection_balance: Option<ConnectionBalance>,
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
    /// Whose `X-Forwarded-*` headers are believed.
    #[serde(default)]
    pub forwarded: ForwardedConfig,
    /// Client connections that open with a PROXY protocol header (an L4 load balancer's: AWS
    /// NLB, HAProxy `send-proxy`, ...): the client it names is the connection's client.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolConfig,
    /// A request that came over plain HTTP is answered with a redirect to the same URL over
    /// HTTPS (`301` for GET and HEAD, `308` for other methods, which keeps the method and
    /// body), on every route that does not set its own `https_redirect`. Over HTTPS means on an
    /// HTTPS listener, or from a trusted proxy (`[router.forwarded]`) that says
    /// `X-Forwarded-Proto: https`. Default `false`.
    pub https_redirect: Option<bool>,
    /// The port of the redirect's `https://` URL. Default: the first HTTPS listener's, else
    /// 443 (which the URL leaves out).
    pub https_redirect_port: Option<u16>,
}

/// `[router.forwarded]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardedConfig {
    /// The proxies in front of the gateway (a load balancer, a CDN), as addresses or CIDR
    /// blocks: a request from one of them keeps its `X-Forwarded-For` (the gateway appends
    /// the proxy) and its `X-Forwarded-Proto`; one from any other peer loses every forwarding
    /// header (`X-Forwarded-For`, `-Proto`, `-Host`, `-Port`, `X-Real-IP`, `Forwarded`) and
    /// gets the gateway's own. Not set: every peer's `X-Forwarded-For` is appended to, and
    /// `X-Forwarded-Proto` is always the gateway's own. `[]`: no peer is trusted.
    pub trusted_proxies: Option<Vec<String>>,
}

/// `[router.proxy_protocol]`: HAProxy's PROXY protocol, v1 (text) and v2 (binary), on every
/// client listener (plain and HTTPS). The header comes before anything else on the connection
/// (before TLS); the source address it carries becomes the connection's client: in the access
/// log, `X-Forwarded-For`, `[router.forwarded]`, `allow_clients`, `rate_limit` and
/// `hash_on = "client"`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// Default `false`.
    pub enabled: Option<bool>,
    /// The peers (addresses, CIDR blocks) that send the header: the load balancers. A
    /// connection from any other peer is served as it comes, its client the peer, so no
    /// client can name another. Default: every peer (the listeners are reachable only through
    /// the load balancers).
    pub from: Option<Vec<String>>,
    /// `true` (default): a connection from a listed peer without a header is closed (counted
    /// as `missing`). `false`: it is served as it comes (while a load balancer's setting is
    /// being turned on, say).
    pub required: Option<bool>,
    /// From the connection to its whole header. Default [`DEFAULT_PROXY_PROTOCOL_TIMEOUT_MS`].
    pub timeout_ms: Option<u64>,
}

pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT_MS: u64 = 5_000;

/// `connection_balance`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionBalance {
    #[default]
    Exact,
    Kernel,
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
    /// Tell the upstream which certificate the client showed: `X-Forwarded-Client-Cert`
    /// (`tls::client_cert`), replacing any the client sent. Needs `client_ca_file`.
    #[serde(default)]
    pub forward_client_cert: bool,
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
    /// HTTP/1 keep-alive connection is kept. Default [`DEFAULT_HEADER_READ_TIMEOUT_MS`]. On
    /// plain HTTP/1 connections the gateway's own periodic check enforces it: the connection
    /// closes at the timeout or up to a quarter of it later, never before.
    pub header_read_timeout_ms: Option<u64>,
    /// How long a write to a client may make no progress before the connection is closed
    /// (a client that stopped reading). Default [`DEFAULT_DOWNSTREAM_WRITE_TIMEOUT_MS`].
    pub write_timeout_ms: Option<u64>,
    /// How long an HTTP/2 client connection may have no stream open before it gets a GOAWAY
    /// and is closed (streams already open finish first). Default
    /// [`DEFAULT_HTTP2_IDLE_TIMEOUT_MS`]. The HTTP/2 counterpart of an idle HTTP/1 keep-alive
    /// connection's `header_read_timeout_ms`.
    pub http2_idle_timeout_ms: Option<u64>,
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
    /// Request body bytes all requests together may hold read ahead and kept for retries: the
    /// start of each body (its first 64 KiB, or all of a smaller one) is read before any
    /// upstream is asked, unless `request_buffering = false` (see `request_buffering` in
    /// `[[routes]]`), and a request that may be retried keeps its body (up to 64 KiB). Past it,
    /// bodies stream to their upstream as they arrive, counted in
    /// `gateway_request_read_ahead_over_budget_total`, and are not kept for a retry, counted in
    /// `gateway_request_retry_copy_over_budget_total`. Default
    /// [`DEFAULT_REQUEST_BUFFERING_MEMORY_BYTES`] (64 MiB: a thousand bodies of 64 KiB).
    pub request_buffering_memory_bytes: Option<u64>,
    /// HTTP/2 rapid reset (CVE-2023-44487): a client connection is closed once at least half of
    /// its first this many streams, or half of all its streams after that, were reset by the
    /// client less than `http2_premature_reset_lifetime_ms` after they started, before their
    /// response was over. Counted in `gateway_client_http2_reset_floods_total`. Default
    /// [`DEFAULT_HTTP2_PREMATURE_RESET_STREAMS`], Envoy's; 0 turns the rule off. Raise it for
    /// clients that cancel most of what they ask, such as a search box that cancels the
    /// previous query at each keystroke over one long-lived connection.
    pub http2_premature_reset_streams: Option<u64>,
    /// See `http2_premature_reset_streams`. Default
    /// [`DEFAULT_HTTP2_PREMATURE_RESET_LIFETIME_MS`].
    pub http2_premature_reset_lifetime_ms: Option<u64>,
    /// Streams an HTTP/2 client may have open at once on one connection (the
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` the gateway advertises); a client opens no more until
    /// one ends, and a stream beyond it is refused (`REFUSED_STREAM`, safe to retry; hyper
    /// closes a connection after 1,024 such refusals). Each open stream may hold up to 400 KiB
    /// of response waiting for its client (hyper's send buffer). Below 100, the least RFC 9113
    /// recommends, `check-config` warns. Default
    /// [`DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS`], hyper's (nginx: 128; Envoy: unlimited). Raise
    /// it for gRPC clients that multiplex many long-lived streams over one connection, which
    /// otherwise queue on the client side; lower it to bound what one connection may ask of
    /// the upstreams at once. A reload applies it to new connections; open ones keep theirs.
    pub http2_max_concurrent_streams: Option<u32>,
}

pub const DEFAULT_HTTP2_PREMATURE_RESET_STREAMS: u64 = 500;
pub const DEFAULT_HTTP2_PREMATURE_RESET_LIFETIME_MS: u64 = 1_000;
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 200;

pub const DEFAULT_REQUEST_BUFFERING_MEMORY_BYTES: u64 = 64 << 20;

pub const DEFAULT_DOWNSTREAM_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_DOWNSTREAM_WRITE_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_HTTP2_IDLE_TIMEOUT_MS: u64 = 300_000;
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;

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
