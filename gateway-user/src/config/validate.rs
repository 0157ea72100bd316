//! `validate`: from the file's serde tree to [`Settings`], or to every problem found, each with
//! the key it is about. Also the warnings: settings that are legal but probably not what the
//! operator meant, such as timeouts that cascade the wrong way.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

mod addresses;
mod cluster;
mod routes;
mod tls;

#[cfg(test)]
pub(crate) use self::addresses::parse_endpoint;
use self::cluster::cluster;
use super::{model::*, settings::*, source::KeyPath};
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
    #[error("server_name {value:?} is neither a DNS name nor an IP address")]
    InvalidServerName { value: String },
    #[error("listen address {addr} appears twice")]
    DuplicateListen { addr: SocketAddr },
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
    #[error("path_prefix {value:?} must start with '/'")]
    InvalidPathPrefix { value: String },
    #[error("host {value:?}: {reason}; expected e.g. \"api.example.com\" or \"*.example.com\"")]
    InvalidHost { value: String, reason: &'static str },
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
        "unknown gRPC status {value:?}; use the names of gRPC's status codes, e.g. \"UNAVAILABLE\", \"RESOURCE_EXHAUSTED\", \"DEADLINE_EXCEEDED\""
    )]
    UnknownGrpcStatus { value: String },
    #[error(
        "`methods` is empty; list methods such as [\"GET\", \"POST\"], or remove the key to match any"
    )]
    EmptyMethods,
    #[error("{value:?} is not an HTTP method (a token such as \"GET\" or \"PURGE\")")]
    InvalidMethod { value: String },
    #[error("{value:?} is not a valid header name (lowercase letters, digits and -!#$%&'*+.^_`|~)")]
    InvalidHeaderName { value: String },
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
    #[error("certificate {path} expires at {not_after}, in {days} day(s); renew it")]
    CertificateExpiresSoon {
        path: String,
        not_after: String,
        days: i64,
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
}

/// A problem or warning and the key it is about (the most specific key written in the file).
#[derive(Clone, Debug, PartialEq)]
pub struct At<T> {
    pub key: KeyPath,
    pub what: T,
}

const DAY_MS: u64 = 86_400_000;

struct Checker {
    problems: Vec<At<Invalid>>,
    warnings: Vec<At<Warning>>,
}

impl Checker {
    fn fail(&mut self, key: KeyPath, what: Invalid) {
        self.problems.push(At { key, what });
    }

    fn range(&mut self, key: &KeyPath, value: u64, min: u64, max: u64, unit: &'static str) -> u64 {
        if !(min..=max).contains(&value) {
            self.fail(
                key.clone(),
                Invalid::OutOfRange {
                    value,
                    min,
                    max,
                    unit,
                },
            );
        }
        value
    }
}

/// One setting looked up in the cluster, then `[router.upstream]`, then the default; returns
/// the value and the key it came from (`None` for a default).
fn inherit<T: Copy>(
    own: Option<T>,
    own_key: KeyPath,
    base: Option<T>,
    base_key: KeyPath,
    default: T,
) -> (T, Option<KeyPath>) {
    match (own, base) {
        (Some(v), _) => (v, Some(own_key)),
        (None, Some(v)) => (v, Some(base_key)),
        (None, None) => (default, None),
    }
}

/// What `validate` hands back: the settings and their warnings, or every problem.
pub(crate) type Validated = Result<(Settings, Vec<At<Warning>>), Vec<At<Invalid>>>;

/// `base`: the config file's directory, which relative certificate paths start from.
pub(crate) fn validate(cfg: &Config, base: Option<&Path>) -> Validated {
    let mut c = Checker {
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let router = KeyPath::root().key("router");
    let files = tls::Files {
        base,
        now: crate::tls::validity::now_unix(),
        provider: crate::tls::provider(),
    };

    // Listeners.
    let mut listen = cfg.router.listen.clone();
    if let Some(port) = cfg.router.listener_port {
        listen.push(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let https = tls::https(&mut c, &cfg.router, &files);
    let https_listen = https.as_ref().map_or(&[][..], |h| &h.listen[..]);
    if listen.is_empty() && https_listen.is_empty() && cfg.router.https_enabled != Some(true) {
        c.fail(router.clone(), Invalid::NoListener);
    }
    let all: Vec<SocketAddr> = listen.iter().chain(https_listen).copied().collect();
    for (i, addr) in all.iter().enumerate() {
        if addr.port() != 0 && all[..i].contains(addr) {
            c.fail(
                router.key("listen"),
                Invalid::DuplicateListen { addr: *addr },
            );
        }
    }
    let grace_key = router.key("shutdown_grace_ms");
    let grace_ms = cfg
        .router
        .shutdown_grace_ms
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS);
    c.range(&grace_key, grace_ms, 0, DAY_MS, " ms");
    let drain_delay_ms = c.range(
        &router.key("drain_delay_ms"),
        cfg.router.drain_delay_ms.unwrap_or(DEFAULT_DRAIN_DELAY_MS),
        0,
        DAY_MS,
        " ms",
    );
    if let Some(w) = cfg.router.workers {
        c.range(&router.key("workers"), w as u64, 1, 1024, "");
    }

    // Client side.
    let ds = &cfg.router.downstream;
    let dk = router.key("downstream");
    let downstream = Downstream {
        header_read_timeout: ms(c.range(
            &dk.key("header_read_timeout_ms"),
            ds.header_read_timeout_ms
                .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_MS),
            1,
            DAY_MS,
            " ms",
        )),
        write_timeout: ms(c.range(
            &dk.key("write_timeout_ms"),
            ds.write_timeout_ms
                .unwrap_or(DEFAULT_DOWNSTREAM_WRITE_TIMEOUT_MS),
            1,
            DAY_MS,
            " ms",
        )),
        max_request_header_bytes: c.range(
            &dk.key("max_request_header_bytes"),
            ds.max_request_header_bytes
                .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES) as u64,
            1024,
            1 << 20,
            " bytes",
        ) as usize,
        max_request_body_bytes: ds.max_request_body_bytes,
        tls_handshake_timeout: ms(c.range(
            &dk.key("tls_handshake_timeout_ms"),
            ds.tls_handshake_timeout_ms
                .unwrap_or(DEFAULT_DOWNSTREAM_TLS_HANDSHAKE_TIMEOUT_MS),
            1,
            DAY_MS,
            " ms",
        )),
        max_client_connections: ds.max_client_connections.map(|n| {
            c.range(
                &dk.key("max_client_connections"),
                n as u64,
                1,
                10_000_000,
                "",
            ) as usize
        }),
        max_accepts_per_second: ds.max_accepts_per_second.map(|n| {
            c.range(
                &dk.key("max_accepts_per_second"),
                u64::from(n),
                1,
                10_000_000,
                "",
            ) as u32
        }),
    };
    let gateway_host = match cfg.router.gateway_host.as_deref() {
        None | Some("*") => None,
        Some(h) => match addresses::parse_host(h) {
            Ok(m) => Some(m),
            Err(reason) => {
                c.fail(
                    router.key("gateway_host"),
                    Invalid::InvalidHost {
                        value: h.to_owned(),
                        reason,
                    },
                );
                None
            }
        },
    };

    // Clusters.
    let upstream = &cfg.router.upstream;
    let upstream_key = router.key("upstream");
    let tables = std::iter::once((upstream_key.clone(), upstream)).chain(
        cfg.clusters
            .iter()
            .map(|(name, cc)| (KeyPath::root().key("clusters").key(name), cc)),
    );
    for (key, table) in tables {
        if table.health.consecutive_failures.is_some() {
            c.fail(
                key.key("health").key("consecutive_failures"),
                Invalid::ConsecutiveFailuresRemoved,
            );
        }
    }
    let mut clusters = BTreeMap::new();
    if upstream.endpoints.is_some() {
        if cfg.clusters.contains_key("default") {
            c.fail(
                KeyPath::root().key("clusters").key("default"),
                Invalid::DuplicateDefault,
            );
        }
        let mut spec = cluster(
            &mut c,
            "default",
            upstream,
            &upstream_key,
            upstream,
            &upstream_key,
        );
        let at = (upstream.tls.as_ref(), upstream_key.clone());
        spec.tls = tls::upstream(&mut c, &spec, at.clone(), at, &files);
        cluster::protocol(&mut c, &mut spec, (upstream, &upstream_key), &upstream_key);
        clusters.insert("default".to_owned(), spec);
    }
    for (name, cc) in &cfg.clusters {
        let key = KeyPath::root().key("clusters").key(name);
        if cc.endpoints.is_none() {
            c.fail(key.clone(), Invalid::MissingEndpoints);
        }
        let mut spec = cluster(&mut c, name, cc, &key, upstream, &upstream_key);
        let own = (cc.tls.as_ref(), key.clone());
        let base = (upstream.tls.as_ref(), upstream_key.clone());
        spec.tls = tls::upstream(&mut c, &spec, own, base, &files);
        cluster::protocol(&mut c, &mut spec, (cc, &key), &upstream_key);
        clusters.entry(name.clone()).or_insert(spec);
    }
    if clusters.is_empty() {
        c.fail(upstream_key.clone(), Invalid::NoCluster);
    }

    // Routes.
    let routes = routes::routes(&mut c, cfg, &clusters);
    for name in clusters.keys() {
        if !routes.iter().any(|r| &r.cluster == name) {
            let key = if name == "default" && upstream.endpoints.is_some() {
                upstream_key.key("endpoints")
            } else {
                KeyPath::root().key("clusters").key(name)
            };
            c.warnings.push(At {
                key,
                what: Warning::UnusedCluster {
                    cluster: name.clone(),
                },
            });
        }
    }
    for spec in clusters.values() {
        let request_ms = spec.timeouts.request.as_millis() as u64;
        if grace_ms < request_ms && cfg.router.shutdown_grace_ms.is_some() {
            c.warnings.push(At {
                key: grace_key.clone(),
                what: Warning::GraceShorterThanRequest {
                    cluster: spec.name.clone(),
                    grace_ms,
                    request_ms,
                },
            });
        }
    }

    // Admin.
    let admin_key = KeyPath::root().key("admin");
    let admin = if cfg.admin.enabled == Some(false) {
        None
    } else {
        let addr = cfg.admin.listen.unwrap_or_else(|| {
            DEFAULT_ADMIN_LISTEN
                .parse()
                .expect("DEFAULT_ADMIN_LISTEN is a socket address")
        });
        if !addr.ip().is_loopback() && cfg.admin.allow_remote != Some(true) {
            c.fail(admin_key.key("listen"), Invalid::AdminNotLoopback { addr });
        }
        Some(addr)
    };

    // Access log.
    let output = match cfg.access_log.output.as_deref() {
        None | Some("stdout") => LogOutput::Stdout,
        Some("stderr") => LogOutput::Stderr,
        Some("off") => LogOutput::Off,
        Some("") => {
            c.fail(
                KeyPath::root().key("access_log").key("output"),
                Invalid::EmptyLogOutput,
            );
            LogOutput::Off
        }
        Some(path) => LogOutput::File(PathBuf::from(path)),
    };
    let access_log = AccessLog {
        format: cfg.access_log.format.unwrap_or_default(),
        output,
    };

    let request_id = request_id(&mut c, &cfg.router.request_id);
    let log = Log {
        format: cfg.log.format.unwrap_or_default(),
        level: cfg.log.level.clone(),
    };
    if let Some(level) = &log.level
        && let Err(reason) = crate::logging::parse_level(level)
    {
        c.fail(
            KeyPath::root().key("log").key("level"),
            Invalid::LogLevel {
                value: level.clone(),
                reason,
            },
        );
    }

    let observer_cgroup = observer_cgroup(
        &mut c,
        cfg.observer
            .cgroup
            .as_deref()
            .unwrap_or(DEFAULT_OBSERVER_CGROUP),
    );

    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok((
        Settings {
            listen,
            https,
            gateway_host,
            shutdown_grace: ms(grace_ms),
            drain_delay: ms(drain_delay_ms),
            workers: cfg.router.workers,
            downstream,
            routes,
            clusters,
            admin,
            access_log,
            observer: Observer {
                mode: cfg.observer.mode.unwrap_or_default(),
                cgroup: observer_cgroup,
            },
            expose_errors: cfg.router.expose_upstream_errors,
            request_id,
            log,
        },
        c.warnings,
    ))
}

/// `[router.request_id]`: `None` when off.
fn request_id(c: &mut Checker, cfg: &RequestIdConfig) -> Option<RequestId> {
    if cfg.enabled == Some(false) {
        return None;
    }
    let name = cfg.header.as_deref().unwrap_or(DEFAULT_REQUEST_ID_HEADER);
    let parsed = if name == DEFAULT_REQUEST_ID_HEADER {
        // Static: cloning it per request costs nothing.
        Ok(http::HeaderName::from_static(DEFAULT_REQUEST_ID_HEADER))
    } else {
        http::HeaderName::from_bytes(name.as_bytes())
    };
    let header = match parsed {
        Ok(h) => h,
        Err(_) => {
            c.fail(
                KeyPath::root()
                    .key("router")
                    .key("request_id")
                    .key("header"),
                Invalid::InvalidHeaderName {
                    value: name.to_owned(),
                },
            );
            return None;
        }
    };
    Some(RequestId {
        header,
        keep_incoming: cfg.keep_incoming.unwrap_or(true),
    })
}

/// `[observer] cgroup`: a child name, `"."`, or an absolute path.
fn observer_cgroup(c: &mut Checker, value: &str) -> ObserverCgroup {
    let key = KeyPath::root().key("observer").key("cgroup");
    let mut fail = |reason| {
        c.fail(
            key.clone(),
            Invalid::InvalidObserverCgroup {
                value: value.to_owned(),
                reason,
            },
        );
        ObserverCgroup::Own
    };
    if value == "." {
        ObserverCgroup::Own
    } else if value.is_empty() {
        fail("empty")
    } else if value.starts_with('/') {
        if value.split('/').any(|part| part == "..") {
            fail("`..` is not allowed")
        } else {
            ObserverCgroup::Path(PathBuf::from(value))
        }
    } else if value.contains('/') {
        fail("a child name cannot contain `/`")
    } else if value == ".." || value.starts_with("cgroup.") {
        fail("not a name the cgroup filesystem allows")
    } else if value.matches("{pid}").count() > 1 {
        fail("`{pid}` may appear once")
    } else {
        ObserverCgroup::Child(value.to_owned())
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}
