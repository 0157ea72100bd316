//! A cluster's policies that feed `decide/` and the balancer: the health machine (`health.*`,
//! defaults from `crate::decide::health`), the latency tracking (`latency.*`, defaults from
//! `crate::decide::latency`) and what `consistent_hash` hashes on (`hash_on`), resolved over
//! the cluster's [`Layers`] like its other tables.

use super::{
    super::{
        super::{model::*, settings::*},
        At, Checker, DAY_MS, Invalid, Warning,
    },
    Layers, inherit, ms,
};
use crate::{
    config::KeyPath,
    decide::{health, latency},
};

/// `health.*`: the health machine's thresholds and ejection times, and the probe.
pub(super) fn health(c: &mut Checker, l: &Layers) -> HealthPolicy {
    // One `health.*` key's value, range-checked at the key it came from.
    macro_rules! key {
        ($field:ident, $default:expr, $min:expr, $max:expr, $unit:expr) => {
            setting!(c, l, health.$field, $default, $min, $max, $unit).0
        };
    }
    use health::{
        DEFAULT_BASE_EJECTION as EJECTION, DEFAULT_MAX_EJECTED_PERCENT as MAX_PERCENT,
        DEFAULT_MAX_EJECTION as MAX_EJECTION, DEFAULT_PROBE_INTERVAL as INTERVAL,
    };
    let ejection_ms = key!(ejection_ms, EJECTION.as_millis(), 1, DAY_MS, " ms");
    let max_ejected_percent = key!(max_ejected_percent, MAX_PERCENT, 0, 100, " %");
    let max_ejection_ms = key!(max_ejection_ms, MAX_EJECTION.as_millis(), 1, DAY_MS, " ms");
    if max_ejection_ms < ejection_ms {
        c.warnings.push(At {
            key: l.key.key("health").key("max_ejection_ms"),
            what: Warning::EjectionCapBelowBase {
                base: ejection_ms,
                max: max_ejection_ms,
            },
        });
    }
    let probe_interval_ms = key!(probe_interval_ms, INTERVAL.as_millis(), 10, DAY_MS, " ms");
    let rise = key!(rise, health::DEFAULT_RISE, 1, 100, "");
    let syn_unanswered = key!(
        syn_unanswered_to_eject,
        health::DEFAULT_SYN_UNANSWERED_TO_EJECT,
        1,
        100,
        ""
    );
    let slow_handshakes = key!(
        slow_handshakes_to_suspect,
        health::DEFAULT_SLOW_HANDSHAKES_TO_SUSPECT,
        1,
        1000,
        ""
    );
    let response_timeouts = key!(
        response_timeouts_to_eject,
        health::DEFAULT_RESPONSE_TIMEOUTS_TO_EJECT,
        0,
        1000,
        ""
    );
    let tls_failures = key!(
        tls_failures_to_eject,
        health::DEFAULT_TLS_FAILURES_TO_EJECT,
        0,
        1000,
        ""
    );
    let error_statuses = key!(
        error_statuses_to_eject,
        health::DEFAULT_ERROR_STATUSES_TO_EJECT,
        0,
        1000,
        ""
    );
    let (probe_path, probe_expect_status) = probe_request(c, l);
    HealthPolicy {
        machine: crate::decide::health::HealthPolicy {
            base_ejection: ms(ejection_ms),
            max_ejection: ms(max_ejection_ms.max(ejection_ms)),
            probe_interval: ms(probe_interval_ms),
            rise: rise as u32,
            max_ejected_percent: max_ejected_percent as u32,
            syn_unanswered_to_eject: syn_unanswered as u32,
            slow_handshakes_to_suspect: slow_handshakes as u32,
            response_timeouts_to_eject: response_timeouts as u32,
            tls_failures_to_eject: tls_failures as u32,
            error_statuses_to_eject: error_statuses as u32,
        },
        probe_path,
        probe_expect_status,
        slow_start: slow_start(c, l),
    }
}

/// `health.probe_path` and `probe_expect_status`: what a probe asks, when it asks.
fn probe_request(c: &mut Checker, l: &Layers) -> (Option<String>, u16) {
    let (status, _) = setting!(
        c,
        l,
        health.probe_expect_status,
        DEFAULT_PROBE_EXPECT_STATUS,
        100,
        599,
        ""
    );
    let (path, key) = match (&l.own.health.probe_path, &l.base.health.probe_path) {
        (Some(p), _) => (Some(p.clone()), l.key),
        (None, p) => (p.clone(), l.base_key),
    };
    // Checked here: a probe that cannot be sent fails, and its endpoint stays ejected for good.
    if let Some(p) = &path
        && (!p.starts_with('/') || http::uri::PathAndQuery::try_from(p.as_str()).is_err())
    {
        c.fail(
            key.key("health").key("probe_path"),
            Invalid::InvalidProbePath { value: p.clone() },
        );
    }
    (path, status as u16)
}

/// `health.slow_start_ms`: 0 (off) to an hour.
fn slow_start(c: &mut Checker, l: &Layers) -> std::time::Duration {
    ms(setting!(c, l, health.slow_start_ms, 0u64, 0, 3_600_000, " ms").0)
}

/// `latency.*`: how latency is tracked and when an endpoint counts as slow.
pub(super) fn latency(c: &mut Checker, l: &Layers) -> latency::LatencyPolicy {
    let (decay_ms, _) = setting!(
        c,
        l,
        latency.decay_ms,
        latency::DEFAULT_DECAY.as_millis(),
        10,
        DAY_MS,
        " ms"
    );
    let (slow_factor, _) = setting!(
        c,
        l,
        latency.slow_factor,
        latency::DEFAULT_SLOW_FACTOR,
        2,
        1000,
        ""
    );
    let (slow_margin_ms, _) = setting!(
        c,
        l,
        latency.slow_margin_ms,
        latency::DEFAULT_SLOW_MARGIN.as_millis(),
        1,
        DAY_MS,
        " ms"
    );
    let (slow_trickle_ms, _) = setting!(
        c,
        l,
        latency.slow_trickle_ms,
        latency::DEFAULT_TRICKLE_INTERVAL.as_millis(),
        10,
        DAY_MS,
        " ms"
    );
    latency::LatencyPolicy {
        decay: ms(decay_ms),
        slow_factor: slow_factor as u32,
        slow_margin: ms(slow_margin_ms),
        trickle_interval: ms(slow_trickle_ms),
    }
}

/// `hash_on`, the cluster's or `[router.upstream]`'s: a warning where no `consistent_hash`
/// reads it (only for the cluster's own key: one in `[router.upstream]` is for its clusters
/// that hash).
pub(super) fn hash_on(c: &mut Checker, l: &Layers, lb_policy: LbPolicy) -> HashOn {
    let (text, at) = match (&l.own.hash_on, &l.base.hash_on) {
        (Some(t), _) => (t, l.key.key("hash_on")),
        (None, Some(t)) => (t, l.base_key.key("hash_on")),
        (None, None) => return HashOn::Client,
    };
    unused_by_hashing(c, l, l.own.hash_on.is_some(), lb_policy, (&at, "hash_on"));
    HashOn::parse(text).unwrap_or_else(|| {
        c.fail(
            at,
            Invalid::InvalidHashOn {
                value: text.clone(),
            },
        );
        HashOn::Client
    })
}

/// `hash_balance_factor`, the cluster's or `[router.upstream]`'s: from 100 to 1000 percent; a
/// warning where no `consistent_hash` reads it, as for `hash_on`.
pub(super) fn hash_balance_factor(c: &mut Checker, l: &Layers, lb_policy: LbPolicy) -> Option<u32> {
    let (factor, at) = match (l.own.hash_balance_factor, l.base.hash_balance_factor) {
        (Some(f), _) => (f, l.key.key("hash_balance_factor")),
        (None, Some(f)) => (f, l.base_key.key("hash_balance_factor")),
        (None, None) => return None,
    };
    let own = l.own.hash_balance_factor.is_some();
    unused_by_hashing(c, l, own, lb_policy, (&at, "hash_balance_factor"));
    Some(c.range(&at, u64::from(factor), 100, 1000, " %") as u32)
}

/// Warns that the cluster's own `name` (at `at`) is read by no `consistent_hash`. One in
/// `[router.upstream]` is for its clusters that hash; the cluster `default` is
/// `[router.upstream]` itself, whose key is also its clusters'.
fn unused_by_hashing(
    c: &mut Checker,
    l: &Layers,
    own: bool,
    lb_policy: LbPolicy,
    (at, name): (&KeyPath, &'static str),
) {
    let default = std::ptr::eq(l.own, l.base);
    if own && !default && lb_policy != LbPolicy::ConsistentHash {
        c.warnings.push(At {
            key: at.clone(),
            what: Warning::HashOnUnused { key: name },
        });
    }
}
