//! Every target resolved at once, each timed: `host:port` names through getaddrinfo
//! ([`super::target`]), cluster names through a running gateway's `/status` (`--admin`,
//! [`super::admin`]).

use std::{net::SocketAddr, time::Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;

use super::{
    DiagnoseArgs, admin,
    measure::{Resolution, ResolutionMethod},
    target::{self, Host, Target},
};

/// One target, resolved: what to connect to.
pub(super) struct Resolved {
    pub label: String,
    pub resolution: Resolution,
    pub addrs: Vec<SocketAddr>,
    /// `Host` header for `--http`.
    pub host_header: String,
    /// For a cluster target: the gateway's view of it.
    pub gateway: Option<admin::GatewayView>,
    pub started: Instant,
    pub resolved: Instant,
}

/// Resolves every target at once: names through getaddrinfo, clusters through `--admin`.
pub(super) async fn resolve_all(args: &DiagnoseArgs) -> anyhow::Result<Vec<Resolved>> {
    let mut set = JoinSet::new();
    for (i, t) in args.targets.iter().cloned().enumerate() {
        let admin = args.admin;
        set.spawn(async move {
            let started = Instant::now();
            let label = t.to_string();
            let r = match t {
                Target::Endpoint { host, port } => {
                    let resolution = target::resolve(&host).await;
                    let addrs = target::socket_addrs(&resolution.addresses, port);
                    let host_header = match &host {
                        Host::Ip(_) => format!("{host}:{port}"),
                        Host::Name(n) => format!("{n}:{port}"),
                    };
                    Resolved {
                        label,
                        resolution,
                        addrs,
                        host_header,
                        gateway: None,
                        started,
                        resolved: Instant::now(),
                    }
                }
                Target::Cluster(name) => {
                    let admin = admin.expect("checked in run()");
                    let view = admin::cluster_view(admin, &name).await?;
                    let addrs = view.addresses();
                    Resolved {
                        gateway: Some(view),
                        host_header: addrs[0].to_string(),
                        resolution: Resolution {
                            host: name,
                            method: ResolutionMethod::Admin,
                            elapsed_us: started.elapsed().as_micros() as u64,
                            addresses: addrs.iter().map(SocketAddr::ip).collect(),
                            error: None,
                        },
                        label,
                        addrs,
                        started,
                        resolved: Instant::now(),
                    }
                }
            };
            Ok::<_, admin::AdminError>((i, r))
        });
    }
    let mut out: Vec<Option<Resolved>> = args.targets.iter().map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, r) = joined.context("a resolver task failed")??;
        out[i] = Some(r);
    }
    Ok(out.into_iter().flatten().collect())
}
