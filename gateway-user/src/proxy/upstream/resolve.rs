//! Endpoint addresses: `ip:port` entries as written, `host:port` entries resolved at start and
//! again every `dns_refresh_ms`. A refresh keeps the endpoints (their pools, health and
//! metrics) whose address and weight are still there, and builds the new ones. A new address
//! (a backend scaled up) starts its slow start's ramp, as one back from an ejection does:
//! its caches and JIT are as cold.

use std::{
    net::SocketAddr,
    sync::{Arc, Weak},
};

use tracing::{info, warn};

use super::{Cluster, Endpoint};
use crate::config::{ClusterSpec, EndpointAddr};

/// Every endpoint address of the spec, `host:port` entries resolved now.
pub(crate) async fn resolve(spec: &ClusterSpec) -> Vec<(SocketAddr, u32)> {
    let mut out = Vec::new();
    for e in &spec.endpoints {
        match &e.address {
            EndpointAddr::Ip(a) => out.push((*a, e.weight)),
            EndpointAddr::Host { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => out.extend(addrs.map(|a| (a, e.weight))),
                    Err(err) => {
                        warn!(cluster = %spec.name, endpoint = %e.address, error = %err, "cannot resolve endpoint; retrying every dns_refresh_ms")
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup_by_key(|(a, _)| *a);
    out
}

/// Whether the spec names any endpoint by host name (and so needs [`refresh`]).
pub(crate) fn has_host_names(spec: &ClusterSpec) -> bool {
    spec.endpoints
        .iter()
        .any(|e| matches!(e.address, EndpointAddr::Host { .. }))
}

/// Re-resolves every `dns_refresh` until the cluster is dropped.
pub(crate) async fn refresh(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => c.spec.dns_refresh,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        let addrs = resolve(&c.spec).await;
        let current = c.set.list();
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
        info!(cluster = %c.name, endpoints = endpoints.len(), "endpoints re-resolved");
        let gone: Vec<_> = current
            .into_iter()
            .filter(|e| !endpoints.iter().any(|n| Arc::ptr_eq(n, e)))
            .collect();
        c.set.replace(endpoints);
        for e in gone {
            e.close();
        }
    }
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
