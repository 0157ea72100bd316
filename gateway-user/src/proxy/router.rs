//! Route matching: host, path prefix, method and headers to a cluster, and what the route
//! does to the request on its way (path rewrite, header rules) and how it is retried and timed
//! (its [`RoutePolicy`], the cluster's with the route's overrides).
//!
//! The most specific route wins, whatever the order in the file: an exact host beats a
//! wildcard (`*.example.com`, longer suffix first), which beats a route with no host; within
//! the same host, the longest path prefix wins; then a route with more conditions (methods,
//! headers) before one with fewer; ties keep file order. Routes are sorted once at build time,
//! so matching is a linear scan that stops at the first hit.

use std::sync::Arc;

use ipnet::IpNet;

use http::{HeaderMap, HeaderValue, Method};

use super::rate_limit::Limiter;
use crate::{
    config::{HeaderIs, HeaderMatch, HeaderRules, HostMatch, Route, RoutePolicy},
    decide::retry::RetryPolicy,
};

#[derive(Debug)]
pub(crate) struct CompiledRoute {
    pub name: Arc<str>,
    /// Its position in the config's route list.
    pub index: usize,
    pub host: Option<HostMatch>,
    pub prefix: String,
    /// `None`: any method.
    pub methods: Option<Vec<Method>>,
    pub headers: Vec<HeaderMatch>,
    /// Index into the runtime's cluster list.
    pub cluster: usize,
    /// What replaces `prefix` on the way upstream.
    pub rewrite: Option<String>,
    pub policy: RoutePolicy,
    /// The `Upgrade` protocols tunnelled on this route (its own, else its cluster's).
    pub upgrades: Vec<String>,
    /// `Some(port)`: plain HTTP requests are redirected to HTTPS on `port`.
    pub https_redirect: Option<u16>,
    /// `Some`: only clients in these blocks reach the route.
    pub allow_clients: Option<Arc<[IpNet]>>,
    /// The route's rate limit and its buckets (`rate_limit`), kept across reloads that leave
    /// the route's name and limit as they were.
    pub rate_limit: Option<Arc<Limiter>>,
    /// The decision knobs of `decide::retry`, from `policy`.
    pub retry: RetryPolicy,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
}

impl CompiledRoute {
    fn conditions(&self) -> usize {
        usize::from(self.methods.is_some()) + self.headers.len()
    }

    fn accepts(&self, method: &Method, headers: &HeaderMap) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
            && self.headers.iter().all(|h| {
                let v = headers.get(&h.name);
                match &h.is {
                    HeaderIs::Exactly(want) => v == Some(want),
                    HeaderIs::Present => v.is_some(),
                    HeaderIs::Absent => v.is_none(),
                }
            })
    }

    /// The path (and query) sent upstream for `path_and_query`, which starts with the
    /// route's prefix; `None` when the route does not rewrite. The prefix is replaced as
    /// written (as Envoy's `prefix_rewrite` and nginx's `proxy_pass` URI do), except that one
    /// `/` is dropped where the replacement ends with one and the rest starts with one
    /// (prefix `/api`, rewrite `/`: `/api/x` goes up as `/x`, not `//x`).
    pub fn rewritten(&self, path_and_query: &str) -> Option<String> {
        let to = self.rewrite.as_deref()?;
        let rest = path_and_query.get(self.prefix.len()..).unwrap_or("");
        let rest = match (to.ends_with('/'), rest.strip_prefix('/')) {
            (true, Some(r)) => r,
            _ => rest,
        };
        let mut out = String::with_capacity(to.len() + rest.len());
        out.push_str(to);
        out.push_str(rest);
        Some(out)
    }
}

/// Applies header rules: remove, then set, then add.
pub(crate) fn apply_rules(rules: &HeaderRules, headers: &mut HeaderMap) {
    if rules.is_empty() {
        return;
    }
    for name in &rules.remove {
        headers.remove(name);
    }
    for (name, value) in &rules.set {
        headers.insert(name, value.clone());
    }
    for (name, value) in &rules.add {
        headers.append(name, HeaderValue::clone(value));
    }
}

#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: Vec<Arc<CompiledRoute>>,
}

impl Router {
    /// `cluster_index` maps a cluster name to its index; validation guarantees it exists.
    #[cfg(test)]
    pub fn new(routes: &[Route], cluster_index: impl Fn(&str) -> Option<usize>) -> Router {
        Router::after(routes, cluster_index, None)
    }

    /// [`Router::new`], taking over from `previous` the rate limiters (and what their buckets
    /// hold) of routes whose name and `rate_limit` a reload left as they were.
    pub fn after(
        routes: &[Route],
        cluster_index: impl Fn(&str) -> Option<usize>,
        previous: Option<&Router>,
    ) -> Router {
        let limiter = |r: &Route| {
            let spec = r.rate_limit?;
            let kept = previous
                .into_iter()
                .flat_map(|p| &p.routes)
                .filter(|p| *p.name == *r.name)
                .find_map(|p| p.rate_limit.clone().filter(|l| l.spec == spec));
            Some(kept.unwrap_or_else(|| Arc::new(Limiter::new(spec))))
        };
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
                        methods: r.methods.clone(),
                        headers: r.headers.clone(),
                        cluster: cluster_index(&r.cluster)?,
                        rewrite: r.rewrite_prefix.clone(),
                        policy: r.policy,
                        upgrades: r.upgrades.clone(),
                        https_redirect: r.https_redirect,
                        allow_clients: r.allow_clients.clone(),
                        rate_limit: limiter(r),
                        retry: RetryPolicy::from(&r.policy.retry),
                        request_headers: r.request_headers.clone(),
                        response_headers: r.response_headers.clone(),
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
            (
                host_rank,
                usize::MAX - r.prefix.len(),
                usize::MAX - r.conditions(),
                *i,
            )
        });
        Router {
            routes: compiled.into_iter().map(|(_, r)| Arc::new(r)).collect(),
        }
    }

    /// `host` without port; `path` is the request path (query excluded).
    pub fn route(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<&Arc<CompiledRoute>> {
        self.routes.iter().find(|r| {
            r.host.as_ref().is_none_or(|h| h.matches(host))
                && path.starts_with(r.prefix.as_str())
                && r.accepts(method, headers)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoutePolicy {
        let d = std::time::Duration::from_secs(1);
        RoutePolicy {
            request_timeout: d,
            response_timeout: d,
            upgrade_idle_timeout: d,
            upgrade_max_duration: d,
            retry: crate::config::RetryPolicy {
                hedge: true,
                hedge_budget_percent: 10,
                max_retries: 2,
                on_response_timeout: false,
                on_reset: false,
                budget_percent: 20,
                min_retry_concurrency: 3,
                grpc_status_codes: Default::default(),
                status_codes: Default::default(),
            },
            request_buffering: true,
            max_request_body_bytes: None,
        }
    }

    fn route(host: Option<HostMatch>, prefix: &str, cluster: &str) -> Route {
        Route {
            name: format!("{cluster}{prefix}"),
            host,
            path_prefix: prefix.into(),
            cluster: cluster.into(),
            methods: None,
            headers: Vec::new(),
            rewrite_prefix: None,
            policy: policy(),
            upgrades: Vec::new(),
            https_redirect: None,
            allow_clients: None,
            rate_limit: None,
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
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
        r.route(host, path, &Method::GET, &HeaderMap::new())
            .map(|r| r.cluster)
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

    #[test]
    fn methods_and_headers_narrow_a_route_and_beat_the_same_prefix_without_them() {
        let mut canary = route(None, "/api", "canary");
        canary.headers = vec![HeaderMatch {
            name: http::HeaderName::from_static("x-canary"),
            is: HeaderIs::Exactly(HeaderValue::from_static("1")),
        }];
        let mut writes = route(None, "/api", "writes");
        writes.methods = Some(vec![Method::POST, Method::PUT]);
        let mut no_debug = route(None, "/api", "nodebug");
        no_debug.headers = vec![HeaderMatch {
            name: http::HeaderName::from_static("x-debug"),
            is: HeaderIs::Absent,
        }];
        // The plain route first in the file: conditions still win.
        let routes = vec![route(None, "/api", "api"), canary, writes, no_debug];
        let names = ["api", "canary", "writes", "nodebug"];
        let r = Router::new(&routes, |n| names.iter().position(|x| *x == n));
        let pick = |m: Method, h: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in h {
                map.insert(*k, HeaderValue::from_static(v));
            }
            r.route("x", "/api/v", &m, &map).map(|r| r.cluster)
        };
        assert_eq!(pick(Method::GET, &[("x-canary", "1")]), Some(1));
        assert_eq!(pick(Method::GET, &[("x-canary", "2")]), Some(3));
        assert_eq!(pick(Method::POST, &[]), Some(2));
        assert_eq!(pick(Method::GET, &[("x-debug", "1")]), Some(0));
    }

    #[test]
    fn prefixes_are_rewritten_on_segment_boundaries() {
        let mut r = route(None, "/api/", "api");
        r.rewrite_prefix = Some("/".into());
        let c = &Router::new(&[r], |_| Some(0)).routes[0];
        assert_eq!(c.rewritten("/api/users?x=1").as_deref(), Some("/users?x=1"));
        assert_eq!(c.rewritten("/api/").as_deref(), Some("/"));
        let mut r = route(None, "/api", "api");
        r.rewrite_prefix = Some("/v2".into());
        let c = &Router::new(&[r], |_| Some(0)).routes[0];
        assert_eq!(c.rewritten("/api/users").as_deref(), Some("/v2/users"));
        assert_eq!(c.rewritten("/api?q").as_deref(), Some("/v2?q"));
        assert_eq!(c.rewritten("/apix").as_deref(), Some("/v2x"));
        let mut r = route(None, "/api", "api");
        r.rewrite_prefix = Some("/".into());
        let c = &Router::new(&[r], |_| Some(0)).routes[0];
        assert_eq!(c.rewritten("/api/x").as_deref(), Some("/x"));
        let mut r = route(None, "/old/", "api");
        r.rewrite_prefix = Some("/new/".into());
        let c = &Router::new(&[r], |_| Some(0)).routes[0];
        assert_eq!(c.rewritten("/old/a/b").as_deref(), Some("/new/a/b"));
    }

    #[test]
    fn header_rules_remove_then_set_then_add() {
        let rules = HeaderRules {
            remove: vec![http::HeaderName::from_static("x-secret")],
            set: vec![(
                http::HeaderName::from_static("x-env"),
                HeaderValue::from_static("prod"),
            )],
            add: vec![(
                http::HeaderName::from_static("x-tag"),
                HeaderValue::from_static("b"),
            )],
        };
        let mut h = HeaderMap::new();
        h.insert("x-secret", HeaderValue::from_static("s"));
        h.insert("x-env", HeaderValue::from_static("dev"));
        h.insert("x-tag", HeaderValue::from_static("a"));
        apply_rules(&rules, &mut h);
        assert!(h.get("x-secret").is_none());
        assert_eq!(h["x-env"], "prod");
        let tags: Vec<_> = h.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
    }
}
