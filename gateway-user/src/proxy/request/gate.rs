//! A route's own gates, checked once a request is routed and before anything of it is read or
//! sent: who may use the route (`allow_clients`), whether it must come over HTTPS
//! (`https_redirect`), and how often (`rate_limit`), in that order: a client that may not
//! use the route is neither redirected nor counted against its rate.

use http::{HeaderValue, request::Parts};
use tokio::time::Instant;

use super::{
    Client,
    redirect::{self, Instead},
};
use crate::proxy::{
    error::ProxyError,
    exchange::Exchange,
    forwarded::{self, Peer, Source},
    headers::Scheme,
    rate_limit::{Limiter, Verdict},
    router::CompiledRoute,
};

/// `Ok` when the request may go on to its upstream. `source`: the client checked, the one a
/// trusted proxy names or else the peer. One a trusted proxy's list does not name is allowed
/// by no `allow_clients`, and shares the proxy's own bucket of a `rate_limit`.
pub(super) fn check(
    route: &CompiledRoute,
    (client, peer, source): (&Client, Peer, Source),
    parts: &Parts,
    authority: Option<&HeaderValue>,
    ex: &Exchange,
) -> Result<(), Instead> {
    if let Some(allowed) = &route.allow_clients
        && !source.ip().is_some_and(|ip| forwarded::within(allowed, ip))
    {
        let client = source.ip().map_or_else(
            || "unknown (its trusted proxy's X-Forwarded-For names none)".to_owned(),
            |ip| ip.to_string(),
        );
        return Err(ProxyError::ClientNotAllowed { client }.into());
    }
    // Over HTTPS already: on an HTTPS listener, or to a load balancer that ended the TLS and
    // says so in its PROXY protocol header (`scheme`), or per a trusted proxy's header.
    if let Some(port) = route.https_redirect
        && client.scheme != Scheme::Https
        && forwarded::proto(peer, &parts.headers).is_none_or(|p| p != "https")
    {
        let to = redirect::to_https(port, &parts.method, authority, &parts.uri)?;
        return Err(Instead::Redirect(to));
    }
    if let Some(limiter) = &route.rate_limit {
        let ip = source.ip().unwrap_or(client.addr.ip());
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
