//! `validate`: from the file's serde tree to [`Settings`], or to every problem found, each with
//! the key it is about. Also the warnings: settings that are legal but probably not what the
//! operator meant, such as timeouts that cascade the wrong way.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use ipnet::IpNet;

mod addresses;
mod cluster;
mod downstream;
mod listeners;
mod observer;
mod problems;
mod proxy_protocol;
mod routes;
mod tls;

#[cfg(test)]
pub(crate) use self::addresses::parse_endpoint;
use self::cluster::cluster;
use self::downstream::downstream;
pub use self::problems::{At, Invalid, Warning};
use super::{model::*, settings::*, source::KeyPath};

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
    let files = tls::Files {
        base,
        now: crate::tls::validity::now_unix(),
        provider: crate::tls::provider(),
    };
    let (listen, https) = listeners::listeners(&mut c, &cfg.router, &files);
    let (grace_ms, drain_delay_ms) = lifecycle(&mut c, &cfg.router);
    let downstream = downstream(&mut c, &cfg.router);
    let gateway_host = gateway_host(&mut c, &cfg.router);
    let clusters = clusters(&mut c, cfg, &files);
    let redirect_port = redirect_port(&mut c, cfg, https.as_ref());
    let routes = routes::routes(&mut c, cfg, &clusters, redirect_port);
    cluster_warnings(&mut c, cfg, &clusters, &routes, grace_ms);
    let admin = admin(&mut c, &cfg.admin);
    listeners::admin_apart(&mut c, admin, &listen, https.as_ref());
    let access_log = access_log(&mut c, &cfg.access_log, base);
    let request_id = request_id(&mut c, &cfg.router.request_id);
    let trusted_proxies = trusted_proxies(&mut c, &cfg.router.forwarded);
    let proxy_protocol = proxy_protocol::proxy_protocol(&mut c, &cfg.router.proxy_protocol);
    let log = log(&mut c, &cfg.log);
    let observer = observer::observer(&mut c, &cfg.observer);

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
            connection_balance: cfg.router.connection_balance.unwrap_or_default(),
            downstream,
            routes,
            clusters,
            admin,
            access_log,
            observer,
            expose_errors: cfg.router.expose_upstream_errors,
            request_id,
            trusted_proxies,
            proxy_protocol,
            log,
        },
        c.warnings,
    ))
}

/// The shutdown grace and the drain delay, in ms, and the worker count's range.
fn lifecycle(c: &mut Checker, r: &RouterConfig) -> (u64, u64) {
    let router = KeyPath::root().key("router");
    let grace_ms = r.shutdown_grace_ms.unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS);
    c.range(&router.key("shutdown_grace_ms"), grace_ms, 0, DAY_MS, " ms");
    let drain_delay_ms = c.range(
        &router.key("drain_delay_ms"),
        r.drain_delay_ms.unwrap_or(DEFAULT_DRAIN_DELAY_MS),
        0,
        DAY_MS,
        " ms",
    );
    if let Some(w) = r.workers {
        c.range(&router.key("workers"), w as u64, 1, 1024, "");
    }
    (grace_ms, drain_delay_ms)
}

/// `[router] gateway_host`: the `Host` the gateway answers for (`*` or unset: any).
fn gateway_host(c: &mut Checker, r: &RouterConfig) -> Option<HostMatch> {
    let h = match r.gateway_host.as_deref() {
        None | Some("*") => return None,
        Some(h) => h,
    };
    match addresses::parse_host(h) {
        Ok(m) => Some(m),
        Err(reason) => {
            c.fail(
                KeyPath::root().key("router").key("gateway_host"),
                Invalid::InvalidHost {
                    value: h.to_owned(),
                    reason,
                },
            );
            None
        }
    }
}

/// Every cluster: `default` from `[router.upstream]` when it lists endpoints, and each
/// `[clusters.NAME]` over it; their TLS and protocol.
fn clusters(
    c: &mut Checker,
    cfg: &Config,
    files: &tls::Files<'_>,
) -> BTreeMap<String, ClusterSpec> {
    let upstream = &cfg.router.upstream;
    let upstream_key = KeyPath::root().key("router").key("upstream");
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
            c,
            "default",
            upstream,
            &upstream_key,
            upstream,
            &upstream_key,
        );
        let at = (upstream.tls.as_ref(), upstream_key.clone());
        spec.tls = tls::upstream(c, &spec, at.clone(), at, files);
        cluster::protocol(c, &mut spec, (upstream, &upstream_key), &upstream_key);
        clusters.insert("default".to_owned(), spec);
    }
    for (name, cc) in &cfg.clusters {
        let key = KeyPath::root().key("clusters").key(name);
        if cc.endpoints.is_none() {
            c.fail(key.clone(), Invalid::MissingEndpoints);
        }
        let mut spec = cluster(c, name, cc, &key, upstream, &upstream_key);
        let own = (cc.tls.as_ref(), key.clone());
        let base = (upstream.tls.as_ref(), upstream_key.clone());
        spec.tls = tls::upstream(c, &spec, own, base, files);
        cluster::protocol(c, &mut spec, (cc, &key), &upstream_key);
        clusters.entry(name.clone()).or_insert(spec);
    }
    if clusters.is_empty() {
        c.fail(upstream_key, Invalid::NoCluster);
    }
    clusters
}

/// Warnings about clusters as the routes and the lifecycle use them: one no route sends to,
/// and a shutdown grace shorter than a cluster's request timeout.
fn cluster_warnings(
    c: &mut Checker,
    cfg: &Config,
    clusters: &BTreeMap<String, ClusterSpec>,
    routes: &[Route],
    grace_ms: u64,
) {
    let upstream_key = KeyPath::root().key("router").key("upstream");
    for name in clusters.keys() {
        if !routes.iter().any(|r| &r.cluster == name) {
            let key = if name == "default" && cfg.router.upstream.endpoints.is_some() {
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
    if cfg.router.shutdown_grace_ms.is_none() {
        return;
    }
    for spec in clusters.values() {
        let request_ms = spec.timeouts.request.as_millis() as u64;
        if grace_ms < request_ms {
            c.warnings.push(At {
                key: KeyPath::root().key("router").key("shutdown_grace_ms"),
                what: Warning::GraceShorterThanRequest {
                    cluster: spec.name.clone(),
                    grace_ms,
                    request_ms,
                },
            });
        }
    }
}

/// `[admin]`: its address (`None` when off), loopback unless `allow_remote`.
fn admin(c: &mut Checker, a: &AdminConfig) -> Option<SocketAddr> {
    if a.enabled == Some(false) {
        return None;
    }
    let addr = a.listen.unwrap_or_else(|| {
        DEFAULT_ADMIN_LISTEN
            .parse()
            .expect("DEFAULT_ADMIN_LISTEN is a socket address")
    });
    if !addr.ip().is_loopback() && a.allow_remote != Some(true) {
        c.fail(
            KeyPath::root().key("admin").key("listen"),
            Invalid::AdminNotLoopback { addr },
        );
    }
    Some(addr)
}

/// `[access_log]`: its format and where it goes. A relative file path starts from the config
/// file's directory, as the TLS files' do (from the working directory, it went to `/` under
/// systemd); a directory that does not exist is a warning (systemd's `LogsDirectory=` makes
/// it only when the unit starts).
fn access_log(c: &mut Checker, a: &AccessLogConfig, base: Option<&Path>) -> AccessLog {
    let output = match a.output.as_deref() {
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
        Some(path) => {
            let path = crate::tls::files::resolve(base, path);
            if let Some(dir) = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
            {
                c.warnings.push(At {
                    key: KeyPath::root().key("access_log").key("output"),
                    what: Warning::NoLogDirectory {
                        dir: dir.display().to_string(),
                    },
                });
            }
            LogOutput::File(path)
        }
    };
    AccessLog {
        format: a.format.unwrap_or_default(),
        output,
    }
}

/// `[log]`: the format, and a level that must parse.
fn log(c: &mut Checker, l: &LogConfig) -> Log {
    let log = Log {
        format: l.format.unwrap_or_default(),
        level: l.level.clone(),
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
    log
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

/// Where `https_redirect` sends a client: `https_redirect_port`, else the first HTTPS
/// listener's port, else 443.
fn redirect_port(c: &mut Checker, cfg: &Config, https: Option<&Https>) -> u16 {
    let r = &cfg.router;
    let redirecting = if cfg.routes.is_empty() {
        r.https_redirect == Some(true)
    } else {
        cfg.routes
            .iter()
            .any(|route| route.https_redirect.or(r.https_redirect) == Some(true))
    };
    if let Some(port) = r.https_redirect_port {
        let key = KeyPath::root().key("router").key("https_redirect_port");
        return c.range(&key, u64::from(port), 1, 65_535, "") as u16;
    }
    let port = https
        .and_then(|h| h.listen.first())
        .map_or(443, SocketAddr::port);
    if redirecting && https.is_none() && r.forwarded.trusted_proxies.is_none() {
        c.warnings.push(At {
            key: KeyPath::root().key("router").key("https_redirect"),
            what: Warning::RedirectWithoutHttps { port },
        });
    }
    if port == 0 && redirecting {
        // Port 0 is chosen when the listener binds: no URL can name it beforehand.
        c.fail(
            KeyPath::root().key("router").key("https_redirect"),
            Invalid::Incomplete {
                what: "https_redirect with an HTTPS listener on port 0",
                needs: "https_redirect_port",
            },
        );
    }
    port
}

/// `[router.forwarded] trusted_proxies`: each an address or a CIDR block; one that covers
/// every address is allowed, with a warning.
fn trusted_proxies(c: &mut Checker, cfg: &ForwardedConfig) -> Option<Arc<[IpNet]>> {
    let list = cfg.trusted_proxies.as_ref()?;
    let key = KeyPath::root()
        .key("router")
        .key("forwarded")
        .key("trusted_proxies");
    for (i, text) in list.iter().enumerate() {
        if addresses::parse_block(text).is_some_and(|n| n.prefix_len() == 0) {
            c.warnings.push(At {
                key: key.index(i),
                what: Warning::TrustsEveryone {
                    value: text.clone(),
                },
            });
        }
    }
    Some(blocks(c, list, &key, "trusted proxy").into())
}

/// A list of addresses and CIDR blocks (`what` names an entry in an error), each parsed or
/// refused with its key.
fn blocks(c: &mut Checker, list: &[String], key: &KeyPath, what: &'static str) -> Vec<IpNet> {
    let mut nets = Vec::with_capacity(list.len());
    for (i, text) in list.iter().enumerate() {
        match addresses::parse_block(text) {
            Some(net) => nets.push(net),
            None => c.fail(
                key.index(i),
                Invalid::InvalidAddressBlock {
                    what,
                    value: text.clone(),
                },
            ),
        }
    }
    nets
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}
