//! Endpoint addresses: `ip:port` entries as written, `host:port` entries resolved at start and
//! again every `dns_refresh_ms`. A refresh keeps the endpoints (their pools, health and
//! metrics) whose address and weight are still there, and builds the new ones; one where a
//! name does not resolve removes nothing ([`refresh`]). A new address
//! (a backend scaled up) starts its slow start's ramp, as one back from an ejection does:
//! its caches and JIT are as cold.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::SystemTime,
};

use tracing::{info, warn};

use super::{Cluster, Endpoint};
use crate::config::{ClusterSpec, EndpointAddr};

/// One resolution of a spec's endpoints.
pub(crate) struct Resolved {
    /// Every address found, sorted, each once, with its entry's weight.
    pub addrs: Vec<(SocketAddr, u32)>,
    /// The entries (by their place in the spec) whose name did not resolve, and why.
    pub failed: Vec<(usize, std::io::Error)>,
}

/// Every endpoint address of the spec, `host:port` entries resolved now.
pub(crate) async fn resolve(spec: &ClusterSpec) -> Resolved {
    let mut addrs = Vec::new();
    let mut failed = Vec::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        match &e.address {
            EndpointAddr::Ip(a) => addrs.push((*a, e.weight)),
            EndpointAddr::Host { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(found) => addrs.extend(found.map(|a| (a, e.weight))),
                    Err(err) => failed.push((i, err)),
                }
            }
        }
    }
    addrs.sort();
    addrs.dedup_by_key(|(a, _)| *a);
    Resolved { addrs, failed }
}

/// Whether each host-name entry of a cluster resolved at its latest resolution, for
/// `/status`: by entry in the spec, `None` for an address entry.
pub(crate) struct Names(Mutex<Vec<Option<NameState>>>);

/// A host-name entry at its latest resolution.
#[derive(Clone)]
pub(crate) struct NameState {
    /// Why it did not resolve; `None`: it did.
    pub error: Option<String>,
    /// Since when it has (or has not).
    pub since: SystemTime,
}

impl Names {
    /// The names as the start-up resolution found them; logs each that did not resolve.
    pub(crate) fn at_start(spec: &ClusterSpec, failed: &[(usize, std::io::Error)]) -> Names {
        let now = SystemTime::now();
        let names = spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let EndpointAddr::Host { .. } = e.address else {
                    return None;
                };
                let error = failed.iter().find(|(f, _)| *f == i).map(|(_, err)| {
                    warn!(cluster = %spec.name, endpoint = %e.address, error = %err, "cannot resolve endpoint; retrying every dns_refresh_ms");
                    err.to_string()
                });
                Some(NameState { error, since: now })
            })
            .collect();
        Names(Mutex::new(names))
    }

    /// By entry in the spec, `None` for an address entry.
    pub(crate) fn snapshot(&self) -> Vec<Option<NameState>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a refresh's resolution, and logs the names that started failing in it and
    /// those that resolve again (not those that go on as they were).
    fn record(&self, spec: &ClusterSpec, failed: &[(usize, std::io::Error)]) {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (i, name) in names.iter_mut().enumerate() {
            let Some(name) = name else { continue };
            let now = failed.iter().find(|(f, _)| *f == i).map(|(_, err)| err);
            let endpoint = &spec.endpoints[i].address;
            match (now, name.error.is_some()) {
                (Some(err), false) => {
                    warn!(cluster = %spec.name, %endpoint, error = %err, "cannot resolve endpoint; keeping its last addresses, retrying every dns_refresh_ms");
                }
                (None, true) => info!(cluster = %spec.name, %endpoint, "endpoint resolves again"),
                _ => continue,
            }
            *name = NameState {
                error: now.map(ToString::to_string),
                since: SystemTime::now(),
            };
        }
    }
}

/// Whether the spec names any endpoint by host name (and so needs [`refresh`]).
pub(crate) fn has_host_names(spec: &ClusterSpec) -> bool {
    spec.endpoints
        .iter()
        .any(|e| matches!(e.address, EndpointAddr::Host { .. }))
}

/// Re-resolves every `dns_refresh` until the cluster is dropped. A refresh where a name does
/// not resolve (a DNS server timing out, `SERVFAIL`, the name gone) removes nothing: the
/// endpoints stay as they were, and only new addresses of the names that did resolve are
/// added, until a refresh where every name resolves. A DNS outage must not empty a cluster
/// that was serving (Envoy's DNS clusters and HAProxy's `hold` keep the last addresses too).
/// Each name is logged when it starts failing and when it resolves again, not at every
/// refresh (`Names`, which `/status` shows), and counted at every one
/// (`gateway_dns_resolution_failures_total`).
pub(crate) async fn refresh(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => c.spec.dns_refresh,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        let Resolved { mut addrs, failed } = resolve(&c.spec).await;
        c.names.record(&c.spec, &failed);
        c.meter.dns_names_unresolved(failed.len());
        let current = c.set.list();
        if !failed.is_empty() {
            keep(&mut addrs, current.iter().map(|e| (e.addr, e.weight)));
        }
        let same = addrs.len() == current.len()
            && addrs
                .iter()
                .zip(&current)
                .all(|((a, w), e)| *a == e.addr && *w == e.weight);
        if same {
            continue;
        }
        let endpoints = addrs
            .into_iter()
            .map(|(a, w)| {
                current
                    .iter()
                    .find(|e| e.addr == a && e.weight == w)
                    .cloned()
                    .unwrap_or_else(|| arrived(&c, &current, a, w))
            })
            .collect::<Vec<_>>();
        let gone: Vec<_> = current
            .iter()
            .filter(|e| !endpoints.iter().any(|n| Arc::ptr_eq(n, e)))
            .cloned()
            .collect();
        let added: Vec<SocketAddr> = endpoints
            .iter()
            .filter(|n| !current.iter().any(|e| Arc::ptr_eq(n, e)))
            .map(|n| n.addr)
            .collect();
        let removed: Vec<SocketAddr> = gone.iter().map(|e| e.addr).collect();
        info!(cluster = %c.name, endpoints = endpoints.len(), ?added, ?removed, "endpoints re-resolved");
        c.set.replace(endpoints);
        for e in gone {
            e.close();
        }
    }
}

/// What a cluster rebuilt by a reload (`previous`, the one it replaces) keeps for its names
/// that do not resolve now: the addresses `previous` had for the names it had, when a failing
/// entry was one of them. A reload that changes a cluster's settings during a DNS outage must
/// not empty it. The addresses cannot be told apart by name, so all of `previous`'s that no
/// address entry of its own gave are kept (at worst an address another name no longer has,
/// until the first refresh where every name resolves); a failing name the reload brought in
/// keeps nothing.
pub(crate) fn carry_over(spec: &ClusterSpec, resolved: &mut Resolved, previous: &Cluster) {
    let had = |i: &usize| {
        previous
            .spec
            .endpoints
            .iter()
            .any(|e| e.address == spec.endpoints[*i].address)
    };
    if !resolved.failed.iter().any(|(i, _)| had(i)) {
        return;
    }
    let named = previous.set.list().into_iter().filter(|e| {
        !previous
            .spec
            .endpoints
            .iter()
            .any(|s| s.address == EndpointAddr::Ip(e.addr))
    });
    let before = resolved.addrs.len();
    keep(&mut resolved.addrs, named.map(|e| (e.addr, e.weight)));
    info!(cluster = %spec.name, kept = resolved.addrs.len() - before, "names that do not resolve keep the addresses they had before the reload");
}

/// Adds the `current` endpoints to what a refresh where a name failed found: every endpoint
/// stays, at its weight. With the rule of [`resolve`] (an address two entries name takes the
/// lower weight), one that another entry also names keeps the weight the failing entry gave
/// it, rather than being rebuilt at the other's and rebuilt back once the name resolves.
fn keep(addrs: &mut Vec<(SocketAddr, u32)>, current: impl Iterator<Item = (SocketAddr, u32)>) {
    addrs.extend(current);
    addrs.sort();
    addrs.dedup_by_key(|(a, _)| *a);
}

/// The endpoint for `addr`, new in this refresh. An address the cluster did not have at all
/// ramps up under slow start (`health.slow_start_ms`), unless the cluster had no endpoint (its
/// names did not resolve until now): then every address is new, and none would be ramped
/// against another. An address whose weight changed is rebuilt without a ramp: it was serving.
fn arrived(c: &Cluster, current: &[Arc<Endpoint>], addr: SocketAddr, weight: u32) -> Arc<Endpoint> {
    let ep = c.new_endpoint(addr, weight);
    if !current.is_empty() && !current.iter().any(|e| e.addr == addr) {
        // Before the endpoint is published: no pick sees it without its ramp.
        ep.health.came_back();
    }
    ep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(last: u8, weight: u32) -> (SocketAddr, u32) {
        (SocketAddr::from(([10, 0, 0, last], 80)), weight)
    }

    #[test]
    fn a_refresh_where_a_name_failed_keeps_every_endpoint_at_its_weight() {
        // The failing name gave .1 and .2 (weight 1); another entry, weight 5, names .2 and
        // now .3 as well.
        let mut found = vec![at(2, 5), at(3, 5)];
        keep(&mut found, [at(1, 1), at(2, 1)].into_iter());
        assert_eq!(found, [at(1, 1), at(2, 1), at(3, 5)]);
        // Nothing found at all: everything stays.
        let mut found = Vec::new();
        keep(&mut found, [at(1, 1), at(2, 1)].into_iter());
        assert_eq!(found, [at(1, 1), at(2, 1)]);
    }
}
