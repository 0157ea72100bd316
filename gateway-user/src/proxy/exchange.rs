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
    shared::Shared,
    telemetry::RouteMeter,
    upstream::{Cluster, Endpoint, Lease},
};
use crate::decide::budget::ActiveRequest;

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
    /// The endpoint of the latest attempt: the request's latency goes into its history.
    pub endpoint: Option<Arc<Endpoint>>,
}

impl Exchange {
    pub fn new(shared: Arc<Shared>, client: SocketAddr, req: &Request<Incoming>) -> Box<Self> {
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
            endpoint: None,
        })
    }

    /// The request was routed to `cluster` by the route `name` whose meter is `meter`.
    pub fn routed(
        &mut self,
        name: Arc<str>,
        cluster: &Arc<Cluster>,
        meter: Option<Arc<RouteMeter>>,
    ) {
        self.record.route = Some(name);
        self.record.cluster = Some(cluster.name.clone());
        self.meter = meter;
        self.active = Some(cluster.budgets.start_request());
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
            // The client went away before the end of the response.
            self.record.aborted = true;
        }
        if let Some(ep) = &self.endpoint {
            let history = &ep.health.history;
            history.request(self.record.start.elapsed());
            // A failure after the response head (a stalled body) is the endpoint's too.
            if let Some(k) = self.record.error
                && self.record.attempts.last().and_then(|a| a.error) != Some(k)
            {
                history.failed(k);
            }
        }
        let shared = &self.shared;
        shared
            .telemetry
            .request_done(&self.record, self.meter.as_deref());
        shared.log.log(&self.record);
    }
}
