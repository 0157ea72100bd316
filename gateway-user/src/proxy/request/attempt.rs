//! One attempt on one endpoint: connect or reuse, send, await the response head.
//!
//! - **Connect or reuse**: an idle connection of this worker at once, else `checkout` (a new
//!   connection, possibly won by a hedge to another endpoint, or one that frees up), within
//!   the request deadline.
//! - **Send**: the request head and its streamed body. The response timeout starts once the
//!   client's body has been sent.
//! - **Await the response head**: until the response timeout (`response_timeout_ms`) or the
//!   request deadline. The connection is looked at every [`HOST_DIED_CHECK`]: with kernel
//!   signals, RTOs with the request unACKed mean the host or the path died
//!   (`decide::evidence::host_died`): while nothing is ACKed since the last RTO and the request
//!   can go elsewhere, it need not wait for the timer (`gives_up_on_stall`); request bytes still
//!   unACKed (`TCP_INFO`) after three smoothed RTTs are a stall on the path.
//! - **Latency** (`decide::latency`, fed whatever the policy): the head's latency from the
//!   request's sending is a sample, a response timeout and a stall are lower bounds, and the
//!   request counts as awaiting its head meanwhile.
//!
//! A pooled connection that turns out closed before the request went out is replaced by
//! another connection to the same endpoint; that is not a retry.
//!
//! HTTP/2: the attempt is a stream on a shared connection, whose kernel record is the
//! connection's: a host that died fails every stream on it, and it is retired. A stream the
//! upstream refused unprocessed (GOAWAY below it, REFUSED_STREAM) is `upstream_refused_stream`,
//! which `decide::retry` sends to another connection whatever the method.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::Poll,
    time::Duration,
};

use http::Request;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::{
    Plan, Upstream,
    deadline::{GRPC_TIMEOUT, grpc_timeout_left},
    look::{OnConn, acked, acked_before, elsewhere, host_died, live, note_stall, stall},
};
use crate::{
    decide::{
        evidence::ResponseCause,
        latency::Source,
        retry::{Delivery, Failure},
    },
    proxy::{
        access_log::Attempt,
        classify::upstream_error,
        error::{ErrorKind, Phase, ProxyError},
        exchange::Exchange,
        request_body::RequestBody,
        upstream::{
            Cluster, Endpoint, InFlight, Lease, SendResult, UpstreamConn, Want, checkout, reuse,
        },
    },
};

/// How often a request waiting for its response looks at the kernel's view of the connection.
pub const HOST_DIED_CHECK: Duration = Duration::from_millis(200);

/// Why an attempt failed, what the kernel proves about the request's bytes, and the request
/// itself when it was never sent (so it can go elsewhere as it is).
pub(super) struct Failed {
    pub error: ProxyError,
    pub delivery: Delivery,
    /// The connection had carried earlier requests.
    pub reused: bool,
    pub unsent: Option<Request<RequestBody>>,
}

impl Failed {
    pub(super) fn new(
        error: ProxyError,
        delivery: Delivery,
        unsent: Option<Request<RequestBody>>,
    ) -> Box<Failed> {
        Box::new(Failed {
            error,
            delivery,
            reused: false,
            unsent,
        })
    }

    fn plain(error: ProxyError) -> Box<Failed> {
        Failed::new(error, Delivery::Unknown, None)
    }
}

/// One attempt on `ep`: a response head, or why not.
pub(super) async fn run(
    cluster: &Arc<Cluster>,
    mut ep: Arc<Endpoint>,
    mut req: Request<RequestBody>,
    plan: &mut Plan,
    ex: &mut Exchange,
) -> Result<Upstream, Box<Failed>> {
    push_attempt(ex, ep.addr);
    ex.endpoint = Some(ep.clone());
    let mut in_flight = InFlight::new(&ep);
    loop {
        ex.phase = Phase::Connecting;
        let (winner, mut conn, fast) = match connect_or_reuse(cluster, &ep, plan, ex).await {
            Ok(c) => c,
            Err(error) => {
                ep.health.history.failed(error.kind());
                return Err(Failed::new(error, Delivery::Unknown, Some(req)));
            }
        };
        if !Arc::ptr_eq(&winner, &ep) {
            ep = winner;
            ex.endpoint = Some(ep.clone());
            in_flight = InFlight::new(&ep);
        }
        // A streaming call's exemptions hold on HTTP/2 only, and an `auto` cluster's endpoint
        // may have chosen HTTP/1.1 by ALPN: there the claim held an HTTP/1 upstream
        // connection with a trickled body, as `Plan::streaming` says it must not.
        plan.streaming = plan.streaming_claim && conn.h2().is_some();
        let reused = conn.connect_time.is_none();
        if let Some(a) = ex.record.attempts.last_mut() {
            a.cookie = Some(conn.cookie);
            a.reused = reused;
        }
        ex.record.connect = conn.connect_time;
        match exchange(cluster, &ep, &mut conn, req, fast, plan, ex).await {
            Ok((response, arrived)) => {
                ex.record.first_byte = Some(arrived.saturating_duration_since(ex.record.start));
                if let Some(h2) = conn.h2() {
                    h2.answered();
                }
                report_status(cluster, &ep, response.status(), arrived);
                let lease = Lease {
                    conn,
                    endpoint: ep,
                    idle_timeout: cluster.spec.timeouts.idle,
                    _in_flight: in_flight,
                };
                return Ok(Upstream {
                    response,
                    lease,
                    stall: plan.route.policy.response_timeout,
                    call_deadline: plan.grpc_deadline.then_some(plan.deadline),
                });
            }
            // A pooled connection closed before the request went out: try another connection
            // to the same endpoint; this is not a retry.
            Err(f) if reused && f.unsent.is_some() => {
                debug!(upstream = %ep.addr, "pooled connection was closed; reconnecting");
                let Failed { unsent, .. } = *f;
                req = unsent.expect("checked by the guard");
            }
            Err(mut f) => {
                f.reused = reused;
                tell_connection(&conn, &f);
                ep.health.history.failed(f.error.kind());
                return Err(f);
            }
        }
    }
}

/// A response head's evidence for its endpoint's health: it answered, or it answered that it
/// cannot serve (`decide::health::is_error_status`).
fn report_status(cluster: &Cluster, ep: &Endpoint, status: http::StatusCode, arrived: Instant) {
    use crate::decide::health::{Evidence, is_error_status};
    if is_error_status(status.as_u16()) {
        let detail = || format!("answered {status}");
        cluster.report_at(ep, Evidence::ErrorStatus, arrived, &detail);
    } else {
        cluster.report_at(ep, Evidence::ResponseOk, arrived, &String::new);
    }
}

/// What a stream's failure tells its HTTP/2 connection: no new streams after a GOAWAY (the
/// upstream is going away), the connection closed, or the host died under it; a stream refused
/// with `REFUSED_STREAM` (the upstream sheds load) is counted, and the connection kept unless
/// it refuses 8 in a row (`H2Conn::shed`); and whether a graceful GOAWAY refused
/// it, which `upstream::lifetime` learns from.
fn tell_connection(conn: &UpstreamConn, f: &Failed) {
    let Some(shared) = conn.h2() else { return };
    match f.error {
        ProxyError::UpstreamRefusedStream { goaway: false, .. } => shared.shed(),
        ProxyError::UpstreamRefusedStream { .. }
        | ProxyError::UpstreamReset { .. }
        | ProxyError::UpstreamHostDied { .. }
        | ProxyError::UpstreamWriteTimeout { .. } => shared.retire(),
        _ => {}
    }
    if f.error.graceful_goaway() {
        shared.refused();
    }
}

fn push_attempt(ex: &mut Exchange, endpoint: SocketAddr) {
    ex.record.attempts.push(Attempt {
        endpoint,
        cookie: None,
        reused: false,
        error: None,
        status: None,
    });
}

/// An idle connection at once (`fast`), or one from `checkout` within the request deadline
/// (a new one when `plan.fresh` asks for it). The connection may be to another endpoint when a
/// hedged connect won.
async fn connect_or_reuse(
    cluster: &Arc<Cluster>,
    ep: &Arc<Endpoint>,
    plan: &mut Plan,
    ex: &mut Exchange,
) -> Result<(Arc<Endpoint>, UpstreamConn, bool), ProxyError> {
    let fresh = std::mem::take(&mut plan.fresh);
    if !fresh && let Some(c) = reuse(cluster, ep, ex.record.start) {
        return Ok((ep.clone(), c, true));
    }
    let tried: Vec<SocketAddr> = ex.record.attempts.iter().map(|t| t.endpoint).collect();
    let tried = move |a: SocketAddr| tried.contains(&a);
    let retry = elsewhere(cluster, plan, ex, (Failure::ConnectFailed, true));
    let waiting = AtomicBool::new(false);
    let want = Want {
        tried: &tried,
        fresh,
        hedging: plan.hedging(),
        elsewhere: &|| retry(&tried),
        waiting: &waiting,
    };
    // Boxed: the slow path, kept out of every request's future.
    let checkout = Box::pin(checkout(cluster, ep, want));
    let (winner, conn) = match tokio::time::timeout_at(plan.deadline, checkout).await {
        Ok(r) => r?,
        Err(_) => {
            if waiting.load(Ordering::Relaxed) {
                let max = cluster.spec.limits.max_connections;
                ex.phase = Phase::WaitingForAConnection { max };
            }
            return Err(request_timeout(plan, ex));
        }
    };
    if !Arc::ptr_eq(&winner, ep) {
        // A hedged connect won: the first endpoint had no SYN-ACK by its deadline.
        if let Some(a) = ex.record.attempts.last_mut() {
            a.error = Some(ErrorKind::ConnectTimeout);
        }
        ep.health.history.failed(ErrorKind::ConnectTimeout);
        push_attempt(ex, winner.addr);
        ex.record.hedged = true;
    }
    Ok((winner, conn, false))
}

/// The head as this attempt sends it: a gRPC call's deadline is what is left of it, and an
/// HTTP/1.0 request without `Host` (`no_host`) names the endpoint.
fn for_this_attempt(req: &mut Request<RequestBody>, plan: &Plan, ep: &Endpoint, no_host: bool) {
    if plan.grpc
        && let Some(v) = req.headers_mut().get_mut(GRPC_TIMEOUT)
    {
        // What is left of the call's own deadline, a little more (see `grpc_timeout_left`). Not
        // the route's timeout, when that is shorter: it is the gateway's, from the end of the
        // client's stream, which a client stream can be far from; the gateway enforces it and
        // cancels the upstream's stream there. A value that is no deadline (`abc`, over eight
        // digits) is dropped, as if the client had set none.
        match plan.call_end {
            Some(end) => *v = grpc_timeout_left(end),
            None => {
                req.headers_mut().remove(GRPC_TIMEOUT);
            }
        }
    }
    if no_host {
        // HTTP/1.0 without `Host` goes upstream as HTTP/1.1, which needs one (RFC 9112
        // section 3.2): the endpoint's address, what nginx sends by default (`$proxy_host`).
        let host = http::HeaderValue::try_from(ep.addr.to_string());
        req.headers_mut().insert(
            http::header::HOST,
            host.expect("an address is a valid value"),
        );
    }
}

/// Sends the request on `conn` and awaits the response head; the head, and when it arrived.
async fn exchange(
    cluster: &Cluster,
    ep: &Endpoint,
    conn: &mut UpstreamConn,
    mut req: Request<RequestBody>,
    fast: bool,
    plan: &mut Plan,
    ex: &mut Exchange,
) -> Result<(http::Response<hyper::body::Incoming>, Instant), Box<Failed>> {
    ex.phase = Phase::SendingTheRequest;
    let baseline = acked_before(conn, plan);
    for_this_attempt(&mut req, plan, ep, ex.record.host.is_none());
    let mut send = std::pin::pin!(conn.send(req, cluster.spec.tls.is_some()));
    let result = match plan.done.clone() {
        // The response timeout starts once the client's body has been sent, and the request
        // timeout runs from its last byte.
        Some(body) => tokio::select! {
            biased;
            r = send.as_mut() => Some(r),
            _ = body.ended() => {
                plan.deadline = plan.moved_by(&body);
                plan.done = None;
                None
            }
            _ = body.stalled(plan.deadline, plan.slide()) => {
                return Err(Failed::plain(request_timeout(plan, ex)));
            }
        },
        None => None,
    };
    // The head's arrival, when `await_head` read the clock for it.
    let (result, arrived) = match result {
        Some(r) => (r, None),
        None => {
            ex.phase = Phase::WaitingForTheResponseHead;
            // Sent just now: on a first attempt that found an idle connection at once and had
            // no body, that is within microseconds of the arrival, so the clock need not be
            // read again.
            let sent = if fast && ex.record.retries == 0 && !plan.had_body {
                ex.record.start
            } else {
                Instant::now()
            };
            let on = OnConn {
                cookie: conn.cookie,
                fd: conn.raw_fd(),
                baseline,
                sent,
            };
            // The connection's own timer; an HTTP/2 stream's, for this request only.
            let mut stream_timer = std::pin::pin!(None);
            let timer = match conn.head_timer() {
                Some(t) => t,
                None => {
                    stream_timer.set(Some(tokio::time::sleep_until(plan.deadline)));
                    stream_timer.as_mut().as_pin_mut().expect("just set")
                }
            };
            let (r, arrived) = await_head(send.as_mut(), timer, cluster, ep, on, plan, ex).await?;
            (r, Some(arrived))
        }
    };
    let response = result.map_err(|mut e| {
        let unsent = e.take_message();
        let error = upstream_error(e.into_error(), ep.addr, ex.body.as_deref());
        // The kernel's record of the connection, now closed, says whether this request's
        // bytes reached the upstream.
        let acked = match &error {
            ProxyError::UpstreamReset { .. } => cluster
                .signals
                .established_evidence(conn.cookie)
                .map(|e| e.bytes_acked),
            _ => None,
        };
        Failed::new(error, Delivery::of(baseline, acked), unsent)
    })?;
    Ok((response, arrived.unwrap_or_else(Instant::now)))
}

/// Waits for the response head until the response timeout (from `sent`) or the request
/// deadline, whichever is first, with `timer` (reset at each look; the connection's own, see
/// `UpstreamConn::head_timer`); gives up as soon as the kernel shows that the host died, when
/// the request can go elsewhere.
/// Feeds the endpoint's latency: the head's arrival, a stall, a timeout. The result comes with
/// the time it arrived (read once, for the latency, the access log and the endpoint's health).
async fn await_head<F: Future<Output = SendResult>>(
    mut send: Pin<&mut F>,
    mut timer: Pin<&mut Sleep>,
    cluster: &Cluster,
    ep: &Endpoint,
    on: OnConn,
    plan: &Plan,
    ex: &mut Exchange,
) -> Result<(SendResult, Instant), Box<Failed>> {
    let OnConn {
        cookie,
        baseline,
        sent,
        ..
    } = on;
    let signals = &*cluster.signals;
    let response_timeout = plan.route.policy.response_timeout;
    let response_deadline = sent + response_timeout;
    let until = response_deadline.min(plan.deadline);
    let _awaiting = ep.latency.awaiting(sent);
    // The first look is due a check's time after the sending (`sent` is now or a few
    // microseconds ago: no need to read the clock again), the next ones a check's time apart.
    let mut next_look = sent + HOST_DIED_CHECK;
    loop {
        let slice = next_look.min(until);
        timer.as_mut().reset(slice);
        let polled = std::future::poll_fn(|cx| match send.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Ok(r)),
            Poll::Pending => timer.as_mut().poll(cx).map(Err),
        });
        match polled.await {
            Ok(r) => {
                let arrived = Instant::now();
                if r.is_ok() {
                    let rtt = arrived.saturating_duration_since(sent);
                    ep.latency.sample(rtt, arrived, &cluster.spec.latency);
                }
                return Ok((r, arrived));
            }
            Err(_) if slice >= until => break,
            Err(_) => {
                if let Some(f) = host_died(cluster, ep, on, plan, ex) {
                    return Err(f);
                }
                note_stall(cluster, ep, on);
                next_look = Instant::now() + HOST_DIED_CHECK;
            }
        }
    }
    if response_deadline >= plan.deadline {
        return Err(Failed::plain(request_timeout(plan, ex)));
    }
    ep.latency
        .lower_bound(response_timeout, Source::Responses, &cluster.spec.latency);
    let evidence = signals.established_evidence(cookie);
    let info = live(on);
    let cause = ResponseCause::of(plan.kernel, evidence.as_ref(), stall(info.as_ref()));
    let acked = evidence.as_ref().map(|e| acked(info.as_ref(), e));
    let delivery = Delivery::of(baseline, acked);
    let error = ProxyError::ResponseTimeout {
        endpoint: ep.addr,
        timeout: response_timeout,
        cookie,
        evidence,
        delivery,
        slow_backend: cause == ResponseCause::SlowBackend,
    };
    cluster.report(ep, cause.health_evidence(), &|| error.to_string());
    Err(Failed::new(error, delivery, None))
}

/// The request deadline passed: `request_timeout`, with what the request was doing; or
/// `client_body_timeout` when the upstream was waiting for the client's body, which is then
/// no failure of the endpoint's (a client that stopped sending its body would otherwise have
/// it counted against the upstream, and told that the upstream did not answer). Not for a
/// streaming call (`Plan::streaming`): its client may wait for the upstream's reply before it
/// sends more, which is the upstream being slow.
fn request_timeout(plan: &Plan, ex: &mut Exchange) -> ProxyError {
    // The route's timeout, which a body that kept coming moved on (`Plan::moved_by`); the
    // call's own deadline, from the arrival.
    let timeout = plan.slide().map_or_else(
        || plan.deadline.saturating_duration_since(ex.record.start),
        |s| s.timeout,
    );
    let grpc_deadline = plan.grpc_deadline;
    let body = ex
        .body
        .as_ref()
        .filter(|b| !plan.streaming && b.waiting_for_client());
    let error = match (ex.phase, body) {
        (Phase::SendingTheRequest, Some(body)) => ProxyError::ClientBodyTimeout {
            timeout,
            bytes: body.bytes(),
            grpc_deadline,
            upstream_waiting: true,
            slow: body.below_rate(plan.slide()),
        },
        (phase, _) => ProxyError::RequestTimeout {
            timeout,
            // Waiting for a connection, it had none to any endpoint.
            endpoint: ex
                .record
                .attempts
                .last()
                .map(|a| a.endpoint)
                .filter(|_| !matches!(phase, Phase::WaitingForAConnection { .. })),
            phase,
            grpc_deadline,
        },
    };
    if let Some(a) = ex.record.attempts.last_mut() {
        a.error.get_or_insert(error.kind());
    }
    error
}
