//! `[[routes]]`: each route checked against the clusters that exist, its host and path prefix
//! parsed, its name defaulted, its conditions (methods, headers), path rewrite and header rules
//! parsed, and its policy resolved (the cluster's timeouts and retries, with the route's
//! overrides); with none written, one route sends everything to `default`.

use crate::config::HostMatch;
use std::{collections::BTreeMap, sync::Arc};

use ipnet::IpNet;

use http::{HeaderName, HeaderValue};

use super::{
    super::{
        model::{
            Config, DEFAULT_RATE_LIMIT_CLIENTS, HeaderMatchConfig, HeaderRulesConfig, RetryConfig,
            RouteConfig, RouteTimeoutsConfig,
        },
        settings::{
            ClusterSpec, HeaderIs, HeaderMatch, HeaderRules, RateLimit, Route, RoutePolicy,
        },
        source::KeyPath,
    },
    Checker, DAY_MS, Invalid,
    addresses::parse_host,
    cluster::{self, grpc_codes, statuses},
    ms,
};

mod methods;
mod shadowed;

use self::{methods::methods, shadowed::warn_shadowed};

/// The routes in the order written (problems go to `c`).
/// `redirect_port`: where a route's `https_redirect` sends a client.
pub(super) fn routes(
    c: &mut Checker,
    cfg: &Config,
    clusters: &BTreeMap<String, ClusterSpec>,
    redirect_port: u16,
) -> Vec<Route> {
    let redirect = |own: Option<bool>| {
        own.or(cfg.router.https_redirect)
            .unwrap_or(false)
            .then_some(redirect_port)
    };
    let mut routes = Vec::new();
    // Each route's name, by index: a name labels the route's metrics and log lines.
    let mut names: Vec<String> = Vec::with_capacity(cfg.routes.len());
    for (i, r) in cfg.routes.iter().enumerate() {
        let key = KeyPath::root().key("routes").index(i);
        if !clusters.contains_key(&r.cluster) {
            unknown_cluster(c, clusters, &r.cluster, key.key("cluster"));
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
        let name = route_name(c, (r, &key), host.as_ref(), &path_prefix, &names);
        names.push(name.clone());
        let methods = methods(c, r, &key);
        let headers = header_matches(c, &r.headers, &key.key("headers"));
        let rewrite_prefix = rewrite(c, r, &key);
        let request_headers = header_rules(c, &r.request_headers, &key.key("request_headers"));
        let response_headers = header_rules(c, &r.response_headers, &key.key("response_headers"));
        // An unknown cluster was refused above.
        let Some(spec) = clusters.get(&r.cluster) else {
            continue;
        };
        routes.push(Route {
            name,
            host,
            path_prefix,
            cluster: r.cluster.clone(),
            methods,
            headers,
            rewrite_prefix,
            policy: policy(c, RoutePolicy::of(spec), r, &key),
            upgrades: route_upgrades(c, r, spec, &key),
            https_redirect: redirect(r.https_redirect),
            allow_clients: allow_clients(c, r, &key),
            rate_limit: rate_limit(c, r, &key),
            request_headers,
            response_headers,
        });
        if let Some((r, earlier)) = routes.split_last() {
            warn_shadowed(c, earlier, r, &key);
        }
    }
    if cfg.routes.is_empty() {
        match clusters.get("default") {
            Some(spec) => routes.push(default_route(spec, redirect(None))),
            None if !clusters.is_empty() => c.fail(KeyPath::root(), Invalid::NoRoutes),
            None => {}
        }
    }
    routes
}

/// A route's name: the one it gives, which no earlier route may have, or one made of its
/// host and prefix; routes told apart only by methods or headers get `#2`, `#3`, ... so that
/// their metrics do not merge. `names`: the earlier routes'.
fn route_name(
    c: &mut Checker,
    (r, key): (&RouteConfig, &KeyPath),
    host: Option<&HostMatch>,
    path_prefix: &str,
    names: &[String],
) -> String {
    if let Some(n) = &r.name {
        if let Some(first) = names.iter().position(|x| x == n) {
            let name = n.clone();
            c.fail(key.key("name"), Invalid::DuplicateRouteName { name, first });
        }
        return n.clone();
    }
    let host = host.map_or_else(|| "*".to_owned(), |h| h.to_string());
    let base = format!("{host}{path_prefix}");
    (1..)
        .map(|n| match n {
            1 => base.clone(),
            n => format!("{base}#{n}"),
        })
        .find(|n| !names.contains(n))
        .unwrap_or(base)
}

/// A route names a cluster that is not configured: the error lists those that are.
fn unknown_cluster(
    c: &mut Checker,
    clusters: &BTreeMap<String, ClusterSpec>,
    name: &str,
    at: KeyPath,
) {
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
        at,
        Invalid::UnknownCluster {
            name: name.to_owned(),
            known,
        },
    );
}

/// With no `[[routes]]`, everything goes to the `default` cluster (`[router.upstream]`).
fn default_route(spec: &ClusterSpec, https_redirect: Option<u16>) -> Route {
    Route {
        name: "default".to_owned(),
        host: None,
        path_prefix: "/".to_owned(),
        cluster: "default".to_owned(),
        methods: None,
        headers: Vec::new(),
        rewrite_prefix: None,
        policy: RoutePolicy::of(spec),
        upgrades: spec.upgrades.clone(),
        https_redirect,
        allow_clients: None,
        rate_limit: None,
        request_headers: HeaderRules::default(),
        response_headers: HeaderRules::default(),
    }
}

/// A route's `allow_clients`: addresses and blocks; an empty list, which no client can pass,
/// is an error.
fn allow_clients(c: &mut Checker, r: &RouteConfig, key: &KeyPath) -> Option<Arc<[IpNet]>> {
    let list = r.allow_clients.as_ref()?;
    let key = key.key("allow_clients");
    if list.is_empty() {
        c.fail(key.clone(), Invalid::NoClientAllowed);
    }
    Some(super::blocks(c, list, &key, "allowed client").into())
}

/// The slowest `rate_limit`: one request a day.
const MIN_RATE: f64 = 1.0 / 86_400.0;

/// A route's `rate_limit`: a rate from one a day to 1,000,000 a second, a burst and a table
/// size within their ranges.
fn rate_limit(c: &mut Checker, r: &RouteConfig, key: &KeyPath) -> Option<RateLimit> {
    let cfg = r.rate_limit.as_ref()?;
    let key = key.key("rate_limit");
    let rate = cfg.requests_per_second;
    if !(MIN_RATE..=1e6).contains(&rate) {
        c.fail(
            key.key("requests_per_second"),
            Invalid::RateOutOfRange { value: rate },
        );
    }
    let default_burst = rate.ceil().clamp(1.0, 1e6) as u64;
    let burst = match cfg.burst {
        Some(b) => c.range(&key.key("burst"), u64::from(b), 1, 1_000_000, ""),
        None => default_burst,
    };
    let max_clients = cfg.max_clients.unwrap_or(DEFAULT_RATE_LIMIT_CLIENTS);
    let max_clients = c.range(
        &key.key("max_clients"),
        u64::from(max_clients),
        1,
        10_000_000,
        "",
    );
    Some(RateLimit {
        requests_per_second: rate,
        burst: burst as u32,
        by: cfg.by.unwrap_or_default(),
        max_clients: max_clients as usize,
    })
}

/// A route's own `upgrades`, checked as a cluster's are, else its cluster's; a warning when it
/// lists any for a cluster whose protocol is not `http1`.
fn route_upgrades(
    c: &mut Checker,
    r: &RouteConfig,
    spec: &ClusterSpec,
    key: &KeyPath,
) -> Vec<String> {
    let Some(list) = &r.upgrades else {
        return spec.upgrades.clone();
    };
    let at = key.key("upgrades");
    let list = cluster::upgrade_list(c, list, &at);
    cluster::upgrades_need_http1(c, &spec.name, &list, spec.protocol, at);
    list
}

/// The cluster's policy with the route's overrides, each range-checked at its key.
fn policy(c: &mut Checker, mut p: RoutePolicy, r: &RouteConfig, key: &KeyPath) -> RoutePolicy {
    route_timeouts(c, &mut p, r, key);
    route_retry(c, &mut p, r, key);
    if let Some(on) = r.request_buffering {
        p.request_buffering = on;
    }
    p.max_request_body_bytes = r.max_request_body_bytes.or(p.max_request_body_bytes);
    p
}

/// `timeouts.*` of a route, over its cluster's.
fn route_timeouts(c: &mut Checker, p: &mut RoutePolicy, r: &RouteConfig, key: &KeyPath) {
    let RouteTimeoutsConfig {
        request_timeout_ms,
        response_timeout_ms,
        upgrade_idle_timeout_ms,
        upgrade_max_duration_ms,
    } = r.timeouts;
    let tk = key.key("timeouts");
    let mut timeout = |v: Option<u64>, name: &str, max: u64, into: &mut std::time::Duration| {
        if let Some(v) = v {
            *into = ms(c.range(&tk.key(name), v, 1, max, " ms"));
        }
    };
    timeout(
        request_timeout_ms,
        "request_timeout_ms",
        DAY_MS,
        &mut p.request_timeout,
    );
    timeout(
        response_timeout_ms,
        "response_timeout_ms",
        DAY_MS,
        &mut p.response_timeout,
    );
    timeout(
        upgrade_idle_timeout_ms,
        "upgrade_idle_timeout_ms",
        7 * DAY_MS,
        &mut p.upgrade_idle_timeout,
    );
    timeout(
        upgrade_max_duration_ms,
        "upgrade_max_duration_ms",
        30 * DAY_MS,
        &mut p.upgrade_max_duration,
    );
}

/// `retry.*` of a route, over its cluster's.
fn route_retry(c: &mut Checker, p: &mut RoutePolicy, r: &RouteConfig, key: &KeyPath) {
    let RetryConfig {
        max_retries,
        on_response_timeout,
        budget_percent,
        min_retry_concurrency,
        hedge,
        hedge_budget_percent,
        on_reset,
        grpc_status_codes,
        status_codes,
    } = &r.retry;
    let rk = key.key("retry");
    let mut number = |v: Option<u32>, name: &str, max: u64, into: &mut u32| {
        if let Some(v) = v {
            *into = c.range(&rk.key(name), v.into(), 0, max, "") as u32;
        }
    };
    number(*max_retries, "max_retries", 10, &mut p.retry.max_retries);
    number(
        *budget_percent,
        "budget_percent",
        100,
        &mut p.retry.budget_percent,
    );
    number(
        *min_retry_concurrency,
        "min_retry_concurrency",
        10_000,
        &mut p.retry.min_retry_concurrency,
    );
    number(
        *hedge_budget_percent,
        "hedge_budget_percent",
        100,
        &mut p.retry.hedge_budget_percent,
    );
    if let Some(v) = on_response_timeout {
        p.retry.on_response_timeout = *v;
        // `on_reset` follows `on_response_timeout` unless written, as in a cluster.
        p.retry.on_reset = on_reset.unwrap_or(*v);
    }
    if let Some(v) = on_reset {
        p.retry.on_reset = *v;
    }
    if let Some(v) = hedge {
        p.retry.hedge = *v;
    }
    if let Some(list) = grpc_status_codes {
        p.retry.grpc_status_codes = grpc_codes(c, list, &rk.key("grpc_status_codes"));
    }
    if let Some(list) = status_codes {
        p.retry.status_codes = statuses(c, list, &rk.key("status_codes"));
    }
    // Warned for the route only where it sets one of them: the cluster's own are warned there.
    if max_retries.is_some() || grpc_status_codes.is_some() || status_codes.is_some() {
        cluster::never_retried(c, &p.retry, &rk);
    }
}

fn header_name(c: &mut Checker, name: &str, at: KeyPath) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| {
            c.fail(
                at,
                Invalid::InvalidHeaderName {
                    value: name.to_owned(),
                },
            )
        })
        .ok()
}

fn header_value(c: &mut Checker, value: &str, at: KeyPath) -> Option<HeaderValue> {
    HeaderValue::from_str(value)
        .map_err(|_| {
            c.fail(
                at,
                Invalid::InvalidHeaderValue {
                    value: value.to_owned(),
                },
            )
        })
        .ok()
}

fn header_matches(c: &mut Checker, list: &[HeaderMatchConfig], key: &KeyPath) -> Vec<HeaderMatch> {
    let mut out = Vec::new();
    for (i, h) in list.iter().enumerate() {
        let hk = key.index(i);
        let name = header_name(c, &h.name, hk.key("name"));
        let is = match (&h.value, h.present) {
            (Some(v), None) => header_value(c, v, hk.key("value")).map(HeaderIs::Exactly),
            (None, Some(true)) => Some(HeaderIs::Present),
            (None, Some(false)) => Some(HeaderIs::Absent),
            _ => {
                c.fail(hk, Invalid::HeaderMatchNeedsOne);
                None
            }
        };
        if let (Some(name), Some(is)) = (name, is) {
            out.push(HeaderMatch { name, is });
        }
    }
    out
}

fn rewrite(c: &mut Checker, r: &RouteConfig, key: &KeyPath) -> Option<String> {
    let to = r.rewrite_prefix.as_ref()?;
    if !to.starts_with('/') {
        c.fail(
            key.key("rewrite_prefix"),
            Invalid::InvalidPathPrefix { value: to.clone() },
        );
    } else if http::uri::PathAndQuery::try_from(to.as_str()).is_err() || to.contains('?') {
        c.fail(
            key.key("rewrite_prefix"),
            Invalid::InvalidRewrite { value: to.clone() },
        );
    }
    Some(to.clone())
}

/// Headers the gateway owns or that describe one connection: a rule may not touch them.
const NOT_RULED: [&str; 7] = [
    "connection",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "keep-alive",
    "te",
    "host",
];

fn header_rules(c: &mut Checker, rules: &HeaderRulesConfig, key: &KeyPath) -> HeaderRules {
    let mut out = HeaderRules::default();
    let ruled = |c: &mut Checker, name: &str, at: KeyPath| -> Option<HeaderName> {
        let n = header_name(c, name, at.clone())?;
        if NOT_RULED.contains(&n.as_str()) || n.as_str().starts_with("x-gateway-") {
            c.fail(
                at,
                Invalid::HeaderNotRewritable {
                    name: n.as_str().to_owned(),
                },
            );
            return None;
        }
        Some(n)
    };
    for (i, name) in rules.remove.iter().enumerate() {
        if let Some(n) = ruled(c, name, key.key("remove").index(i)) {
            out.remove.push(n);
        }
    }
    for (table, into) in [("set", &rules.set), ("add", &rules.add)] {
        for (name, value) in into {
            let at = key.key(table).key(name);
            let n = ruled(c, name, at.clone());
            let v = header_value(c, value, at);
            if let (Some(n), Some(v)) = (n, v) {
                match table {
                    "set" => out.set.push((n, v)),
                    _ => out.add.push((n, v)),
                }
            }
        }
    }
    out
}
