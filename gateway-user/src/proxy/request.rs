//! One request, in order: route → pick an endpoint → one attempt (connect or reuse, send,
//! await the response head) → on failure, `decide::retry::next_step` says whether to try
//! again elsewhere → respond (the upstream's response, or the gateway's error that explains
//! itself).
//!
//! | step | where |
//! |---|---|
//! | limits, routing, header rewrite | [`prepare`] |
//! | pick | [`pick`] (the cluster's balancer, skipping endpoints this request tried) |
//! | connect or reuse, send, await the head | [`attempt`] |
//! | retry or not | [`forward`], by `decide::retry` |
//! | respond | [`respond`] |
//!
//! Timeouts, each named in the config: `connect_timeout_ms` bounds each TCP connect (the
//! adaptive deadline below it, in `upstream::connect`), `response_timeout_ms` runs from the end
//! of the request body to the response head (and between reads of the response body, in
//! `response_body`), `write_timeout_ms` bounds a stalled write (in `io`), and
//! `request_timeout_ms` bounds the whole, all attempts included.

mod attempt;
mod prepare;
mod respond;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use hyper::body::Incoming;
use tokio::{sync::oneshot, time::Instant};
use tracing::debug;

pub use self::respond::{X_GATEWAY_ATTEMPTS, X_GATEWAY_ENDPOINT, X_GATEWAY_ERROR};
use self::{attempt::Failed, prepare::Prepared};
use super::{
    error::{ErrorKind, ProxyError},
    exchange::Exchange,
    headers::Scheme,
    request_body::{KeptBody, RequestBody},
    response_body::ResponseBody,
    shared::Shared,
    upstream::{Cluster, Endpoint, Lease, NoPick},
};
use crate::decide::{
    budget::RetryPermit,
    retry::{Attempted, Step, Stop, Where, next_step},
};

/// An upstream response head, and the connection it came on.
struct Upstream {
    response: Response<Incoming>,
    lease: Lease,
    /// The cluster's response timeout, enforced between reads of the body.
    stall: Duration,
}

/// The client connection a request came on.
pub(crate) struct Client {
    pub addr: SocketAddr,
    /// Its address as an `X-Forwarded-For` value.
    pub ip: HeaderValue,
    pub scheme: Scheme,
}

/// The service function: never fails; errors become responses.
///
/// The request path is one flat state machine, with the rare slow path (connecting, waiting
/// for a connection slot) boxed: a future is moved by value at every level that awaits it, so
/// deep nesting of large futures costs a memcpy of each per request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    client: Arc<Client>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // The request's context lives in its final place from the start: the response body owns it.
    let mut ex = Exchange::new(shared, client.addr, &req);
    let prepared = {
        let rt = ex.shared.runtime.load();
        prepare::prepare(&rt, req, &client, &mut ex)
    };
    let result = match prepared {
        Ok(p) => forward(p, &mut ex).await,
        Err(e) => Err(e),
    };
    Ok(match result {
        Ok(up) => respond::respond(up, ex),
        Err(e) => respond::error_response(e, ex),
    })
}

/// What every attempt of one request shares.
struct Plan {
    deadline: Instant,
    /// Told when the client's body has been read to the end; `None` once it has (or for none).
    done: Option<oneshot::Receiver<()>>,
    had_body: bool,
    kernel: bool,
    idempotent: bool,
    /// What it takes to send the request again after it was sent once (inline: it is kept
    /// for almost every request, and an allocation per request costs more than its bytes).
    replay: Option<Replay>,
    /// The next attempt takes a new connection, not an idle one (after a stale one broke).
    fresh: bool,
    /// The next pick may return to an endpoint already tried when no other is left.
    same_endpoint_ok: bool,
}

/// A copy of the request's head, and its body as kept while it streamed (none for a bodiless
/// request).
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Option<KeptBody>,
}

impl Plan {
    /// `req` is the prepared request, whose body starts being kept here when a replay could
    /// ever be allowed: for idempotent requests (a stale keep-alive connection is always worth
    /// a retry), and with kernel signals for any (the kernel may prove it unreceived).
    fn new(cluster: &Cluster, req: &mut Request<RequestBody>, deadline: Instant) -> Plan {
        let kernel = cluster.kernel();
        let idempotent = is_idempotent(req.method());
        let replay = (kernel || idempotent || cluster.spec.retry.on_response_timeout).then(|| {
            let body =
                (!hyper::body::Body::is_end_stream(req.body())).then(|| req.body_mut().keep());
            Replay {
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
                body,
            }
        });
        Plan {
            deadline,
            done: None,
            had_body: false,
            kernel,
            idempotent,
            replay,
            fresh: false,
            same_endpoint_ok: false,
        }
    }

    /// The request again, if it can be sent again (its body, if any, was kept whole).
    fn replay(&self) -> Option<Request<RequestBody>> {
        let r = self.replay.as_ref()?;
        let body = match &r.body {
            Some(kept) => RequestBody::replay(kept)?,
            None => RequestBody::empty(),
        };
        let mut req = Request::new(body);
        *req.method_mut() = r.method.clone();
        *req.uri_mut() = r.uri.clone();
        *req.headers_mut() = r.headers.clone();
        Some(req)
    }
}

/// Attempts until one gets a response head, retrying while `decide::retry` allows, all within
/// the request deadline.
async fn forward(p: Prepared, ex: &mut Exchange) -> Result<Upstream, ProxyError> {
    let (cluster, mut req) = (p.cluster, p.req);
    let mut plan = Plan::new(&cluster, &mut req, p.deadline);
    plan.had_body = p.done.is_some();
    plan.done = p.done;
    let policy = cluster.retry_policy();
    // Boxed: only needed on the retry path, and it would otherwise sit in every request's state.
    let mut last: Option<Box<ProxyError>> = None;
    let mut _retry: Option<RetryPermit> = None;
    loop {
        let ep = pick(
            &cluster,
            ex,
            last.take(),
            std::mem::take(&mut plan.same_endpoint_ok),
        )?;
        let Failed {
            error,
            delivery,
            reused,
            unsent,
        } = match attempt::run(&cluster, ep, req, &mut plan, ex).await {
            Ok(up) => return Ok(up),
            Err(f) => *f,
        };
        if let Some(a) = ex.record.attempts.last_mut() {
            a.error = Some(error.kind());
            a.cookie = a.cookie.or(error.cookie());
        }
        debug!(cluster = %cluster.name, error = %error, "attempt failed");
        let again = unsent.or_else(|| plan.replay());
        let attempted = Attempted {
            idempotent: plan.idempotent,
            resendable: again.is_some(),
            retries: ex.record.retries,
        };
        let failure = error.failure(delivery, reused);
        match (
            next_step(failure, attempted, &policy, &cluster.budgets),
            again,
        ) {
            (Step::Retry { reason, to, permit }, Some(again)) => {
                if to == Where::FreshConnection {
                    plan.fresh = true;
                    plan.same_endpoint_ok = true;
                }
                cluster.meter.retry(reason);
                _retry = permit;
                ex.record.retries += 1;
                req = again;
                last = Some(Box::new(error));
            }
            (Step::Stop(Stop::BudgetSpent), _) => {
                debug!(cluster = %cluster.name, "retry budget spent");
                cluster.meter.retry_budget_exhausted();
                return Err(error);
            }
            _ => return Err(error),
        }
    }
}

/// An endpoint this request has not tried (or, when `same_ok`, any routable one once the
/// untried are gone); when none is left, the last attempt's error (or `no_healthy_upstream`
/// when there was none).
fn pick(
    cluster: &Cluster,
    ex: &Exchange,
    last: Option<Box<ProxyError>>,
    same_ok: bool,
) -> Result<Arc<Endpoint>, ProxyError> {
    let tried = |a| ex.record.attempts.iter().any(|t| t.endpoint == a);
    let picked = match cluster.pick(tried) {
        Err(NoPick::AllTried) if same_ok => cluster.pick(|_| false),
        other => other,
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

/// The request deadline passed: `request_timeout`, with what the request was doing.
fn request_timeout(cluster: &Cluster, ex: &mut Exchange) -> ProxyError {
    if let Some(a) = ex.record.attempts.last_mut() {
        a.error.get_or_insert(ErrorKind::RequestTimeout);
    }
    ProxyError::RequestTimeout {
        timeout: cluster.spec.timeouts.request,
        endpoint: ex.record.attempts.last().map(|a| a.endpoint),
        phase: ex.phase,
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}
