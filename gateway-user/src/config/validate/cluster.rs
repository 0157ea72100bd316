//! One cluster's settings: each key looked up in the cluster's own table, then in
//! `[router.upstream]`, then the default (the deadline floor's is `crate::decide::deadline`'s;
//! the health and latency tables, whose defaults are `decide/`'s, are resolved in [`policy`]),
//! range-checked at the key it came from, and assembled into a [`ClusterSpec`].

use super::{
    super::{model::*, settings::*, source::KeyPath},
    At, Checker, DAY_MS, Invalid, Warning, inherit, ms,
};
use crate::decide::{
    deadline,
    grpc::{GrpcCode, GrpcCodes},
    retry::StatusCodes,
};

/// Where one cluster's keys are looked up: its own table first, then `[router.upstream]`.
struct Layers<'a> {
    own: &'a ClusterConfig,
    key: &'a KeyPath,
    base: &'a ClusterConfig,
    base_key: &'a KeyPath,
}

/// One numeric setting of `$l` (a [`Layers`]): the value, range-checked by `$c` at the key it
/// came from, and that key (`None`: the default).
macro_rules! setting {
    ($c:expr, $l:expr, $table:ident . $field:ident, $default:expr, $min:expr, $max:expr, $unit:expr) => {{
        let (v, from) = inherit(
            $l.own.$table.$field.map(|v| v as u64),
            $l.key.key(stringify!($table)).key(stringify!($field)),
            $l.base.$table.$field.map(|v| v as u64),
            $l.base_key.key(stringify!($table)).key(stringify!($field)),
            $default as u64,
        );
        if let Some(from) = &from {
            $c.range(from, v, $min, $max, $unit);
        }
        (v, from)
    }};
}

/// A setting that is not range-checked (a flag, an enum), from the first layer that has it.
macro_rules! choice {
    ($l:expr, $table:ident . $field:ident, $default:expr) => {
        $l.own
            .$table
            .$field
            .or($l.base.$table.$field)
            .unwrap_or($default)
    };
}

mod endpoints;
mod policy;

use self::endpoints::endpoints;

/// Resolves one cluster's settings against `[router.upstream]` and the defaults.
pub(super) fn cluster(
    c: &mut Checker,
    name: &str,
    own: &ClusterConfig,
    key: &KeyPath,
    base: &ClusterConfig,
    base_key: &KeyPath,
) -> ClusterSpec {
    let l = Layers {
        own,
        key,
        base,
        base_key,
    };
    let timeouts = timeouts(c, name, &l);
    let retry = retry(c, &l);
    let limits = limits(c, &l);
    let (protocol, _) = inherit(
        own.protocol,
        key.key("protocol"),
        base.protocol,
        base_key.key("protocol"),
        DEFAULT_PROTOCOL,
    );
    let (request_buffering, _) = inherit(
        own.request_buffering,
        key.key("request_buffering"),
        base.request_buffering,
        base_key.key("request_buffering"),
        true,
    );
    let upgrades = upgrades(c, &l);
    // Only the cluster's own list: one in [router.upstream] is for its http1 clusters.
    if own.upgrades.is_some() {
        upgrades_need_http1(c, name, &upgrades, protocol, key.key("upgrades"));
    }
    let health = policy::health(c, &l);
    let latency = policy::latency(c, &l);
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
    let hash_on = policy::hash_on(c, &l, lb_policy);
    let hash_balance_factor = policy::hash_balance_factor(c, &l, lb_policy);
    ClusterSpec {
        name: name.to_owned(),
        endpoints: endpoints(c, own, key),
        lb_policy,
        hash_on,
        hash_balance_factor,
        dns_refresh: ms(dns_refresh_ms),
        timeouts,
        retry,
        limits,
        health,
        latency,
        // Loaded by `validate::tls`, which reads the files.
        tls: None,
        // Checked against the TLS setting by `protocol`, once TLS is known.
        protocol,
        request_buffering,
        upgrades,
    }
}

/// `upgrades`: each a token, optionally `/` and a version (RFC 9110 section 7.8), lowercased;
/// never `h2c`.
fn upgrades(c: &mut Checker, l: &Layers) -> Vec<String> {
    let (list, from) = match (&l.own.upgrades, &l.base.upgrades) {
        (Some(v), _) => (v, l.key.key("upgrades")),
        (None, Some(v)) => (v, l.base_key.key("upgrades")),
        (None, None) => return DEFAULT_UPGRADES.iter().map(|p| (*p).to_owned()).collect(),
    };
    upgrade_list(c, list, &from)
}

/// A list of `upgrades` written at `from` (a cluster's or a route's), checked and lowercased.
pub(super) fn upgrade_list(c: &mut Checker, list: &[String], from: &KeyPath) -> Vec<String> {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let mut out = Vec::new();
    for p in list {
        let (name, valid) = match p.split_once('/') {
            Some((name, version)) => (name, token(name) && token(version)),
            None => (p.as_str(), token(p)),
        };
        if !valid {
            c.fail(from.clone(), Invalid::InvalidUpgrade { value: p.clone() });
        } else if name.eq_ignore_ascii_case("h2c") {
            c.fail(from.clone(), Invalid::H2cUpgrade);
        } else {
            out.push(p.to_ascii_lowercase());
        }
    }
    out
}

/// A warning when `upgrades` (written at `at`) lists a protocol for a cluster whose protocol
/// is not `http1` (`auto` included), where such a request is answered 501.
pub(super) fn upgrades_need_http1(
    c: &mut Checker,
    cluster: &str,
    upgrades: &[String],
    protocol: UpstreamProtocol,
    at: KeyPath,
) {
    if !upgrades.is_empty() && protocol != UpstreamProtocol::Http1 {
        c.warnings.push(At {
            key: at,
            what: Warning::UpgradesNeedHttp1 {
                cluster: cluster.to_owned(),
                upgrades: upgrades.join(", "),
                protocol: protocol.name(),
            },
        });
    }
}

/// `timeouts.*`, with a warning when the request timeout cannot cover a connect and a
/// response.
fn timeouts(c: &mut Checker, name: &str, l: &Layers) -> Timeouts {
    // Each in milliseconds, from 1 ms to a day unless said otherwise.
    macro_rules! timeout {
        ($field:ident, $default:expr) => {
            timeout!($field, $default, DAY_MS)
        };
        ($field:ident, $default:expr, $max:expr) => {
            setting!(c, l, timeouts.$field, $default, 1, $max, " ms")
        };
    }
    let connect = timeout!(connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS);
    let response = timeout!(response_timeout_ms, DEFAULT_RESPONSE_TIMEOUT_MS);
    let (write_ms, _) = timeout!(write_timeout_ms, DEFAULT_UPSTREAM_WRITE_TIMEOUT_MS);
    let request = timeout!(request_timeout_ms, DEFAULT_REQUEST_TIMEOUT_MS);
    let (idle_ms, _) = timeout!(idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS);
    let (tls_handshake_ms, _) =
        timeout!(tls_handshake_timeout_ms, DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS);
    let (upgrade_idle_ms, _) = timeout!(
        upgrade_idle_timeout_ms,
        DEFAULT_UPGRADE_IDLE_TIMEOUT_MS,
        7 * DAY_MS
    );
    let (upgrade_max_ms, _) = timeout!(
        upgrade_max_duration_ms,
        DEFAULT_UPGRADE_MAX_DURATION_MS,
        30 * DAY_MS
    );
    cascading(
        c,
        name,
        l,
        connect.clone(),
        response.clone(),
        request.clone(),
    );
    let (floor_ms, _) = timeout!(
        connect_deadline_floor_ms,
        deadline::DEFAULT_FLOOR.as_millis()
    );
    let adaptive = choice!(
        l,
        timeouts.adaptive_connect_deadline,
        DEFAULT_ADAPTIVE_CONNECT_DEADLINE
    );
    Timeouts {
        connect: ms(connect.0),
        response: ms(response.0),
        write: ms(write_ms),
        request: ms(request.0),
        idle: ms(idle_ms),
        connect_deadline_floor: adaptive.then(|| ms(floor_ms.min(connect.0))),
        tls_handshake: ms(tls_handshake_ms),
        upgrade_idle: ms(upgrade_idle_ms),
        upgrade_max_duration: ms(upgrade_max_ms),
    }
}

/// A warning when the request timeout leaves no room for one connect and one response, at
/// the first of those keys that was set.
fn cascading(
    c: &mut Checker,
    name: &str,
    l: &Layers,
    (connect_ms, connect_key): (u64, Option<KeyPath>),
    (response_ms, response_key): (u64, Option<KeyPath>),
    (request_ms, request_key): (u64, Option<KeyPath>),
) {
    if request_ms < connect_ms + response_ms {
        let at = request_key
            .or(connect_key)
            .or(response_key)
            .unwrap_or_else(|| l.key.clone());
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
}

/// `retry.*`: retries, their budget, what is retried, and hedging.
fn retry(c: &mut Checker, l: &Layers) -> RetryPolicy {
    let (max_retries, _) = setting!(c, l, retry.max_retries, DEFAULT_MAX_RETRIES, 0, 10, "");
    let (budget_percent, _) = setting!(
        c,
        l,
        retry.budget_percent,
        DEFAULT_RETRY_BUDGET_PERCENT,
        0,
        100,
        " %"
    );
    let (min_retry_concurrency, _) = setting!(
        c,
        l,
        retry.min_retry_concurrency,
        DEFAULT_MIN_RETRY_CONCURRENCY,
        0,
        10_000,
        ""
    );
    let on_response_timeout = choice!(
        l,
        retry.on_response_timeout,
        DEFAULT_RETRY_ON_RESPONSE_TIMEOUT
    );
    let on_reset = choice!(l, retry.on_reset, on_response_timeout);
    let grpc_status_codes = match (
        &l.own.retry.grpc_status_codes,
        &l.base.retry.grpc_status_codes,
    ) {
        (Some(list), _) => grpc_codes(c, list, &l.key.key("retry").key("grpc_status_codes")),
        (None, Some(list)) => {
            grpc_codes(c, list, &l.base_key.key("retry").key("grpc_status_codes"))
        }
        (None, None) => GrpcCodes::default(),
    };
    let status_codes = match (&l.own.retry.status_codes, &l.base.retry.status_codes) {
        (Some(list), _) => statuses(c, list, &l.key.key("retry").key("status_codes")),
        (None, Some(list)) => statuses(c, list, &l.base_key.key("retry").key("status_codes")),
        (None, None) => StatusCodes::NONE,
    };
    let hedge = choice!(l, retry.hedge, DEFAULT_HEDGE);
    let (hedge_budget_percent, _) = setting!(
        c,
        l,
        retry.hedge_budget_percent,
        DEFAULT_HEDGE_BUDGET_PERCENT,
        0,
        100,
        " %"
    );
    let policy = RetryPolicy {
        hedge,
        hedge_budget_percent: hedge_budget_percent as u32,
        max_retries: max_retries as u32,
        on_response_timeout,
        on_reset,
        budget_percent: budget_percent as u32,
        min_retry_concurrency: min_retry_concurrency as u32,
        grpc_status_codes,
        status_codes,
    };
    never_retried(c, &policy, &l.key.key("retry"));
    policy
}

/// A warning for each status list of `policy` (at `key`) that `max_retries = 0` makes moot.
pub(super) fn never_retried(c: &mut Checker, policy: &RetryPolicy, key: &KeyPath) {
    if policy.max_retries > 0 {
        return;
    }
    let lists = [
        ("grpc_status_codes", policy.grpc_status_codes.is_empty()),
        ("status_codes", policy.status_codes.is_empty()),
    ];
    for (what, empty) in lists {
        if !empty {
            c.warnings.push(At {
                key: key.key(what),
                what: Warning::StatusesNeverRetried { what },
            });
        }
    }
}

/// `limits.*`: connections, pending requests, the idle pool, HTTP/2 streams.
fn limits(c: &mut Checker, l: &Layers) -> Limits {
    let (max_connections, _) = setting!(
        c,
        l,
        limits.max_connections,
        DEFAULT_MAX_CONNECTIONS,
        1,
        1_000_000,
        ""
    );
    let (max_pending_requests, _) = setting!(
        c,
        l,
        limits.max_pending_requests,
        DEFAULT_MAX_PENDING_REQUESTS,
        0,
        1_000_000,
        ""
    );
    let (max_idle_per_endpoint, _) = setting!(
        c,
        l,
        limits.max_idle_per_endpoint,
        DEFAULT_MAX_IDLE_PER_ENDPOINT,
        0,
        100_000,
        ""
    );
    let (max_concurrent_streams, _) = setting!(
        c,
        l,
        limits.max_concurrent_streams,
        DEFAULT_MAX_CONCURRENT_STREAMS,
        1,
        1_000_000,
        ""
    );
    Limits {
        max_connections: max_connections as usize,
        max_pending_requests: max_pending_requests as usize,
        max_idle_per_endpoint: max_idle_per_endpoint as usize,
        max_concurrent_streams: max_concurrent_streams as usize,
    }
}

/// gRPC status names (`retry.grpc_status_codes`), each refused at its own index when unknown.
pub(super) fn grpc_codes(c: &mut Checker, names: &[String], key: &KeyPath) -> GrpcCodes {
    let mut set = GrpcCodes::default();
    for (i, n) in names.iter().enumerate() {
        match GrpcCode::from_name(n) {
            Some(code) => set = set.with(code),
            None => c.fail(
                key.index(i),
                Invalid::UnknownGrpcStatus { value: n.clone() },
            ),
        }
    }
    set
}

/// HTTP statuses (`retry.status_codes`), each refused at its own index outside 400 to 599.
pub(super) fn statuses(c: &mut Checker, list: &[u16], key: &KeyPath) -> StatusCodes {
    let (min, max) = (*StatusCodes::RANGE.start(), *StatusCodes::RANGE.end());
    list.iter()
        .enumerate()
        .fold(StatusCodes::NONE, |set, (i, &s)| {
            c.range(&key.index(i), s.into(), min.into(), max.into(), "");
            set.with(s)
        })
}

/// A cluster's `protocol` against its TLS: `h2` needs TLS, `h2c` refuses it, `auto` without
/// TLS is HTTP/1.1.
pub(super) fn protocol(
    c: &mut Checker,
    spec: &mut ClusterSpec,
    (own, key): (&ClusterConfig, &KeyPath),
    base_key: &KeyPath,
) {
    let at = if own.protocol.is_some() {
        key.key("protocol")
    } else {
        base_key.key("protocol")
    };
    match (spec.protocol, spec.tls.is_some()) {
        (UpstreamProtocol::H2, false) => c.fail(
            at,
            Invalid::ProtocolNeedsTls {
                cluster: spec.name.clone(),
            },
        ),
        (UpstreamProtocol::H2c, true) => c.fail(
            at,
            Invalid::H2cWithTls {
                cluster: spec.name.clone(),
            },
        ),
        (UpstreamProtocol::Auto, false) => spec.protocol = UpstreamProtocol::Http1,
        _ => {}
    }
}
