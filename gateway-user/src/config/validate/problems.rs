//! The vocabulary of `validate`: why a value was refused ([`Invalid`], each variant saying
//! what is allowed), what is legal but probably a mistake ([`Warning`]), and the key each is
//! about ([`At`]).

use std::net::SocketAddr;

use thiserror::Error;

use super::super::source::KeyPath;
use crate::decide::health;

/// Why a value was refused. Each variant says what is allowed.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum Invalid {
    #[error(
        "no listener: set `[router] listener_port = 8080` or `listen = [\"127.0.0.1:8080\"]` (or `https_port` for HTTPS)"
    )]
    NoListener,
    #[error("{0}")]
    Tls(crate::tls::TlsProblem),
    #[error(
        "https_enabled = true needs a certificate: set `[router.tls] cert_file` and `key_file` (PEM), or list `[[router.tls.certificates]]`"
    )]
    HttpsWithoutCertificate,
    #[error(
        "HTTPS is on but has no address: set `[router] https_port = 8443` or `https_listen = [\"0.0.0.0:8443\"]`"
    )]
    NoHttpsListener,
    #[error("`{what}` needs `{needs}` in the same table")]
    Incomplete {
        what: &'static str,
        needs: &'static str,
    },
    #[error("ALPN protocol {value:?} is not offered here; allowed: {allowed}")]
    InvalidAlpn {
        value: String,
        allowed: &'static str,
    },
    #[error("`server_names` is empty; list the SNI names this certificate is for")]
    EmptyServerNames,
    #[error(
        "server name {name:?} is listed for another certificate too; one certificate per name (the last would win)"
    )]
    DuplicateServerName { name: String },
    #[error("server_name {value:?} is neither a DNS name nor an IP address")]
    InvalidServerName { value: String },
    #[error("listen address {addr} appears twice")]
    DuplicateListen { addr: SocketAddr },
    #[error(
        "listen address {addr} shares its port with {other}, which covers it: the kernel gives every connection to {addr} to the more specific socket, so one listener never sees them; use another port"
    )]
    OverlappingListen { addr: SocketAddr, other: SocketAddr },
    #[error(
        "admin address {addr} is also a client listener ({other}): the admin socket would take a share of the clients' connections (or fail to bind); use another port"
    )]
    AdminOnClientListener { addr: SocketAddr, other: SocketAddr },
    #[error(
        "route name `{name}` is taken by routes[{first}]; a route's name labels its metrics and log lines, so each must be unique"
    )]
    DuplicateRouteName { name: String, first: usize },
    #[error(
        "no upstream: set `[router.upstream] endpoints = [\"10.0.0.5:8080\"]` or define `[clusters.NAME]`"
    )]
    NoCluster,
    #[error(
        "no routes: add `[[routes]]` entries, or set `[router.upstream] endpoints` to send every request there"
    )]
    NoRoutes,
    #[error(
        "cluster `default` is defined both by `[router.upstream] endpoints` and `[clusters.default]`; keep one"
    )]
    DuplicateDefault,
    #[error("unknown cluster `{name}`; defined clusters: {known}")]
    UnknownCluster { name: String, known: String },
    #[error("a cluster needs `endpoints`, e.g. endpoints = [\"10.0.0.5:8080\"]")]
    MissingEndpoints,
    #[error("`endpoints` is empty; list at least one \"ip:port\" or \"host:port\"")]
    EmptyEndpoints,
    #[error(
        "invalid endpoint {value:?}: {reason}; expected \"ip:port\", \"[ipv6]:port\" or \"host:port\""
    )]
    InvalidEndpoint { value: String, reason: &'static str },
    #[error("{value} is out of range: allowed {min}..={max}{unit}")]
    OutOfRange {
        value: u64,
        min: u64,
        max: u64,
        unit: &'static str,
    },
    #[error("{value:?} must start with '/', e.g. \"/api/\"")]
    InvalidPathPrefix { value: String },
    #[error(
        "probe_path {value:?} is not a path a request can ask for; expected an absolute path with an optional query, e.g. \"/healthz\""
    )]
    InvalidProbePath { value: String },
    #[error("host {value:?}: {reason}; expected e.g. \"api.example.com\" or \"*.example.com\"")]
    InvalidHost { value: String, reason: &'static str },
    #[error(
        "{what} {value:?} is not an address or a CIDR block; expected e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\""
    )]
    InvalidAddressBlock { what: &'static str, value: String },
    #[error("{value} is out of range: from one request a day (0.0000116) to 1000000 per second")]
    RateOutOfRange { value: f64 },
    #[error("allow_clients is empty: no client could reach this route; remove the route instead")]
    NoClientAllowed,
    #[error(
        "from is empty: no peer would send a PROXY header; list the load balancers, remove `from` to expect one from every peer, or set enabled = false"
    )]
    NoProxyProtocolPeer,
    #[error("admin address {addr} is not loopback; set `[admin] allow_remote = true` to expose it")]
    AdminNotLoopback { addr: SocketAddr },
    #[error("access_log.output is empty; use \"stdout\", \"stderr\", \"off\" or a file path")]
    EmptyLogOutput,
    #[error("log level {value:?}: {reason}")]
    LogLevel {
        value: String,
        reason: crate::logging::LevelError,
    },
    #[error(
        "observer cgroup {value:?}: {reason}; use a name such as \"gateway-{{pid}}\" (a child of the gateway's own cgroup), \".\" (the own cgroup itself) or an absolute cgroup v2 path"
    )]
    InvalidObserverCgroup { value: String, reason: &'static str },
    #[error(
        "`consecutive_failures` was removed: endpoints are ejected on the kernel's evidence, not \
         on a count of failures. An RST or an ICMP unreachable ejects at once; for the rest use \
         `syn_unanswered_to_eject` (SYNs unanswered by the connect deadline, default {}), \
         `response_timeouts_to_eject` (response timeouts with the request ACKed, default {}; 0 \
         disables) and `slow_handshakes_to_suspect` (handshakes that needed SYN retransmits, \
         default {}); delete this line",
        health::DEFAULT_SYN_UNANSWERED_TO_EJECT,
        health::DEFAULT_RESPONSE_TIMEOUTS_TO_EJECT,
        health::DEFAULT_SLOW_HANDSHAKES_TO_SUSPECT
    )]
    ConsecutiveFailuresRemoved,
    #[error(
        "cluster `{cluster}`: protocol = \"h2\" is HTTP/2 over TLS, chosen by ALPN; add a `tls` table, or use \"h2c\" for HTTP/2 over plain TCP"
    )]
    ProtocolNeedsTls { cluster: String },
    #[error(
        "cluster `{cluster}`: protocol = \"h2c\" is HTTP/2 over plain TCP, but the cluster has TLS; use \"h2\" (or \"auto\") over TLS"
    )]
    H2cWithTls { cluster: String },
    #[error(
        "upgrade protocol \"h2c\" is never tunnelled: a client would speak HTTP/2 straight to the upstream, past every route, rule and log line of the gateway (h2c smuggling). Clients reach the gateway over HTTP/2 directly (prior knowledge, or ALPN over TLS); for HTTP/2 to the endpoints set protocol = \"h2c\""
    )]
    H2cUpgrade,
    #[error(
        "upgrade protocol {value:?} is not a protocol name as `Upgrade` carries it; expected e.g. \"websocket\" or \"spdy/3.1\""
    )]
    InvalidUpgrade { value: String },
    #[error(
        "unknown gRPC status {value:?}; use the names of gRPC's status codes, e.g. \"UNAVAILABLE\", \"RESOURCE_EXHAUSTED\", \"DEADLINE_EXCEEDED\""
    )]
    UnknownGrpcStatus { value: String },
    #[error(
        "`methods` is empty; list methods such as [\"GET\", \"POST\"], or remove the key to match any"
    )]
    EmptyMethods,
    #[error("{value:?} is not an HTTP method (a token such as \"GET\" or \"PURGE\")")]
    InvalidMethod { value: String },
    #[error(
        "{value:?} would never match {upper}: methods are case-sensitive (RFC 9110 section 9.1); write \"{upper}\""
    )]
    MethodCase { value: String, upper: String },
    #[error("{value:?} is not a valid header name (lowercase letters, digits and -!#$%&'*+.^_`|~)")]
    InvalidHeaderName { value: String },
    #[error(
        "{value:?} is not what a request can be hashed on: \"client\", \"header:NAME\" or \"cookie:NAME\""
    )]
    InvalidHashOn { value: String },
    #[error("{value:?} is not a valid header value (visible ASCII, spaces and tabs)")]
    InvalidHeaderValue { value: String },
    #[error("a header condition needs exactly one of `value = \"...\"` or `present = true|false`")]
    HeaderMatchNeedsOne,
    #[error("rewrite_prefix {value:?} must be a path without a query, e.g. \"/v2/\"")]
    InvalidRewrite { value: String },
    #[error(
        "header `{name}` cannot be rewritten by a route: it describes the connection or is the gateway's own"
    )]
    HeaderNotRewritable { name: String },
}

/// A legal setting that is probably a mistake.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum Warning {
    #[error(
        "endpoint {value:?} is listed twice; it is one endpoint (give it a weight to send it more)"
    )]
    DuplicateEndpoint { value: String },
    #[error(
        "max_ejection_ms {max} is below ejection_ms {base}: every ejection lasts {base} ms, and none grows"
    )]
    EjectionCapBelowBase { base: u64, max: u64 },
    #[error(
        "https_redirect with no HTTPS listener here and no trusted_proxies: plain requests are redirected to port {port}; behind a load balancer that terminates TLS, list it in [router.forwarded] trusted_proxies, or each request it forwards is redirected again, without end"
    )]
    RedirectWithoutHttps { port: u16 },
    #[error(
        "directory {dir} does not exist: `gateway run` cannot open the access log until it is made (systemd's LogsDirectory= makes it when the unit starts)"
    )]
    NoLogDirectory { dir: String },
    #[error("certificate {path} expires at {not_after}, in {days} day(s); renew it")]
    CertificateExpiresSoon {
        path: String,
        not_after: String,
        days: i64,
    },
    #[error(
        "{path} holds a certificate past the leaf that expired at {not_after} (its subject: {subject}); it is sent, and clients that need it to build their path fail; remove it"
    )]
    ChainCertificateExpired {
        path: String,
        not_after: String,
        subject: String,
    },
    #[error(
        "cluster `{cluster}`: insecure_skip_verify = true: the upstream's certificate is NOT verified; anyone on the path can impersonate it"
    )]
    InsecureSkipVerify { cluster: String },
    #[error("`{what}` is set but `https_enabled = false`: there is no HTTPS listener")]
    HttpsOff { what: &'static str },
    #[error(
        "cluster `{cluster}`: request_timeout_ms ({request_ms}) is shorter than connect_timeout_ms ({connect_ms}) + response_timeout_ms ({response_ms}); a slow attempt ends as `request_timeout` before its own timeout can say what happened, and leaves no time to retry"
    )]
    CascadingTimeouts {
        cluster: String,
        request_ms: u64,
        connect_ms: u64,
        response_ms: u64,
    },
    #[error(
        "observer.max_connections = {value} preallocates {mib} MiB of kernel memory for the table of connect records (128 bytes a slot, rounded up to a power of two), whatever the traffic"
    )]
    LargeConnectTable { value: u32, mib: u64 },
    #[error(
        "route `{route}` never matches: route `{by}`, written before it, has the same host and path_prefix and as many conditions, which every request of `{route}` meets, so it takes them all; remove one, or make their conditions differ"
    )]
    ShadowedRoute { route: String, by: String },
    #[error("cluster `{cluster}` is not used by any route")]
    UnusedCluster { cluster: String },
    #[error(
        "shutdown_grace_ms ({grace_ms}) is shorter than cluster `{cluster}`'s request_timeout_ms ({request_ms}); a drain may cut in-flight requests off"
    )]
    GraceShorterThanRequest {
        cluster: String,
        grace_ms: u64,
        request_ms: u64,
    },
    #[error(
        "http2_max_concurrent_streams = {streams} is below the 100 RFC 9113 recommends: a browser or gRPC client that opens more streams at once waits for them, and those it opens before reading the gateway's SETTINGS are refused"
    )]
    FewHttp2Streams { streams: u32 },
    #[error(
        "cluster `{cluster}`: upgrades lists {upgrades} but protocol = \"{protocol}\": an upgrade is tunnelled only to an http1 cluster, and a request for one of these is answered 501 (upgrade_unsupported)"
    )]
    UpgradesNeedHttp1 {
        cluster: String,
        upgrades: String,
        protocol: &'static str,
    },
    #[error(
        "trusted proxy {value:?} covers every address: any client can then set its own X-Forwarded-For and X-Forwarded-Proto; list only the proxies in front of the gateway"
    )]
    TrustsEveryone { value: String },
    #[error("{key} is set, but lb_policy is not \"consistent_hash\", so nothing hashes on it")]
    HashOnUnused { key: &'static str },
    #[error(
        "router.proxy_protocol is not enabled (enabled = true), so this does nothing: connections are read without a PROXY header"
    )]
    ProxyProtocolOff,
    #[error(
        "every peer may send a PROXY header, so any client that reaches the listeners directly can name another client (its address in the access log, X-Forwarded-For, allow_clients, rate_limit); list the load balancers in router.proxy_protocol.from"
    )]
    ProxyProtocolFromAnyone,
    #[error(
        "{what} lists statuses to retry, but max_retries = 0 turns every retry off: none of them is ever retried"
    )]
    StatusesNeverRetried { what: &'static str },
}

/// A problem or warning and the key it is about (the most specific key written in the file).
#[derive(Clone, Debug, PartialEq)]
pub struct At<T> {
    pub key: KeyPath,
    pub what: T,
}
