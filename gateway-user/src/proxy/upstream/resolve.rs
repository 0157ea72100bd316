//! Endpoint addresses: `ip:port` entries as written, `host:port` entries resolved at start and
//! again every `dns_refresh_ms`. A refresh keeps the endpoints (their pools, health and
//! metrics) whose address and weight are still there, and builds the new ones. A name that
//! does not resolve keeps the addresses it last resolved to ([`Names`]). A new address (a
//! backend scaled up) starts its slow start's ramp, as one back from an ejection does: its
//! caches and JIT are as cold.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{Cluster, cluster::successor};
use crate::config::{ClusterSpec, EndpointAddr};

/// One resolution of a spec's endpoints.
pub(crate) struct Resolved {
    /// Every address, sorted, each once, with its entry's weight (the lower of two entries').
    pub addrs: Vec<(SocketAddr, u32)>,
    /// By entry in the spec: what its name resolved to, or why it did not; `None` for an
    /// address entry.
    pub names: Vec<Option<Result<Vec<SocketAddr>, io::Error>>>,
}

impl Resolved {
    /// How many names did not resolve.
    pub(crate) fn failures(&self) -> usize {
        self.names
            .iter()
            .filter(|n| matches!(n, Some(Err(_))))
            .count()
    }
}

/// How long one name's lookup may take before it counts as failed (and keeps the addresses
/// it had). glibc's resolver alone may take `timeout × attempts` per server (5 s × 2 by
/// default): a DNS server that stops answering would hold a start or a reload (and a
/// `SIGTERM` behind it) that long for each name in turn.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether each entry's lookup is still running (by entry in the spec). glibc's resolver
/// blocks a thread for as long as it waits (`timeout × attempts` per server), past
/// [`LOOKUP_TIMEOUT`]: a name whose last lookup has not returned is not looked up again, so
/// that a silent DNS server holds one thread per name, not one more every refresh.
pub(crate) struct Lookups(Vec<Arc<AtomicBool>>);

impl Lookups {
    pub(crate) fn new(spec: &ClusterSpec) -> Lookups {
        Lookups(spec.endpoints.iter().map(|_| Arc::default()).collect())
    }
}

/// One entry's part in a resolution.
enum Lookup {
    /// An address entry: nothing to look up.
    Address,
    /// A name whose last lookup ran out of time and still waits: not looked up again.
    StillWaiting,
    /// A name looked up now, in a task of its own, which frees the name when the lookup
    /// returns (even after [`LOOKUP_TIMEOUT`], when nobody waits for it any more).
    Started(tokio::task::JoinHandle<io::Result<Vec<SocketAddr>>>),
}

/// Every endpoint address of the spec, `host:port` entries resolved now, all at once, within
/// [`LOOKUP_TIMEOUT`] in all.
pub(crate) async fn resolve(spec: &ClusterSpec, lookups: &Lookups) -> Resolved {
    let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
    let started: Vec<Lookup> = spec
        .endpoints
        .iter()
        .zip(&lookups.0)
        .map(|(e, running)| match &e.address {
            EndpointAddr::Ip(_) => Lookup::Address,
            EndpointAddr::Host { .. } if running.swap(true, Ordering::AcqRel) => {
                Lookup::StillWaiting
            }
            EndpointAddr::Host { host, port } => {
                let (host, port, running) = (host.clone(), *port, running.clone());
                Lookup::Started(tokio::spawn(async move {
                    let found = tokio::net::lookup_host((host, port)).await;
                    running.store(false, Ordering::Release);
                    found.map(Iterator::collect::<Vec<_>>)
                }))
            }
        })
        .collect();
    let timed_out = |still: &str| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s{still}", LOOKUP_TIMEOUT.as_secs()),
        )
    };
    let mut addrs = Vec::new();
    let mut names = Vec::with_capacity(spec.endpoints.len());
    for (e, lookup) in spec.endpoints.iter().zip(started) {
        let found = match lookup {
            Lookup::Address => {
                if let EndpointAddr::Ip(a) = e.address {
                    addrs.push((a, e.weight));
                }
                names.push(None);
                continue;
            }
            Lookup::StillWaiting => Err(timed_out(" (the lookup still waits)")),
            Lookup::Started(task) => match tokio::time::timeout_at(deadline, task).await {
                Ok(joined) => joined.unwrap_or_else(|e| Err(io::Error::other(e))),
                Err(_) => Err(timed_out("")),
            },
        };
        if let Ok(found) = &found {
            addrs.extend(found.iter().map(|a| (*a, e.weight)));
        }
        names.push(Some(found));
    }
    merge(&mut addrs, std::iter::empty());
    Resolved { addrs, names }
}

/// Adds `more` to `addrs`, then sorts them and keeps each address once, at the lower weight
/// of two entries that name it.
fn merge(addrs: &mut Vec<(SocketAddr, u32)>, more: impl Iterator<Item = (SocketAddr, u32)>) {
    addrs.extend(more);
    addrs.sort();
    addrs.dedup_by_key(|(a, _)| *a);
}

/// Each host-name entry of a cluster at its latest resolution: by entry in the spec, `None`
/// for an address entry. A name that does not resolve (a DNS server timing out, `SERVFAIL`,
/// the name gone) keeps the addresses it last resolved to, at its entry's weight: a DNS
/// outage must not empty a cluster that was serving (Envoy's DNS clusters and HAProxy's
/// `hold` keep the last addresses too). `/status` shows it.
pub(crate) struct Names(Mutex<Vec<Option<NameState>>>);

/// A host-name entry at its latest resolution.
#[derive(Clone)]
pub(crate) struct NameState {
    /// Why it did not resolve; `None`: it did.
    pub error: Option<String>,
    /// Since when it has resolved (or has not).
    pub since: SystemTime,
    /// What it resolved to last: the addresses it keeps while it does not resolve.
    pub addresses: Vec<SocketAddr>,
}

/// What a resolution changed in a name, for its log line.
enum Change {
    Failing(String),
    Resolves,
}

impl Names {
    /// The names as the start-up resolution found them, and `resolved` completed with the
    /// addresses of those that did not resolve. `previous`: the cluster of the same name this
    /// one replaces (a reload), whose state an unchanged entry carries on: a reload that
    /// changes the cluster's settings during a DNS outage keeps the addresses the name had,
    /// and its outage's start. Logs each name that does not resolve, unless it already did
    /// not before the reload.
    pub(crate) fn at_start(
        spec: &ClusterSpec,
        resolved: &mut Resolved,
        previous: Option<&Cluster>,
    ) -> Names {
        let was = previous.map(|p| (p, p.names.snapshot()));
        let before = |address: &EndpointAddr| {
            let (p, names) = was.as_ref()?;
            let i = p
                .spec
                .endpoints
                .iter()
                .position(|e| e.address == *address)?;
            names.get(i).cloned().flatten()
        };
        let now = SystemTime::now();
        let mut names = Vec::with_capacity(spec.endpoints.len());
        let mut kept = Vec::new();
        for (e, found) in spec.endpoints.iter().zip(&resolved.names) {
            names.push(match found {
                None => None,
                Some(Ok(addresses)) => Some(NameState {
                    error: None,
                    since: before(&e.address)
                        .filter(|b| b.error.is_none())
                        .map_or(now, |b| b.since),
                    addresses: addresses.clone(),
                }),
                Some(Err(err)) => {
                    let b = before(&e.address);
                    if b.as_ref().is_none_or(|b| b.error.is_none()) {
                        warn!(cluster = %spec.name, endpoint = %e.address, error = %err, "cannot resolve endpoint; retrying every dns_refresh_ms");
                    }
                    let addresses = b.as_ref().map(|b| b.addresses.clone()).unwrap_or_default();
                    kept.extend(addresses.iter().map(|a| (*a, e.weight)));
                    Some(NameState {
                        error: Some(err.to_string()),
                        since: b.filter(|b| b.error.is_some()).map_or(now, |b| b.since),
                        addresses,
                    })
                }
            });
        }
        if !kept.is_empty() {
            info!(cluster = %spec.name, kept = kept.len(), "names that do not resolve keep the addresses they had before the reload");
            merge(&mut resolved.addrs, kept.into_iter());
        }
        Names(Mutex::new(names))
    }

    /// By entry in the spec, `None` for an address entry.
    pub(crate) fn snapshot(&self) -> Vec<Option<NameState>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a refresh's resolution, and completes `resolved` with the last addresses of
    /// the names that did not resolve, at their entries' weights. Logs the names that started
    /// failing and those that resolve again, not those that go on as they were (the lock is
    /// not held while logging).
    fn record(&self, spec: &ClusterSpec, resolved: &mut Resolved) {
        let mut changes = Vec::new();
        let mut kept = Vec::new();
        {
            let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
            for (i, (name, found)) in names.iter_mut().zip(&resolved.names).enumerate() {
                let (Some(name), Some(found)) = (name, found) else {
                    continue;
                };
                match found {
                    Ok(addresses) => {
                        if name.error.take().is_some() {
                            name.since = SystemTime::now();
                            changes.push((i, Change::Resolves));
                        }
                        name.addresses.clone_from(addresses);
                    }
                    Err(err) => {
                        let err = err.to_string();
                        if name.error.is_none() {
                            name.since = SystemTime::now();
                            changes.push((i, Change::Failing(err.clone())));
                        }
                        // The latest reason, whether or not it changed (a timeout may become
                        // NXDOMAIN); logged only when the name starts failing.
                        name.error = Some(err);
                        let weight = spec.endpoints[i].weight;
                        kept.extend(name.addresses.iter().map(|a| (*a, weight)));
                    }
                }
            }
        }
        merge(&mut resolved.addrs, kept.into_iter());
        for (i, change) in changes {
            let endpoint = &spec.endpoints[i].address;
            match change {
                Change::Failing(error) => {
                    warn!(cluster = %spec.name, %endpoint, %error, "cannot resolve endpoint; keeping its last addresses, retrying every dns_refresh_ms");
                }
                Change::Resolves => {
                    info!(cluster = %spec.name, %endpoint, "endpoint resolves again")
                }
            }
        }
    }
}

/// Whether the spec names any endpoint by host name (and so needs [`refresh`]).
pub(crate) fn has_host_names(spec: &ClusterSpec) -> bool {
    spec.endpoints
        .iter()
        .any(|e| matches!(e.address, EndpointAddr::Host { .. }))
}

/// Re-resolves every `dns_refresh` until the cluster is dropped or retired. A name that does not resolve
/// keeps the addresses it last resolved to ([`Names`]); it is logged when it starts failing
/// and when it resolves again, not at every refresh, and counted at every one
/// (`gateway_dns_resolution_failures_total`).
pub(crate) async fn refresh(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => c.spec.dns_refresh,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = super::cluster::live(&cluster) else {
            return;
        };
        let mut resolved = resolve(&c.spec, &c.lookups).await;
        // Retired during the lookups: the successor resolves for itself.
        if c.retired() {
            return;
        }
        c.names.record(&c.spec, &mut resolved);
        c.meter.dns_names_unresolved(resolved.failures());
        let addrs = resolved.addrs;
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
                    .unwrap_or_else(|| successor(c.new_endpoint(a, w), &current, true))
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
        {
            // Not between another thread's check of the ejection budget and its ejection.
            let _one_at_a_time = c.ejecting.lock().unwrap_or_else(|p| p.into_inner());
            c.set.replace(endpoints);
        }
        for e in gone {
            e.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(last: u8, weight: u32) -> (SocketAddr, u32) {
        (SocketAddr::from(([10, 0, 0, last], 80)), weight)
    }

    #[test]
    fn an_address_two_entries_name_is_kept_once_at_the_lower_weight() {
        // A name that did not resolve keeps .1 and .2 at its weight, 1; another entry, weight
        // 5, names .2 and .3.
        let mut found = vec![at(2, 5), at(3, 5)];
        merge(&mut found, [at(1, 1), at(2, 1)].into_iter());
        assert_eq!(found, [at(1, 1), at(2, 1), at(3, 5)]);
        let mut found = Vec::new();
        merge(&mut found, [at(2, 1), at(1, 1), at(2, 1)].into_iter());
        assert_eq!(found, [at(1, 1), at(2, 1)]);
    }
}
