//! `[[routes]]`: each route checked against the clusters that exist, its host and path prefix
//! parsed, its name defaulted; with none written, one route sends everything to `default`.

use std::collections::BTreeMap;

use super::{
    super::{
        model::Config,
        settings::{ClusterSpec, Route},
        source::KeyPath,
    },
    Checker, Invalid,
    addresses::parse_host,
};

/// The routes in the order written (problems go to `c`).
pub(super) fn routes(
    c: &mut Checker,
    cfg: &Config,
    clusters: &BTreeMap<String, ClusterSpec>,
) -> Vec<Route> {
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
    routes
}
