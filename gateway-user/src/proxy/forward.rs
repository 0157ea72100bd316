//! One request, from the client's head to the upstream's response: checks, routing, attempts
//! and retries under the request deadline, and the error response when it all fails.
//!
//! Timeouts, each named in the config: `connect_timeout_ms` bounds each TCP connect (in
//! `connect`), `response_timeout_ms` runs from the end of the request body to the response
//! head (and between reads of the response body, in `body`), `write_timeout_ms` bounds a
//! stalled write (in `io`), and `request_timeout_ms` bounds the whole, all attempts included.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{CONTENT_LENGTH, CONTENT_TYPE, HOST},
    uri::PathAndQuery,
};
use hyper::body::Incoming;
use tokio::{sync::oneshot, time::Instant};
use tracing::debug;

use crate::decide::{
    health::Evidence,
    retry::{AckState, Failure, RetryPolicy, RetryReason, retry_allowed},
};

use super::{
    Runtime, Shared,
    access_log::{Attempt, Exchange},
    body::{Finish, InFlight, Lease, RequestBody, RequestBodyError, ResponseBody},
    cluster::{Cluster, NoPick},
    error::{ErrorKind, ProxyError, Retry},
    headers,
    io::is_write_stall,
    pool::UpstreamConn,
};

/// Response headers that explain a gateway error.
pub const X_GATEWAY_ERROR: &str = "x-gateway-error";
pub const X_GATEWAY_ENDPOINT: &str = "x-gateway-endpoint";
pub const X_GATEWAY_ATTEMPTS: &str = "x-gateway-attempts";
/// The kernel evidence behind an error, `key=value` pairs (see `ProxyError::evidence_header`).
pub const X_GATEWAY_EVIDENCE: &str = "x-gateway-evidence";

/// An upstream response head, and the connection it came on.
struct Upstream {
    response: Response<Incoming>,
    lease: Lease,
    /// The cluster's response timeout, enforced between reads of the body.
    stall: Duration,
}

/// The service function: never fails; errors become responses.
///
/// The request path is one flat state machine (`handle` awaiting `run`), with the rare slow
/// path (connecting, waiting for a connection slot) boxed: a future is moved by value at every
/// level that awaits it, so deep nesting of large futures costs a memcpy of each per request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    client: SocketAddr,
    client_ip: HeaderValue,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // The log record lives in its final place from the start: the response body owns it.
    let mut finish = Box::new(Finish {
        exchange: Exchange::new(
            client,
            req.method().clone(),
            req.uri().clone(),
            req.version(),
        ),
        shared,
        lease: None,
    });
    let f = &mut *finish;
    let prepared = {
        let rt = f.shared.runtime.load();
        prepare(&rt, req, &client_ip, &mut f.exchange)
    };
    let result = match prepared {
        Ok(p) => {
            run(
                p.cluster,
                Some(p.req),
                p.done,
                p.deadline,
                &f.shared,
                &mut f.exchange,
            )
            .await
        }
        Err(e) => Err(e),
    };
    Ok(match result {
        Ok(up) => respond(up, finish),
        Err(e) => error_response(e, finish),
    })
}

/// A request checked, routed and rewritten for its upstream.
struct Prepared {
    cluster: Arc<Cluster>,
    req: Request<RequestBody>,
    /// Told when the client's body has been read to the end; `None` for an empty body.
    done: Option<oneshot::Receiver<()>>,
    deadline: Instant,
}

/// Limits, routing and header rewriting: everything before the first attempt.
fn prepare(
    rt: &Runtime,
    req: Request<Incoming>,
    client_ip: &HeaderValue,
    ex: &mut Exchange,
) -> Result<Prepared, ProxyError> {
    let ds = &rt.settings.downstream;
    let size = head_size(&req);
    if size > ds.max_request_header_bytes {
        return Err(ProxyError::RequestHeadersTooLarge {
            size,
            limit: ds.max_request_header_bytes,
        });
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest {
            what: "CONNECT is not supported",
        });
    }
    let authority = authority(&req)?;
    if let Some(limit) = ds.max_request_body_bytes
        && content_length(&req).is_some_and(|n| n > limit)
    {
        return Err(ProxyError::RequestBodyTooLarge { limit });
    }
    let host = authority
        .as_ref()
        .and_then(|a| a.to_str().ok())
        .map_or("", host_without_port);
    let route = rt
        .router
        .route(host, req.uri().path())
        .ok_or_else(|| ProxyError::NoRoute {
            host: host.to_owned(),
            path: req.uri().path().to_owned(),
        })?;
    let cluster = rt.clusters[route.cluster].clone();
    ex.route = Some(route.name.clone());
    ex.cluster = Some(cluster.name.clone());
    ex.meter = rt.route_meters.get(route.index).cloned();
    ex.active = Some(cluster.start_request());
    let deadline = ex.start + cluster.spec.timeouts.request;

    let (mut parts, body) = req.into_parts();
    headers::to_upstream(
        &mut parts.headers,
        parts.version,
        client_ip,
        authority.as_ref(),
    );
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    let (body, done) = RequestBody::new(body, ds.max_request_body_bytes);
    Ok(Prepared {
        cluster,
        req: Request::from_parts(parts, body),
        done,
        deadline,
    })
}

fn request_timeout(cluster: &Cluster, ex: &mut Exchange) -> ProxyError {
    if let Some(a) = ex.attempts.last_mut() {
        a.error.get_or_insert(ErrorKind::RequestTimeout);
    }
    ProxyError::RequestTimeout {
        timeout: cluster.spec.timeouts.request,
        endpoint: ex.attempts.last().map(|a| a.endpoint),
        phase: ex.phase,
    }
}

/// Attempts until one gets a response head, retrying while the policy and budget allow, all
/// within the request deadline.
async fn run(
    cluster: Arc<Cluster>,
    mut req: Option<Request<RequestBody>>,
    mut done: Option<oneshot::Receiver<()>>,
    deadline: Instant,
    shared: &Shared,
    ex: &mut Exchange,
) -> Result<Upstream, ProxyError> {
    let policy = cluster.spec.retry;
    let t = cluster.spec.timeouts;
    // A sent request can only be replayed if it had no body and we kept a copy of its head.
    // With kernel signals, any bodiless request may turn out provably unreceived (see
    // `decide::retry`), so a copy is kept; without them only the idempotent policy can allow a
    // replay.
    let kernel = shared.signals.mode() == crate::signals::SignalMode::Kernel;
    let idempotent = req.as_ref().is_some_and(|r| is_idempotent(r.method()));
    let replay = req
        .as_ref()
        .filter(|r| {
            (kernel || (policy.on_response_timeout && is_idempotent(r.method())))
                && hyper::body::Body::is_end_stream(r.body())
        })
        .map(|r| Box::new((r.method().clone(), r.uri().clone(), r.headers().clone())));
    let had_body = done.is_some();
    // Boxed: only needed on the retry path, and it would otherwise sit in every request's state.
    let mut last: Option<Box<ProxyError>> = None;
    let mut _retry = None;
    loop {
        let mut ep = match cluster.pick(|a| ex.attempts.iter().any(|t| t.endpoint == a)) {
            Ok(ep) => ep,
            Err(NoPick::NoneHealthy { total, ejected }) => {
                return Err(last.map_or_else(
                    || ProxyError::NoHealthyUpstream {
                        cluster: cluster.spec.name.clone(),
                        total,
                        ejected,
                    },
                    |e| *e,
                ));
            }
            Err(NoPick::AllTried) => {
                return Err(*last.expect("an endpoint was tried before all were"));
            }
        };
        ex.attempts.push(Attempt {
            endpoint: ep.addr,
            cookie: None,
            reused: false,
            error: None,
        });
        let mut in_flight = InFlight::new(&ep);

        // One attempt on `ep`: a response head, or why not (with the request if never sent).
        let outcome: Result<(Response<Incoming>, UpstreamConn), AttemptFailure> = 'attempt: loop {
            ex.phase = "connecting";
            let pooled_at_once = ep.pool.take(ex.start);
            let fast = pooled_at_once.is_some();
            let mut conn = match pooled_at_once {
                Some(c) => c,
                None => {
                    let tried: Vec<SocketAddr> = ex.attempts.iter().map(|t| t.endpoint).collect();
                    let tried = move |a: SocketAddr| tried.contains(&a);
                    match tokio::time::timeout_at(deadline, Box::pin(cluster.checkout(&ep, &tried)))
                        .await
                    {
                        Ok(Ok((winner, c))) => {
                            if !Arc::ptr_eq(&winner, &ep) {
                                // A hedged connect won: the first endpoint had no SYN-ACK by
                                // its deadline.
                                if let Some(a) = ex.attempts.last_mut() {
                                    a.error = Some(ErrorKind::ConnectTimeout);
                                }
                                ex.attempts.push(Attempt {
                                    endpoint: winner.addr,
                                    cookie: None,
                                    reused: false,
                                    error: None,
                                });
                                ex.hedged = true;
                                ep = winner;
                                in_flight = InFlight::new(&ep);
                            }
                            c
                        }
                        Ok(Err(e)) => break 'attempt Err((e, req.take())),
                        Err(_) => return Err(request_timeout(&cluster, ex)),
                    }
                }
            };
            let reused = conn.connect_time.is_none();
            if let Some(a) = ex.attempts.last_mut() {
                a.cookie = Some(conn.cookie);
                a.reused = reused;
            }
            ex.connect = conn.connect_time;
            ex.phase = "sending the request";
            let this = req.take().expect("a request for every attempt");
            let send = conn.sender.try_send_request(this);
            tokio::pin!(send);
            let mut result = None;
            if let Some(rx) = done.as_mut() {
                // The response timeout starts once the client's body has been sent.
                tokio::select! {
                    biased;
                    r = &mut send => result = Some(r),
                    _ = rx => done = None,
                    _ = tokio::time::sleep_until(deadline) => return Err(request_timeout(&cluster, ex)),
                }
            }
            let result = match result {
                Some(r) => r,
                None => {
                    ex.phase = "waiting for the response head";
                    // Sent just now: on a first attempt that found an idle connection at once
                    // and had no body, that is within microseconds of the arrival, so the clock
                    // need not be read again.
                    let sent = if fast && ex.retries == 0 && !had_body {
                        ex.start
                    } else {
                        Instant::now()
                    };
                    let response_deadline = sent + t.response;
                    let until = response_deadline.min(deadline);
                    let waited = loop {
                        // With kernel signals, look every HOST_DIED_CHECK at the connection:
                        // RTOs with the request unACKed mean the host or path died, which
                        // need not wait for the response timeout.
                        let slice = if kernel {
                            (Instant::now() + HOST_DIED_CHECK).min(until)
                        } else {
                            until
                        };
                        match tokio::time::timeout_at(slice, &mut send).await {
                            Ok(r) => break Ok(r),
                            Err(_) if slice >= until => break Err(()),
                            Err(_) => {
                                if let Some(ev) = shared.signals.established_evidence(conn.cookie)
                                    && ev.rtos > 0
                                    && ev.unacked_bytes > 0
                                {
                                    let err = ProxyError::UpstreamHostDied {
                                        endpoint: ep.addr,
                                        after: sent.elapsed(),
                                        cookie: conn.cookie,
                                        evidence: ev,
                                    };
                                    cluster.report(&ep, Evidence::HostDied, &|| err.to_string());
                                    ex.ack = (!reused).then(|| AckState {
                                        written_before: 0,
                                        acked: err_acked(&err),
                                    });
                                    break 'attempt Err((err, None));
                                }
                            }
                        }
                    };
                    match waited {
                        Ok(r) => r,
                        Err(()) if response_deadline >= deadline => {
                            return Err(request_timeout(&cluster, ex));
                        }
                        Err(()) => {
                            let evidence = shared.signals.established_evidence(conn.cookie);
                            // No RTO with the request in flight for a whole response timeout:
                            // the upstream's kernel has the request; the backend is slow.
                            let (ev, acked) = match &evidence {
                                Some(e) if e.rtos > 0 && e.unacked_bytes > 0 => {
                                    (Evidence::HostDied, Some(e.bytes_acked))
                                }
                                Some(e) => (Evidence::ResponseTimeout, Some(e.bytes_acked)),
                                None => (Evidence::ResponseTimeout, None),
                            };
                            let slow_backend = kernel && ev == Evidence::ResponseTimeout;
                            let err = ProxyError::ResponseTimeout {
                                endpoint: ep.addr,
                                timeout: t.response,
                                cookie: conn.cookie,
                                evidence,
                                slow_backend,
                            };
                            cluster.report(&ep, ev, &|| err.to_string());
                            ex.ack = acked.filter(|_| !reused).map(|acked| AckState {
                                written_before: 0,
                                acked,
                            });
                            break 'attempt Err((err, None));
                        }
                    }
                }
            };
            match result {
                Ok(response) => break 'attempt Ok((response, conn)),
                Err(mut e) => match e.take_message() {
                    // A pooled connection closed before the request went out: try another
                    // connection to the same endpoint; this is not a retry.
                    Some(back) if reused => {
                        debug!(upstream = %ep.addr, "pooled connection was closed; reconnecting");
                        req = Some(back);
                    }
                    back => break 'attempt Err((classify(e.into_error(), ep.addr), back)),
                },
            }
        };
        let (err, back) = match outcome {
            Ok((response, conn)) => {
                ex.first_byte = Some(ex.start.elapsed());
                cluster.report(&ep, Evidence::ResponseOk, &String::new);
                return Ok(Upstream {
                    response,
                    stall: t.response,
                    lease: Lease {
                        conn,
                        endpoint: ep,
                        idle_timeout: t.idle,
                        _in_flight: in_flight,
                    },
                });
            }
            Err(f) => f,
        };
        drop(in_flight);
        if let Some(a) = ex.attempts.last_mut() {
            a.error = Some(err.kind());
            a.cookie = a.cookie.or(err.cookie());
        }
        debug!(cluster = %cluster.name, upstream = %ep.addr, error = %err, "attempt failed");
        // The exact rule is in `decide::retry`: a request the kernel proves unreceived may be
        // replayed whatever its method.
        let failure = match err.kind() {
            ErrorKind::ResponseTimeout => Some(Failure::ResponseTimeout { ack: ex.ack.take() }),
            ErrorKind::UpstreamHostDied | ErrorKind::UpstreamReset => {
                Some(Failure::ConnectionDied { ack: ex.ack.take() })
            }
            _ => None,
        };
        let allowed = failure.and_then(|f| {
            retry_allowed(
                f,
                idempotent,
                RetryPolicy {
                    on_response_timeout: policy.on_response_timeout,
                    on_reset: policy.on_response_timeout,
                },
            )
            .or_else(|| {
                (idempotent && err.kind() == ErrorKind::UpstreamHostDied)
                    .then_some(RetryReason::UpstreamReset)
            })
        });
        let reason = match err.kind().retry() {
            Retry::Always => Some(RetryReason::ConnectFailed),
            _ => allowed,
        };
        let next = match (err.kind().retry(), back) {
            (Retry::Always, Some(back)) => Some(back),
            (Retry::IfIdempotent, _) if allowed.is_some() => replay.as_deref().map(|(m, u, h)| {
                let mut r = Request::new(RequestBody::empty());
                *r.method_mut() = m.clone();
                *r.uri_mut() = u.clone();
                *r.headers_mut() = h.clone();
                r
            }),
            _ => None,
        };
        let Some(next) = next else { return Err(err) };
        if ex.retries >= policy.max_retries {
            return Err(err);
        }
        match cluster.try_retry() {
            Some(g) => _retry = Some(g),
            None => {
                debug!(cluster = %cluster.name, "retry budget spent");
                cluster.meter.retry_budget_exhausted();
                return Err(err);
            }
        }
        if let Some(r) = reason {
            cluster.meter.retry(r);
        }
        ex.retries += 1;
        req = Some(next);
        last = Some(Box::new(err));
    }
}

type AttemptFailure = (ProxyError, Option<Request<RequestBody>>);

/// How often a request waiting for its response looks at the kernel's view of the connection.
const HOST_DIED_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

fn err_acked(e: &ProxyError) -> u64 {
    match e {
        ProxyError::UpstreamHostDied { evidence, .. } => evidence.bytes_acked,
        _ => 0,
    }
}

/// Maps a failed exchange on an upstream connection to its reason.
fn classify(e: hyper::Error, endpoint: SocketAddr) -> ProxyError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<RequestBodyError>() {
            return match b {
                RequestBodyError::TooLarge { limit } => {
                    ProxyError::RequestBodyTooLarge { limit: *limit }
                }
                RequestBodyError::Downstream(_) => ProxyError::DownstreamBodyError { source: e },
            };
        }
        cur = err.source();
    }
    if let Some(timeout) = is_write_stall(&e) {
        return ProxyError::UpstreamWriteTimeout { endpoint, timeout };
    }
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        return ProxyError::InvalidUpstreamResponse {
            endpoint,
            source: e,
        };
    }
    ProxyError::UpstreamReset {
        endpoint,
        source: e,
    }
}

fn respond(up: Upstream, mut finish: Box<Finish>) -> Response<ResponseBody> {
    let (mut parts, body) = up.response.into_parts();
    headers::to_downstream(&mut parts.headers, parts.version);
    parts.version = Version::default();
    finish.exchange.status = parts.status.as_u16();
    finish.lease = Some(up.lease);
    Response::from_parts(parts, ResponseBody::upstream(body, up.stall, finish))
}

fn error_response(e: ProxyError, mut finish: Box<Finish>) -> Response<ResponseBody> {
    let ex = &mut finish.exchange;
    let kind = e.kind();
    let status = kind.status();
    let attempts = ex.attempts.len();
    let endpoint = e
        .endpoint()
        .or_else(|| ex.attempts.last().map(|a| a.endpoint));
    let mut text = format!(
        "{} {}: {e}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if status.is_server_error() {
        ex.error_detail = Some(e.to_string());
    }
    if attempts > 0 {
        let tried: Vec<String> = ex
            .attempts
            .iter()
            .map(|a| match a.error {
                Some(k) => format!("{} ({k})", a.endpoint),
                None => a.endpoint.to_string(),
            })
            .collect();
        text.push_str(&format!(
            "cluster `{}`, {attempts} attempt(s): {}\n",
            ex.cluster.as_deref().unwrap_or("-"),
            tried.join(", ")
        ));
    }
    ex.status = status.as_u16();
    ex.error = Some(kind);
    let mut resp = Response::new(ResponseBody::full(Bytes::from(text), Some(finish)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(X_GATEWAY_ERROR, HeaderValue::from_static(kind.reason()));
    if let Some(v) = e
        .evidence_header()
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        h.insert(X_GATEWAY_EVIDENCE, v);
    }
    if let Some(ep) = endpoint
        && let Ok(v) = HeaderValue::try_from(ep.to_string())
    {
        h.insert(X_GATEWAY_ENDPOINT, v);
    }
    h.insert(X_GATEWAY_ATTEMPTS, HeaderValue::from(attempts));
    if status == StatusCode::BAD_REQUEST {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Request line plus headers, as sent on the wire (close enough for a limit).
fn head_size(req: &Request<Incoming>) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// The request's authority: the URI's (HTTP/2, absolute-form) or the `Host` header.
fn authority(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ProxyError> {
    if let Some(a) = req.uri().authority() {
        return Ok(HeaderValue::from_str(a.as_str()).ok());
    }
    match req.headers().get(HOST) {
        Some(h) => Ok(Some(h.clone())),
        None if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest {
            what: "HTTP/1.1 request without a Host header",
        }),
        None => Ok(None),
    }
}

fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_is_stripped() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }

    #[test]
    fn statuses_follow_the_table() {
        assert_eq!(ErrorKind::ConnectRefused.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(ErrorKind::UpstreamReset.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            ErrorKind::InvalidUpstreamResponse.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ErrorKind::NoHealthyUpstream.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ErrorKind::Overloaded.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ErrorKind::ConnectTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ErrorKind::ResponseTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
