//! One request, in order: route → pick an endpoint → one attempt (connect or reuse, send,
//! await the response head) → on failure, `decide::retry::next_step` says whether to try
//! again elsewhere → respond (the upstream's response, or the gateway's error that explains
//! itself).
//!
//! | step | where |
//! |---|---|
//! | limits, routing, header rewrite | [`prepare`] |
//! | the start of the body, before any upstream is asked | [`read_ahead`] |
//! | pick | [`pick`] (the cluster's balancer, skipping endpoints this request tried) |
//! | connect or reuse, send, await the head | [`attempt`] |
//! | retry or not | [`forward`], by `decide::retry` |
//! | respond | [`respond`] |
//!
//! Timeouts, each named in the config: `connect_timeout_ms` bounds each TCP connect (the
//! adaptive deadline below it, in `upstream::connect`), `response_timeout_ms` runs from the end
//! of the request body to the response head (and between reads of the response body, in
//! `response_body`), `write_timeout_ms` bounds a stalled write (in `io`), and
//! `request_timeout_ms` bounds the whole, all attempts included (a gRPC call's `grpc-timeout`,
//! when shorter, replaces it). A route may override the response and request timeouts, and
//! the retries and hedging (its `RoutePolicy`). A `101` hands the connection to `tunnel`.

mod affinity;
mod attempt;
mod deadline;
mod gate;
mod look;
mod prepare;
mod read_ahead;
mod redirect;
mod replay;
mod respond;
mod retryable;
mod target;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

pub use self::respond::{X_GATEWAY_ATTEMPTS, X_GATEWAY_ENDPOINT, X_GATEWAY_ERROR};
use self::{
    attempt::Failed, deadline::Deadline, prepare::Prepared, redirect::Instead, replay::Replay,
};
use super::{
    error::{ErrorKind, ProxyError},
    exchange::Exchange,
    headers::Scheme,
    io::Busy,
    request_body::{Progress, RequestBody, Slide},
    response_body::ResponseBody,
    router::CompiledRoute,
    shared::{Drain, Shared},
    upstream::{Cluster, Endpoint, Hedging, Lease, NoPick},
};
use crate::{
    config::UpstreamProtocol,
    decide::{
        budget::RetryPermit,
        retry::{Attempted, Failure, RetryReason, Step, Stop, Where, may_retry, next_step},
    },
};

/// An upstream response head, and the connection it came on.
struct Upstream {
    response: Response<Incoming>,
    lease: Lease,
    /// The route's response timeout, enforced between reads of the body.
    stall: Duration,
    /// A gRPC call's own deadline, enforced on the whole body.
    call_deadline: Option<Instant>,
}

impl Upstream {
    /// Gives the connection back without answering with this response (a retried gRPC
    /// status), with the idle limit the upstream's `Keep-Alive` sets (`respond` reads it as
    /// it strips the header).
    fn release(mut self) {
        self.lease.conn.keep_alive = super::headers::keep_alive_timeout(self.response.headers());
        self.lease.release();
    }
}

/// The client connection a request came on.
pub(crate) struct Client {
    pub addr: SocketAddr,
    /// Its address as an `X-Forwarded-For` value.
    pub ip: HeaderValue,
    pub scheme: Scheme,
    /// The listener it came on is bound to a loopback address.
    pub loopback_listener: bool,
    /// The TLS version of an HTTPS connection.
    pub tls: Option<&'static str>,
    /// The certificate it showed (an HTTPS listener with `client_ca_file`), as
    /// `X-Forwarded-Client-Cert` says it: sent upstream under `[router.tls]
    /// forward_client_cert`.
    pub client_cert: Option<http::HeaderValue>,
    /// The connection's drain, which an upgraded connection takes over.
    pub drain: Drain,
}

/// The service function: never fails; errors become responses.
///
/// The request path is one flat state machine, with the rare slow path (connecting, waiting
/// for a connection slot) boxed: a future is moved by value at every level that awaits it, so
/// deep nesting of large futures costs a memcpy of each per request.
///
/// `busy` marks the request as running on its client connection until its response is over
/// (the exchange holds it; see `server::park`).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    client: Arc<Client>,
    req: Request<Incoming>,
    busy: Busy,
) -> Result<Response<ResponseBody>, Infallible> {
    #[cfg(debug_assertions)]
    super::failpoint::panic_on(req.uri().path());
    // The request's context lives in its final place from the start: the response body owns it.
    let mut ex = Exchange::new(shared, client.addr, &req, busy);
    let prepared = {
        let rt = ex.shared.runtime.load();
        prepare::prepare(&rt, req, &client, &mut ex)
    };
    let error = match prepared {
        Ok(mut p) => {
            let upgrade = p.upgrade.take();
            // The upstream's response is matched where it comes out: moved into a tuple and
            // out again, it would be copied each time.
            match forward(p, &mut ex).await {
                Ok(up) => return Ok(respond::respond(up, ex, upgrade, &client)),
                Err(e) => e,
            }
        }
        Err(Instead::Redirect(to)) => return Ok(respond::redirect(to, ex)),
        Err(Instead::Error(e)) => e,
    };
    Ok(respond::error_response(error, ex))
}

/// What every attempt of one request shares.
struct Plan {
    route: Arc<CompiledRoute>,
    deadline: Instant,
    /// The deadline is a gRPC call's `grpc-timeout`.
    grpc_deadline: bool,
    /// A gRPC call's own deadline, shorter than the route's or not (`Prepared::call_end`).
    call_end: Option<Instant>,
    grpc: bool,
    /// A streaming call (gRPC, a Connect stream), whose client sends a message when it has
    /// one and may wait for the upstream's reply before it sends more: its body is not read
    /// ahead and has no minimum rate. Only over HTTP/2 to an HTTP/2 cluster (gRPC needs it; a
    /// Connect client stream over HTTP/1 is read ahead): a content type is the client's to
    /// claim, and over HTTP/1 the claim exempted a trickled body from both while it held an
    /// HTTP/1 upstream connection (audit: two clients at a byte every 2.5 s held a cluster's
    /// two connections for good). Each attempt holds it to its connection: none on one that
    /// is not HTTP/2 (an `auto` cluster whose endpoint chose HTTP/1.1).
    streaming: bool,
    /// `streaming` as the request and its cluster claim it, before any connection.
    streaming_claim: bool,
    /// Told when the client's body has been read to the end; `None` once it has (or for none).
    done: Option<Arc<Progress>>,
    had_body: bool,
    kernel: bool,
    idempotent: bool,
    /// What it takes to send the request again after it was sent once (inline: it is kept
    /// for almost every request, and an allocation per request costs more than its bytes).
    replay: Option<Replay>,
    /// The next attempt takes a new connection, not an idle one (after a stale one broke).
    fresh: bool,
    /// Streams of this request an HTTP/2 upstream refused unprocessed, and those of them
    /// retried outside `max_retries`.
    refused: u32,
    free_refusals: u32,
    /// The next pick may return to an endpoint already tried when no other is left.
    same_endpoint_ok: bool,
    /// The hash of the request's `hash_on` key, for a `consistent_hash` cluster.
    affinity: Option<u64>,
    /// Held while a retry is in flight (the cluster's retry budget).
    retry_permit: Option<RetryPermit>,
}

impl Plan {
    /// `req` is the prepared request, whose body starts being kept here when a replay could
    /// ever be allowed: for idempotent requests (a stale keep-alive connection is always worth
    /// a retry), with kernel signals for any (the kernel may prove it unreceived), on HTTP/2
    /// (an upstream may refuse a stream unprocessed) and for gRPC statuses a route retries;
    /// within `budget`, with the bodies read ahead.
    fn new(
        cluster: &Cluster,
        route: Arc<CompiledRoute>,
        req: &mut Request<RequestBody>,
        deadline: Deadline,
        ex: &Exchange,
    ) -> Plan {
        let (grpc, budget) = (ex.grpc, &ex.shared.body_budget);
        let kernel = cluster.kernel();
        let idempotent = is_idempotent(req.method());
        let retry = &route.retry;
        let keep = kernel
            || idempotent
            || retry.on_response_timeout
            || cluster.spec.protocol != UpstreamProtocol::Http1
            || (grpc && !retry.grpc_status_codes.is_empty());
        let replay = keep.then(|| Replay::of(req, budget));
        // The header lookup last: most requests are HTTP/1.1.
        let streaming = ex.record.version == http::Version::HTTP_2
            && cluster.spec.protocol != UpstreamProtocol::Http1
            && (grpc || read_ahead::connect_stream(req));
        Plan {
            route,
            deadline: deadline.at,
            grpc_deadline: deadline.grpc,
            call_end: deadline.call_end,
            grpc,
            streaming,
            streaming_claim: streaming,
            done: None,
            had_body: false,
            kernel,
            idempotent,
            replay,
            fresh: false,
            refused: 0,
            free_refusals: 0,
            same_endpoint_ok: false,
            affinity: None,
            retry_permit: None,
        }
    }

    /// How a body that keeps coming moves the request deadline ([`Progress::moved`]): the
    /// route's request timeout runs from the body's last byte, up to a gRPC call's own
    /// deadline, and at a minimum rate unless the request is a streaming call. None when the
    /// deadline is the call's own, which stays where its client put it.
    fn slide(&self) -> Option<Slide> {
        (!self.grpc_deadline).then_some(Slide {
            timeout: self.route.policy.request_timeout,
            cap: self.call_end,
            min_rate: !self.streaming,
        })
    }

    /// The request deadline with the body read so far.
    fn moved_by(&self, body: &Progress) -> Instant {
        self.slide()
            .map_or(self.deadline, |s| body.moved(self.deadline, s))
    }
}

/// Attempts until one gets a response head, retrying while `decide::retry` allows, all within
/// the request deadline.
async fn forward(p: Prepared, ex: &mut Exchange) -> Result<Upstream, ProxyError> {
    let Prepared {
        cluster,
        route,
        mut req,
        done,
        deadline,
        upgrade: _,
        affinity,
    } = p;
    let mut plan = Plan::new(&cluster, route, &mut req, deadline, ex);
    (plan.had_body, plan.affinity) = (done.is_some(), affinity);
    ex.body = done.clone();
    if let Some(progress) = &done
        && plan.route.policy.request_buffering
        && !plan.streaming
    {
        let when = (plan.deadline, plan.slide());
        read_ahead::read_ahead(&mut req, progress, when, &ex.shared.body_budget).await?;
        plan.deadline = plan.moved_by(progress);
    }
    plan.done = done;
    // Boxed: only needed on the retry path, and it would otherwise sit in every request's state.
    let mut last: Option<Box<ProxyError>> = None;
    // The endpoint already picked for a retry of a response's status.
    let mut next: Option<Arc<Endpoint>> = None;
    // A retry of a failed attempt, counted once an endpoint is found for it.
    let mut retrying = None;
    loop {
        let ep = match next.take() {
            Some(ep) => ep,
            None => {
                let same_ok = std::mem::take(&mut plan.same_endpoint_ok);
                let ep = pick(&cluster, ex, plan.affinity, last.take(), same_ok)?;
                if let Some(reason) = retrying.take() {
                    count_retry(ex, &cluster, reason);
                }
                ep
            }
        };
        match attempt::run(&cluster, ep, req, &mut plan, ex).await {
            Ok(up) => {
                let Some(failure) = retryable::response(&plan, &up) else {
                    return Ok(up);
                };
                let Some((again, ep)) = retry_response(failure, &mut plan, ex, &cluster) else {
                    return Ok(up);
                };
                up.discard();
                req = again;
                next = Some(ep);
            }
            Err(f) => {
                let Failed {
                    error,
                    delivery,
                    reused,
                    unsent,
                } = *f;
                if let Some(a) = ex.record.attempts.last_mut() {
                    a.error = Some(error.kind());
                    a.cookie = a.cookie.or(error.cookie());
                }
                debug!(cluster = %cluster.name, error = %error, "attempt failed");
                let failure = error.failure(delivery, reused);
                let again = unsent.or_else(|| plan.replay());
                match retry(&mut plan, ex, &cluster, failure, again) {
                    Some((again, reason)) => {
                        req = again;
                        last = Some(Box::new(error));
                        retrying = Some(reason);
                    }
                    None => return Err(error),
                }
            }
        }
    }
}

/// A response whose status the route retries (`failure`): the request to send again and the
/// endpoint picked for it, counted as a retry; `None` when the response stands. Nothing of it
/// reached the client yet. It stands unless a retry may happen at all (asked first: a pick has
/// side effects, such as the round robin's turn), an endpoint is left for it (another, else
/// the same one: an address may front many instances), and the budget allows it.
fn retry_response(
    failure: Failure,
    plan: &mut Plan,
    ex: &mut Exchange,
    cluster: &Cluster,
) -> Option<(Request<RequestBody>, Arc<Endpoint>)> {
    let again = plan.replay();
    if !may_retry(
        failure,
        attempted(plan, ex, again.is_some()),
        &plan.route.retry,
    ) {
        return None;
    }
    // A keyed request goes to its key's next endpoint, never back to the one that answered.
    let ep = pick(cluster, ex, plan.affinity, None, plan.affinity.is_none()).ok()?;
    let (again, reason) = retry(plan, ex, cluster, failure, again)?;
    count_retry(ex, cluster, reason);
    if let (Failure::UpstreamStatus(s), Some(a)) = (failure, ex.record.attempts.last_mut()) {
        a.status = Some(s);
    }
    Some((again, ep))
}

/// What `decide::retry` needs to know about the request so far.
fn attempted(plan: &Plan, ex: &Exchange, resendable: bool) -> Attempted {
    Attempted {
        idempotent: plan.idempotent,
        resendable,
        retries: ex.record.retries,
        refused: plan.refused,
        free_refusals: plan.free_refusals,
    }
}

/// Asks `decide::retry` about `failure`: the request to send again and why, or `None`. It is
/// counted ([`count_retry`]) once an endpoint is found for it: a retry that found none was
/// logged as one (`attempts: 1, retries: 1`) and counted in `gateway_retries_total`.
fn retry(
    plan: &mut Plan,
    ex: &mut Exchange,
    cluster: &Cluster,
    failure: Failure,
    again: Option<Request<RequestBody>>,
) -> Option<(Request<RequestBody>, RetryReason)> {
    let attempted = attempted(plan, ex, again.is_some());
    if matches!(failure, Failure::Refused { .. }) {
        plan.refused += 1;
    }
    match next_step(failure, attempted, &plan.route.retry, &cluster.budgets) {
        Step::Retry {
            reason,
            to,
            permit,
            counted,
        } => {
            let again = again?;
            plan.free_refusals += u32::from(!counted);
            match to {
                Where::FreshConnection => {
                    plan.fresh = true;
                    plan.same_endpoint_ok = true;
                }
                Where::AnotherConnection => plan.same_endpoint_ok = true,
                Where::Elsewhere => {}
            }
            // A retry the budget does not count keeps the permit of an earlier one that it
            // counted: the request is still retrying.
            if permit.is_some() {
                plan.retry_permit = permit;
            }
            Some((again, reason))
        }
        Step::Stop(Stop::BudgetSpent) => {
            debug!(cluster = %cluster.name, "retry budget spent");
            cluster.meter.retry_budget_exhausted();
            None
        }
        Step::Stop(_) => None,
    }
}

/// A retry that goes ahead, in the access log and the metrics.
fn count_retry(ex: &mut Exchange, cluster: &Cluster, reason: RetryReason) {
    cluster.meter.retry(reason);
    ex.record.retries += 1;
}

/// The gRPC status header (in a trailers-only response's head, or in trailers).
pub(crate) const GRPC_STATUS: &str = "grpc-status";

/// An endpoint this request has not tried (or, when `same_ok`, any routable one once the
/// untried are gone), by the request's `key` under `consistent_hash`; when none is left, the last attempt's error (or `no_healthy_upstream`
/// when there was none).
fn pick(
    cluster: &Cluster,
    ex: &Exchange,
    key: Option<u64>,
    last: Option<Box<ProxyError>>,
    same_ok: bool,
) -> Result<Arc<Endpoint>, ProxyError> {
    let tried = |a| ex.record.attempts.iter().any(|t| t.endpoint == a);
    let first = ex.record.attempts.is_empty();
    // A key's endpoint takes the retry of a connection that failed, not the endpoint (a
    // stale one, a GOAWAY): another endpoint would break the affinity for nothing.
    let picked = if same_ok && key.is_some() {
        cluster.pick(|_| false, (key, first))
    } else {
        match cluster.pick(tried, (key, first)) {
            Err(NoPick::AllTried) if same_ok => cluster.pick(|_| false, (key, false)),
            other => other,
        }
    };
    match picked {
        Ok(ep) => Ok(ep),
        Err(NoPick::NoneHealthy { total, ejected }) => Err(last.map_or_else(
            || ProxyError::NoHealthyUpstream {
                cluster: cluster.spec.name.clone(),
                total,
                ejected,
            },
            |e| *e,
        )),
        // Only after a failed attempt, which left its error in `last`.
        Err(NoPick::AllTried) => Err(last.map_or_else(
            || ProxyError::NoHealthyUpstream {
                cluster: cluster.spec.name.clone(),
                total: ex.record.attempts.len(),
                ejected: 0,
            },
            |e| *e,
        )),
    }
}

impl Plan {
    /// The route's hedging knobs.
    fn hedging(&self) -> Hedging {
        let r = &self.route.policy.retry;
        Hedging {
            enabled: r.hedge,
            budget_percent: r.hedge_budget_percent,
            key: self.affinity,
        }
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}
