//! A route's own gates, checked once a request is routed and before anything of it is read or
//! sent: who may use the route (`allow_clients`), whether it must come over HTTPS
//! (`https_redirect`), and how often (`rate_limit`), in that order: a client that may not
//! use the route learns nothing more of it.

use http::{HeaderValue, request::Parts};
use tokio::time::Instant;

use super::{
    Client,
    redirect::{self, Instead},
};
use crate::proxy::{
    error::ProxyError,
    exchange::Exchange,
    forwarded::{self, Peer},
    rate_limit::{Limiter, Verdict},
    router::CompiledRoute,
};

/// `Ok` when the request may go on to its upstream. The client checked is the one a trusted
/// proxy names (`ex.record.forwarded_client`), else the peer.
pub(super) fn check(
    route: &CompiledRoute,
    (client, peer): (&Client, Peer),
    parts: &Parts,
    authority: Option<&HeaderValue>,
    ex: &Exchange,
) -> Result<(), Instead> {
    let ip = ex.record.forwarded_client.unwrap_or(client.addr.ip());
    if let Some(allowed) = &route.allow_clients
        && !forwarded::within(allowed, ip)
    {
        let client = ip.to_canonical();
        return Err(ProxyError::ClientNotAllowed { client }.into());
    }
    if let Some(port) = route.https_redirect
        && client.tls.is_none()
        && !forwarded::says_https(peer, &parts.headers)
    {
        let to = redirect::to_https(port, &parts.method, authority, &parts.uri)?;
        return Err(Instead::Redirect(to));
    }
    if let Some(limiter) = &route.rate_limit {
        match limiter.check(ip, Instant::now()) {
            Verdict::Pass => {}
            Verdict::Limited(retry_after) => {
                return Err(ProxyError::RateLimited { retry_after }.into());
            }
            Verdict::Untracked => untracked(ex, limiter),
        }
    }
    Ok(())
}

/// A client the route's full table of buckets could not take passes uncounted: counted, and
/// logged at most every 10 s per route.
fn untracked(ex: &Exchange, limiter: &Limiter) {
    if let Some(meter) = &ex.meter {
        meter.rate_limit_untracked();
    }
    if let Some(suppressed) = limiter.full_log.due() {
        tracing::warn!(
            route = ex.record.route.as_deref().unwrap_or("-"),
            max_clients = limiter.spec.max_clients,
            suppressed,
            "rate_limit: every client slot holds a client ahead of the rate; new clients pass unlimited (gateway_rate_limit_untracked_total)"
        );
    }
}
