//! Route matching: host and path prefix to a cluster.
//!
//! The most specific route wins, whatever the order in the file: an exact host beats a
//! wildcard (`*.example.com`, longer suffix first), which beats a route with no host; within
//! the same host, the longest path prefix wins; ties keep file order. Routes are sorted once
//! at build time, so matching is a linear scan that stops at the first hit.

use std::sync::Arc;

use crate::config::{HostMatch, Route};

#[derive(Debug)]
pub(crate) struct CompiledRoute {
    pub name: Arc<str>,
    /// Its position in the config's route list.
    pub index: usize,
    pub host: Option<HostMatch>,
    pub prefix: String,
    /// Index into the runtime's cluster list.
    pub cluster: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: Vec<CompiledRoute>,
}

impl Router {
    /// `cluster_index` maps a cluster name to its index; validation guarantees it exists.
    pub fn new(routes: &[Route], cluster_index: impl Fn(&str) -> Option<usize>) -> Router {
        let mut compiled: Vec<(usize, CompiledRoute)> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                Some((
                    i,
                    CompiledRoute {
                        name: Arc::from(r.name.as_str()),
                        index: i,
                        host: r.host.clone(),
                        prefix: r.path_prefix.clone(),
                        cluster: cluster_index(&r.cluster)?,
                    },
                ))
            })
            .collect();
        compiled.sort_by_key(|(i, r)| {
            let host_rank = match &r.host {
                Some(HostMatch::Exact(_)) => (0, 0),
                Some(HostMatch::Suffix(s)) => (1, usize::MAX - s.len()),
                None => (2, 0),
            };
            (host_rank, usize::MAX - r.prefix.len(), *i)
        });
        Router {
            routes: compiled.into_iter().map(|(_, r)| r).collect(),
        }
    }

    /// `host` without port; `path` is the request path (query excluded).
    pub fn route(&self, host: &str, path: &str) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| {
            r.host.as_ref().is_none_or(|h| h.matches(host)) && path.starts_with(r.prefix.as_str())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<HostMatch>, prefix: &str, cluster: &str) -> Route {
        Route {
            name: format!("{cluster}{prefix}"),
            host,
            path_prefix: prefix.into(),
            cluster: cluster.into(),
        }
    }

    fn router() -> Router {
        let routes = vec![
            route(None, "/", "fallback"),
            route(None, "/api", "api"),
            route(None, "/api/v2", "api2"),
            route(Some(HostMatch::Suffix(".example.com".into())), "/", "wild"),
            route(
                Some(HostMatch::Exact("admin.example.com".into())),
                "/",
                "admin",
            ),
        ];
        let names = ["fallback", "api", "api2", "wild", "admin"];
        Router::new(&routes, |n| names.iter().position(|x| *x == n))
    }

    fn cluster_of(r: &Router, host: &str, path: &str) -> Option<usize> {
        r.route(host, path).map(|r| r.cluster)
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router();
        assert_eq!(cluster_of(&r, "x", "/api/v2/users"), Some(2));
        assert_eq!(cluster_of(&r, "x", "/api/v1/users"), Some(1));
        assert_eq!(cluster_of(&r, "x", "/other"), Some(0));
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any() {
        let r = router();
        assert_eq!(cluster_of(&r, "admin.example.com", "/api"), Some(4));
        assert_eq!(cluster_of(&r, "ADMIN.example.com", "/"), Some(4));
        assert_eq!(cluster_of(&r, "shop.example.com", "/api"), Some(3));
        assert_eq!(cluster_of(&r, "example.com", "/api"), Some(1));
    }

    #[test]
    fn no_match_is_none() {
        let routes = vec![route(None, "/api", "api")];
        let r = Router::new(&routes, |_| Some(0));
        assert_eq!(cluster_of(&r, "x", "/"), None);
    }
}
