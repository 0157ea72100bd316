//! What every request and connection shares ([`Shared`]), and one config generation
//! ([`Runtime`]: routes, clusters, route meters, the client-side HTTP settings). Requests take
//! the current generation from an `ArcSwap` once, at arrival, so a reload never disturbs a
//! request in flight and never makes a new one wait.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};

use super::{
    access_log::AccessLogger,
    admission::{Admission, ListenerGate},
    request_body::Budget,
    resets,
    router::Router,
    telemetry::{RouteMeter, Telemetry},
    upstream::Cluster,
};
use crate::{
    config::{Downstream, Settings},
    signals::SignalSource,
};

/// Where the gateway is in its life, as every connection (and upgraded connection) watches
/// it: see `server`'s module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Run,
    /// Still accepting; keep-alive ends after each response (see the module doc).
    Deregister,
    Drain,
    Force,
}

impl Phase {
    pub fn accepting(self) -> bool {
        matches!(self, Phase::Run | Phase::Deregister)
    }
}

/// What a connection's drain is: the phase to watch, and its place among the live
/// connections (a clone of a sender nobody sends on; the drain waits until all are gone).
/// An upgraded connection takes a clone, so that the drain waits for it too.
#[derive(Clone)]
pub(crate) struct Drain {
    pub phase: tokio::sync::watch::Receiver<Phase>,
    #[expect(dead_code, reason = "held, never sent on: its drop tells the drain")]
    pub live: tokio::sync::mpsc::Sender<()>,
}

pub(crate) struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub signals: Arc<dyn SignalSource>,
    pub log: AccessLogger,
    pub draining: AtomicBool,
    /// The drain's grace period ran out: the gateway closes what is still open, and what that
    /// cuts short is `shutdown`, not the client's doing.
    pub forced: AtomicBool,
    /// Keep-alive is over (the drain delay, a drain, a binary upgrade): HTTP/1 responses carry
    /// `Connection: close`, so that clients reconnect, elsewhere once deregistered.
    pub keepalive_off: AtomicBool,
    /// Worker count, i.e. idle-pool shards per endpoint.
    pub workers: usize,
    pub telemetry: Telemetry,
    /// `max_client_connections`: the open client connections.
    pub admission: Admission,
    /// Each client listener address's accept rate limit and counters.
    pub gates: Vec<Arc<ListenerGate>>,
    /// What request bodies read ahead and kept for retries hold, over all requests
    /// (`request_buffering_memory_bytes`).
    pub body_budget: Arc<Budget>,
    pub fatal: Fatal,
    /// Set when a binary upgrade's new process serves: the admin listener stops accepting,
    /// and the handed-over socket is the new process's alone.
    pub admin_handed_over: tokio::sync::watch::Sender<bool>,
}

/// A worker that died: a panic at its top level or in one of its accept loops, which the
/// panic hook logged. Its socket would stay in the kernel's `SO_REUSEPORT` group, where a
/// share of the new connections would wait with nobody accepting them, while `/readyz` said
/// 200. `gateway run` drains instead, and exits non-zero for its service manager to restart it.
#[derive(Default)]
pub(crate) struct Fatal {
    reason: std::sync::Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Fatal {
    /// Records the first failure, and wakes [`Fatal::wait`] (now or when it comes).
    pub fn set(&self, reason: String) {
        let mut r = self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.get_or_insert(reason);
        self.notify.notify_one();
    }

    /// The first failure, once there is one.
    pub async fn wait(&self) -> String {
        loop {
            self.notify.notified().await;
            let r = self
                .reason
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
        }
    }
}

impl Shared {
    /// See [`Shared::forced`].
    pub fn drain_forced(&self) -> bool {
        self.forced.load(Ordering::Relaxed)
    }

    /// The gate of the listener bound to `addr`.
    pub fn gate(&self, addr: std::net::SocketAddr) -> Arc<ListenerGate> {
        match self.gates.iter().find(|g| g.addr == addr) {
            Some(g) => g.clone(),
            None => Arc::new(ListenerGate::new(addr, &self.admission)),
        }
    }
}

/// The routes and clusters of one config generation.
pub(crate) struct Runtime {
    pub settings: Settings,
    pub router: Router,
    pub clusters: Vec<Arc<Cluster>>,
    /// By the route's position in the config ([`super::router::CompiledRoute::index`]).
    pub route_meters: Vec<Arc<RouteMeter>>,
    pub http: Arc<auto::Builder<TokioExecutor>>,
    /// HTTP/1 alone, with the same settings: plain HTTP/1 client connections, which are
    /// parked while idle (`server::park`) and so need hyper's HTTP/1 connection itself.
    pub http1: Arc<http1::Builder>,
}

impl Runtime {
    /// Builds a generation, keeping the running clusters (their pools and health) whose
    /// settings did not change.
    pub async fn build(
        settings: Settings,
        previous: Option<&Runtime>,
        signals: &Arc<dyn SignalSource>,
        workers: usize,
        telemetry: &Telemetry,
    ) -> Runtime {
        // All at once: a cluster's start waits for its names' lookups (up to 5 s each, with a
        // DNS server that does not answer), and one after another a reload that changes k
        // such clusters held the reload, and the signals behind it, for 5k s.
        let clusters = join_all(settings.clusters.values().map(|spec| async move {
            if let Some(kept) = previous.and_then(|p| p.clusters.iter().find(|c| c.spec == *spec)) {
                return kept.clone();
            }
            let meter = telemetry.cluster(&spec.name);
            let replaced = previous.and_then(|p| p.clusters.iter().find(|c| *c.name == *spec.name));
            Cluster::start(
                spec.clone(),
                signals.clone(),
                (workers, meter),
                replaced.map(|c| &**c),
            )
            .await
        }))
        .await;
        let router = Router::after(
            &settings.routes,
            |name| clusters.iter().position(|c| &*c.name == name),
            previous.map(|p| &p.router),
        );
        let client_certs = settings
            .clusters
            .values()
            .filter_map(|c| c.tls.as_deref())
            .flat_map(|t| t.certificates.iter());
        let server_certs = settings
            .https
            .iter()
            .flat_map(|h| h.tls.certificates.iter());
        telemetry.tls.certificates(server_certs.chain(client_certs));
        let route_meters = settings
            .routes
            .iter()
            .map(|r| Arc::new(telemetry.route(&r.name, &r.cluster)))
            .collect();
        Runtime {
            http: Arc::new(http_builder(&settings.downstream)),
            http1: Arc::new(http1_builder(&settings.downstream)),
            route_meters,
            router,
            clusters,
            settings,
        }
    }
}

/// hyper's own limit on a request head: a backstop well above ours, so that most oversized
/// heads reach the service and get a 431 that explains itself.
fn hard_limit(ds: &Downstream) -> usize {
    (ds.max_request_header_bytes * 2 + 8192).max(8192)
}

/// The HTTP server settings for client connections.
fn http_builder(ds: &Downstream) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let hard_limit = hard_limit(ds);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ds.header_read_timeout)
        .max_buf_size(hard_limit.max(64 * 1024))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(hard_limit).unwrap_or(u32::MAX))
        .max_concurrent_streams(ds.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(resets::pending_accept_limit(
            ds.http2_premature_resets,
            ds.http2_max_concurrent_streams,
        ))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// The HTTP/1 settings of [`http_builder`], for a connection known to speak HTTP/1.
///
/// Without hyper's header-read timeout: `server::park` enforces it on these connections. hyper
/// arms its timer anew for every head (a clock read, a boxed tokio `Sleep`, its registration
/// and removal: about 700 instructions per keep-alive request, `bench instructions`), where
/// the connection's own park check, already due every `PARK_AFTER` or sooner, needs none.
fn http1_builder(ds: &Downstream) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(hard_limit(ds).max(64 * 1024))
        .keep_alive(true);
    b
}
