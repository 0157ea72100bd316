//! One request's context, from its arrival to the end of its response: the access-log
//! [`Record`] (plain data), the guard that counts it among its cluster's requests in flight,
//! its route's metric handles, the upstream connection lent to it, the endpoint of its latest
//! attempt, and what it is doing now. The response body owns it; when the response is over
//! (or abandoned) the connection goes back, the request is counted (in the metrics and in the
//! endpoint's history) and its log line is written.

use std::{net::SocketAddr, sync::Arc};

use http::Request;
use hyper::body::Incoming;

use super::{
    access_log::Record,
    error::Phase,
    io::Busy,
    router::CompiledRoute,
    shared::Shared,
    telemetry::RouteMeter,
    upstream::{Cluster, Endpoint, Lease},
};
use crate::{config::ExposeErrors, decide::budget::ActiveRequest};

pub(crate) struct Exchange {
    pub record: Record,
    pub shared: Arc<Shared>,
    /// The route's metric handles; `None` until routed.
    pub meter: Option<Arc<RouteMeter>>,
    /// Counts the request in its cluster's retry and hedge budgets until the response is over.
    active: Option<ActiveRequest>,
    /// The upstream connection the response comes on.
    pub lease: Option<Lease>,
    /// What the request is doing, for `request_timeout` messages.
    pub phase: Phase,
    /// The route it matched; `None` until routed.
    pub route: Option<Arc<CompiledRoute>>,
    /// What the gateway's own error response may say (`expose_upstream_errors`).
    pub expose: ExposeErrors,
    /// A gRPC call: the gateway's own errors are gRPC statuses.
    pub grpc: bool,
    /// The request ID's header, when request IDs are on (the value is in the record).
    pub request_id_header: Option<http::HeaderName>,
    /// The client's request body on its way, for its byte count; `None` without a body.
    pub body: Option<Arc<super::request_body::Progress>>,
    /// The endpoint of the latest attempt: the request's latency goes into its history.
    pub endpoint: Option<Arc<Endpoint>>,
    /// A gRPC call's own deadline (`grpc-timeout`), when shorter than the route's.
    pub call_deadline: Option<tokio::time::Instant>,
    /// Counts the request as running on its client connection until the response is over
    /// (see `server::park`, whose header-read timeout runs only between responses).
    busy: Busy,
    /// Counted in the metrics, and its log line written (else the drop does both).
    counted: bool,
    logged: bool,
    /// The request came with a body (which `body` follows once the request path reads it).
    pub has_body: bool,
}

/// How close to its `grpc-timeout` a gRPC call's reset counts as the client keeping to its
/// deadline (clocks and the network put the client's timer a little ahead of the gateway's).
const CALL_DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_millis(50);

/// The status logged and counted for a request whose client went away before its response
/// began (nginx's "client closed request").
pub(crate) const CLIENT_CLOSED: u16 = 499;

impl Exchange {
    pub fn new(
        shared: Arc<Shared>,
        client: SocketAddr,
        req: &Request<Incoming>,
        busy: Busy,
    ) -> Box<Self> {
        Box::new(Exchange {
            record: Record::new(
                client,
                req.method().clone(),
                req.uri().clone(),
                req.version(),
            ),
            shared,
            meter: None,
            active: None,
            lease: None,
            phase: Phase::Routing,
            route: None,
            expose: ExposeErrors::Reason,
            grpc: false,
            request_id_header: None,
            body: None,
            endpoint: None,
            call_deadline: None,
            busy,
            counted: false,
            logged: false,
            has_body: !hyper::body::Body::is_end_stream(req.body()),
        })
    }

    /// The request was routed to `cluster` by `route`, whose meter is `meter`.
    pub fn routed(
        &mut self,
        route: &Arc<CompiledRoute>,
        cluster: &Arc<Cluster>,
        meter: Option<Arc<RouteMeter>>,
    ) {
        self.record.route = Some(route.name.clone());
        self.route = Some(route.clone());
        self.record.cluster = Some(cluster.name.clone());
        self.meter = meter;
        self.active = Some(cluster.budgets.start_request());
    }

    /// The request is over as a request (a `101`: its tunnel is no request): it leaves its
    /// cluster's retry and hedge budgets, whose share it would otherwise swell for as long as
    /// the tunnel lasts.
    pub fn end_active(&mut self) {
        self.active = None;
    }

    /// The request's `101` hands its client connection's socket to a tunnel.
    pub fn upgrade(&self) {
        self.busy.upgrade();
    }

    /// The client connection's count of response streams waiting for it to read, if it
    /// keeps one (`io::Owed`).
    pub fn owed(&self) -> Option<&super::io::Owed> {
        self.busy.owed()
    }

    /// The request's HTTP/2 stream ended; `reset`: its client went away before its response
    /// was over (`resets`: too many such resets early close the connection). Only streams that
    /// reached an upstream count: a reset costs an upstream nothing before that, and streams
    /// the gateway answers itself (a 404) would dilute the share. A gRPC call reset at its own
    /// deadline is the client keeping to it, not a premature reset (the gateway's timer for the
    /// same deadline fires at about the same time).
    fn stream_ended(&self, reset: bool) {
        let Some(o) = self.busy.owed() else { return };
        if self.record.attempts.is_empty() {
            return;
        }
        let at_deadline = || {
            self.call_deadline
                .is_some_and(|d| tokio::time::Instant::now() + CALL_DEADLINE_SLACK >= d)
        };
        o.resets
            .stream_ended(&o.wake, reset && !at_deadline(), self.record.start);
    }

    /// The response was read to the end: the connection may serve another request.
    pub fn release(&mut self) {
        if let Some(l) = self.lease.take() {
            l.release();
        }
    }

    /// The response is over: counts the request and writes its log line. `complete`: its body
    /// was sent to the end.
    pub fn finish(&mut self, complete: bool) {
        if !complete && self.record.error.is_none() {
            // The client side ended before the end of the response.
            self.record.aborted = true;
            self.record.cut_short = Some(self.cut_by());
        }
        self.stream_ended(self.record.aborted);
        self.count();
        self.log();
    }

    /// Who ended a response that its client did not get whole, when its upstream did not: the
    /// gateway at a forced drain, the gateway giving up on a client that stopped reading, or
    /// the client going away.
    fn cut_by(&self) -> &'static str {
        use super::telemetry::{
            CLIENT_CLOSED_REASON, CLIENT_WRITE_TIMEOUT_REASON, SHUTDOWN_REASON,
        };
        if self.shared.drain_forced() {
            SHUTDOWN_REASON
        } else if self.busy.client_stopped_reading() {
            CLIENT_WRITE_TIMEOUT_REASON
        } else {
            CLIENT_CLOSED_REASON
        }
    }

    /// Counts the request in the metrics (its status and duration). An upgraded connection is
    /// counted at its `101` (so that hours of WebSocket stay out of the request-duration
    /// histogram) and logged at its end ([`Exchange::log`]).
    pub fn count(&mut self) {
        self.counted = true;
        self.note_request_bytes();
        // One clock read for the endpoint's history and the duration histogram.
        let elapsed = self.record.start.elapsed();
        if let Some(ep) = &self.endpoint {
            let history = &ep.health.history;
            history.request(elapsed);
            // A failure after the response head (a stalled body) is the endpoint's too.
            if let Some(k) = self.record.error
                && self.record.attempts.last().and_then(|a| a.error) != Some(k)
            {
                history.failed(k);
            }
        }
        self.shared
            .telemetry
            .request_done(&self.record, elapsed, self.meter.as_deref());
    }

    /// The request body's bytes so far, into the record.
    fn note_request_bytes(&mut self) {
        if let Some(b) = &self.body {
            self.record.request_bytes = self.record.request_bytes.max(b.bytes());
        }
    }

    /// The client's body was not read to its end (an answer before it, or a failure in it):
    /// an HTTP/1 connection cannot be used again, as the rest of the body is still coming.
    pub fn body_unread(&self) -> bool {
        self.has_body && self.body.as_ref().is_none_or(|p| !p.complete())
    }

    /// Writes the log line.
    pub fn log(&mut self) {
        self.logged = true;
        self.shared.log.log(&self.record);
    }
}

/// A request dropped before its response began: hyper drops the request's future when its
/// client closes the connection (or at the end of a forced drain). It is logged and counted
/// all the same, as `499` and `aborted`, so that the requests whose clients gave up on a slow
/// upstream do not vanish from the log and the metrics. Not a latency sample of the endpoint:
/// the client's patience is not the upstream's speed. At a forced drain the log line's
/// `detail` says that the gateway dropped it, not its client.
impl Drop for Exchange {
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        self.stream_ended(!self.counted);
        if !self.counted {
            self.record.status = CLIENT_CLOSED;
            self.record.aborted = true;
            if self.shared.drain_forced() {
                let why = "dropped by the gateway: the drain's grace period (shutdown_grace_ms) ran out before the response began";
                self.record.error_detail = Some(match self.record.error_detail.take() {
                    Some(earlier) => format!("{why}; before that: {earlier}"),
                    None => why.to_owned(),
                });
            }
            self.note_request_bytes();
            let elapsed = self.record.start.elapsed();
            self.shared
                .telemetry
                .request_done(&self.record, elapsed, self.meter.as_deref());
        }
        self.log();
    }
}
