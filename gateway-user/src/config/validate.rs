//! `validate`: from the file's serde tree to [`Settings`], or to every problem found, each with
//! the key it is about. Also the warnings: settings that are legal but probably not what the
//! operator meant, such as timeouts that cascade the wrong way.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use thiserror::Error;

use super::{model::*, settings::*, source::KeyPath};

/// Why a value was refused. Each variant says what is allowed.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum Invalid {
    #[error("no listener: set `[router] listener_port = 8080` or `listen = [\"127.0.0.1:8080\"]`")]
    NoListener,
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
    #[error(
        "observer cgroup {value:?}: {reason}; use a name such as \"gateway-{{pid}}\" (a child of the gateway's own cgroup), \".\" (the own cgroup itself) or an absolute cgroup v2 path"
    )]
    InvalidObserverCgroup { value: String, reason: &'static str },
}

/// A legal setting that is probably a mistake.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum Warning {
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

pub(crate) fn validate(cfg: &Config) -> Validated {
    let mut c = Checker {
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let router = KeyPath::root().key("router");

    // Listeners.
    let mut listen = cfg.router.listen.clone();
    if let Some(port) = cfg.router.listener_port {
        listen.push(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if listen.is_empty() {
        c.fail(router.clone(), Invalid::NoListener);
    }
    for (i, addr) in listen.iter().enumerate() {
        if addr.port() != 0 && listen[..i].contains(addr) {
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
    };

    // Clusters.
    let upstream = &cfg.router.upstream;
    let upstream_key = router.key("upstream");
    let mut clusters = BTreeMap::new();
    if upstream.endpoints.is_some() {
        if cfg.clusters.contains_key("default") {
            c.fail(
                KeyPath::root().key("clusters").key("default"),
                Invalid::DuplicateDefault,
            );
        }
        let spec = cluster(
            &mut c,
            "default",
            upstream,
            &upstream_key,
            upstream,
            &upstream_key,
        );
        clusters.insert("default".to_owned(), spec);
    }
    for (name, cc) in &cfg.clusters {
        let key = KeyPath::root().key("clusters").key(name);
        if cc.endpoints.is_none() {
            c.fail(key.clone(), Invalid::MissingEndpoints);
        }
        let spec = cluster(&mut c, name, cc, &key, upstream, &upstream_key);
        clusters.entry(name.clone()).or_insert(spec);
    }
    if clusters.is_empty() {
        c.fail(upstream_key.clone(), Invalid::NoCluster);
    }

    // Routes.
    let mut routes = Vec::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        let key = KeyPath::root().key("routes").index(i);
        if !clusters.contains_key(&r.cluster) {
            let known = clusters
                .keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>();
            let known = if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            };
            c.fail(
                key.key("cluster"),
                Invalid::UnknownCluster {
                    name: r.cluster.clone(),
                    known,
                },
            );
        }
        let path_prefix = r.path_prefix.clone().unwrap_or_else(|| "/".to_owned());
        if !path_prefix.starts_with('/') {
            c.fail(
                key.key("path_prefix"),
                Invalid::InvalidPathPrefix {
                    value: path_prefix.clone(),
                },
            );
        }
        let host = r.host.as_deref().and_then(|h| match parse_host(h) {
            Ok(m) => Some(m),
            Err(reason) => {
                c.fail(
                    key.key("host"),
                    Invalid::InvalidHost {
                        value: h.to_owned(),
                        reason,
                    },
                );
                None
            }
        });
        let name = r.name.clone().unwrap_or_else(|| {
            let host = host
                .as_ref()
                .map_or_else(|| "*".to_owned(), |h| h.to_string());
            format!("{host}{path_prefix}")
        });
        routes.push(Route {
            name,
            host,
            path_prefix,
            cluster: r.cluster.clone(),
        });
    }
    if routes.is_empty() {
        if clusters.contains_key("default") {
            routes.push(Route {
                name: "default".to_owned(),
                host: None,
                path_prefix: "/".to_owned(),
                cluster: "default".to_owned(),
            });
        } else if !clusters.is_empty() {
            c.fail(KeyPath::root(), Invalid::NoRoutes);
        }
    }
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
        },
        c.warnings,
    ))
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

/// Resolves one cluster's settings against `[router.upstream]` and the defaults.
fn cluster(
    c: &mut Checker,
    name: &str,
    own: &ClusterConfig,
    key: &KeyPath,
    base: &ClusterConfig,
    base_key: &KeyPath,
) -> ClusterSpec {
    // One setting: the value, range-checked at the key it came from.
    macro_rules! setting {
        ($table:ident . $field:ident, $default:expr, $min:expr, $max:expr, $unit:expr) => {{
            let (v, from) = inherit(
                own.$table.$field.map(|v| v as u64),
                key.key(stringify!($table)).key(stringify!($field)),
                base.$table.$field.map(|v| v as u64),
                base_key.key(stringify!($table)).key(stringify!($field)),
                $default as u64,
            );
            if let Some(from) = &from {
                c.range(from, v, $min, $max, $unit);
            }
            (v, from)
        }};
    }

    let (connect_ms, connect_key) = setting!(
        timeouts.connect_timeout_ms,
        DEFAULT_CONNECT_TIMEOUT_MS,
        1,
        DAY_MS,
        " ms"
    );
    let (response_ms, response_key) = setting!(
        timeouts.response_timeout_ms,
        DEFAULT_RESPONSE_TIMEOUT_MS,
        1,
        DAY_MS,
        " ms"
    );
    let (write_ms, _) = setting!(
        timeouts.write_timeout_ms,
        DEFAULT_UPSTREAM_WRITE_TIMEOUT_MS,
        1,
        DAY_MS,
        " ms"
    );
    let (request_ms, request_key) = setting!(
        timeouts.request_timeout_ms,
        DEFAULT_REQUEST_TIMEOUT_MS,
        1,
        DAY_MS,
        " ms"
    );
    let (idle_ms, _) = setting!(
        timeouts.idle_timeout_ms,
        DEFAULT_IDLE_TIMEOUT_MS,
        1,
        DAY_MS,
        " ms"
    );
    if request_ms < connect_ms + response_ms {
        let at = request_key
            .or(connect_key)
            .or(response_key)
            .unwrap_or_else(|| key.clone());
        c.warnings.push(At {
            key: at,
            what: Warning::CascadingTimeouts {
                cluster: name.to_owned(),
                request_ms,
                connect_ms,
                response_ms,
            },
        });
    }

    let (max_retries, _) = setting!(retry.max_retries, DEFAULT_MAX_RETRIES, 0, 10, "");
    let (budget_percent, _) = setting!(
        retry.budget_percent,
        DEFAULT_RETRY_BUDGET_PERCENT,
        0,
        100,
        " %"
    );
    let (min_retry_concurrency, _) = setting!(
        retry.min_retry_concurrency,
        DEFAULT_MIN_RETRY_CONCURRENCY,
        0,
        10_000,
        ""
    );
    let on_response_timeout = own
        .retry
        .on_response_timeout
        .or(base.retry.on_response_timeout)
        .unwrap_or(false);

    let (max_connections, _) = setting!(
        limits.max_connections,
        DEFAULT_MAX_CONNECTIONS,
        1,
        1_000_000,
        ""
    );
    let (max_pending_requests, _) = setting!(
        limits.max_pending_requests,
        DEFAULT_MAX_PENDING_REQUESTS,
        0,
        1_000_000,
        ""
    );
    let (max_idle_per_endpoint, _) = setting!(
        limits.max_idle_per_endpoint,
        DEFAULT_MAX_IDLE_PER_ENDPOINT,
        0,
        100_000,
        ""
    );

    let (consecutive_failures, _) = setting!(
        health.consecutive_failures,
        DEFAULT_CONSECUTIVE_FAILURES,
        1,
        1000,
        ""
    );
    let (ejection_ms, _) = setting!(health.ejection_ms, DEFAULT_EJECTION_MS, 1, DAY_MS, " ms");
    let (max_ejected_percent, _) = setting!(
        health.max_ejected_percent,
        DEFAULT_MAX_EJECTED_PERCENT,
        0,
        100,
        " %"
    );

    let (max_ejection_ms, _) = setting!(health.max_ejection_ms, 30_000u64, 1, DAY_MS, " ms");
    let (probe_interval_ms, _) = setting!(health.probe_interval_ms, 500u64, 10, DAY_MS, " ms");
    let (rise, _) = setting!(health.rise, 2u64, 1, 100, "");
    let (syn_unanswered, _) = setting!(health.syn_unanswered_to_eject, 2u64, 1, 100, "");
    let (slow_handshakes, _) = setting!(health.slow_handshakes_to_suspect, 3u64, 1, 1000, "");
    let (response_timeouts, _) = setting!(health.response_timeouts_to_eject, 5u64, 0, 1000, "");
    let (probe_expect_status, _) = setting!(health.probe_expect_status, 200u64, 100, 599, "");
    let probe_path = own
        .health
        .probe_path
        .clone()
        .or_else(|| base.health.probe_path.clone());
    let (floor_ms, _) = setting!(
        timeouts.connect_deadline_floor_ms,
        DEFAULT_CONNECT_DEADLINE_FLOOR_MS,
        1,
        DAY_MS,
        " ms"
    );
    let adaptive = own
        .timeouts
        .adaptive_connect_deadline
        .or(base.timeouts.adaptive_connect_deadline)
        .unwrap_or(true);
    let hedge = own.retry.hedge.or(base.retry.hedge).unwrap_or(true);
    let (hedge_budget_percent, _) = setting!(retry.hedge_budget_percent, 10u64, 0, 100, " %");

    let (dns_refresh_ms, from) = inherit(
        own.dns_refresh_ms,
        key.key("dns_refresh_ms"),
        base.dns_refresh_ms,
        base_key.key("dns_refresh_ms"),
        DEFAULT_DNS_REFRESH_MS,
    );
    if let Some(from) = &from {
        c.range(from, dns_refresh_ms, 100, DAY_MS, " ms");
    }
    let (lb_policy, _) = inherit(
        own.lb_policy,
        key.key("lb_policy"),
        base.lb_policy,
        base_key.key("lb_policy"),
        DEFAULT_LB_POLICY,
    );

    let mut endpoints = Vec::new();
    if let Some(list) = &own.endpoints {
        let list_key = key.key("endpoints");
        if list.is_empty() {
            c.fail(list_key.clone(), Invalid::EmptyEndpoints);
        }
        for (i, e) in list.iter().enumerate() {
            let ek = list_key.index(i);
            let weight = e.weight.unwrap_or(DEFAULT_WEIGHT);
            if e.weight.is_some() {
                c.range(&ek.key("weight"), weight.into(), 1, MAX_WEIGHT.into(), "");
            }
            match parse_endpoint(&e.address) {
                Ok(address) => endpoints.push(EndpointSpec { address, weight }),
                Err(reason) => c.fail(
                    ek,
                    Invalid::InvalidEndpoint {
                        value: e.address.clone(),
                        reason,
                    },
                ),
            }
        }
    }

    ClusterSpec {
        name: name.to_owned(),
        endpoints,
        lb_policy,
        dns_refresh: ms(dns_refresh_ms),
        timeouts: Timeouts {
            connect: ms(connect_ms),
            response: ms(response_ms),
            write: ms(write_ms),
            request: ms(request_ms),
            idle: ms(idle_ms),
            connect_deadline_floor: adaptive.then(|| ms(floor_ms.min(connect_ms))),
        },
        retry: RetryPolicy {
            hedge,
            hedge_budget_percent: hedge_budget_percent as u32,
            max_retries: max_retries as u32,
            on_response_timeout,
            budget_percent: budget_percent as u32,
            min_retry_concurrency: min_retry_concurrency as u32,
        },
        limits: Limits {
            max_connections: max_connections as usize,
            max_pending_requests: max_pending_requests as usize,
            max_idle_per_endpoint: max_idle_per_endpoint as usize,
        },
        health: HealthPolicy {
            consecutive_failures: consecutive_failures as u32,
            ejection: ms(ejection_ms),
            max_ejected_percent: max_ejected_percent as u32,
            machine: crate::decide::health::HealthPolicy {
                base_ejection: ms(ejection_ms),
                max_ejection: ms(max_ejection_ms.max(ejection_ms)),
                probe_interval: ms(probe_interval_ms),
                rise: rise as u32,
                max_ejected_percent: max_ejected_percent as u32,
                syn_unanswered_to_eject: syn_unanswered as u32,
                slow_handshakes_to_suspect: slow_handshakes as u32,
                response_timeouts_to_eject: response_timeouts as u32,
            },
            probe_path,
            probe_expect_status: probe_expect_status as u16,
        },
    }
}

/// `"10.0.0.5:8080"`, `"[::1]:8080"` or `"api.internal:8080"`.
pub(crate) fn parse_endpoint(s: &str) -> Result<EndpointAddr, &'static str> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("port 0");
        }
        return Ok(EndpointAddr::Ip(addr));
    }
    let (host, port) = s.rsplit_once(':').ok_or("no port")?;
    let port: u16 = port
        .parse()
        .map_err(|_| "port is not a number in 1..=65535")?;
    if port == 0 {
        return Err("port 0");
    }
    if host.is_empty() {
        return Err("no host");
    }
    if host.contains(':') || host.starts_with('[') {
        return Err("IPv6 addresses need brackets, e.g. [::1]:8080");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("a hostname has only letters, digits, '-', '_' and '.'");
    }
    Ok(EndpointAddr::Host {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn parse_host(s: &str) -> Result<HostMatch, &'static str> {
    let lower = s.to_ascii_lowercase();
    let (suffix, name) = match lower.strip_prefix('*') {
        Some(rest) if rest.starts_with('.') => (true, rest),
        Some(_) => return Err("a wildcard is only allowed as a leading \"*.\""),
        None => (false, lower.as_str()),
    };
    if name.trim_start_matches('.').is_empty() {
        return Err("empty host");
    }
    if name.contains(':') {
        return Err("no port: routes match the host whatever the port");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("a host has only letters, digits, '-', '_' and '.'");
    }
    Ok(if suffix {
        HostMatch::Suffix(name.to_owned())
    } else {
        HostMatch::Exact(name.to_owned())
    })
}
