//! What to do after a failed attempt: [`next_step`]. The rule, exactly:
//!
//! 1. The connect failed (no connection): always retry, on a different endpoint. Nothing was
//!    sent. (A connect past its adaptive deadline is given up for this only when a retry
//!    could go somewhere: `deadline::gives_up_at_deadline`.)
//! 2. The connection died (reset, or RTOs with the request unACKed) or the response timer
//!    fired, and the kernel proves **none** of this request's bytes were ACKed by the
//!    upstream's kernel ([`Delivery::NotReceived`]): the request never reached the upstream
//!    application, so it may be retried even when the method is not idempotent
//!    (`unacked_request`).
//! 3. A **reused** keep-alive connection broke (reset or closed) before any response byte, under
//!    an idempotent request: retry (`stale_connection`), on a fresh connection, to the same
//!    endpoint if no other is left. This is the upstream closing an idle connection just as a
//!    request is written on it; the endpoint is not at fault.
//! 4. The host died under an idempotent request (RTOs with bytes unACKed): retry
//!    (`upstream_reset`), whatever `on_response_timeout` says — the upstream cannot answer.
//! 5. Anything else — some or all of the request ACKed, or no kernel evidence — is retried
//!    only when the method is idempotent and the policy allows retries on that failure
//!    (`response_timeout` / `upstream_reset`). A partial ACK is never "safe".
//! 6. HTTP/2: the upstream said it never processed the stream — a `GOAWAY` whose
//!    last-stream-id is below it, or `RST_STREAM(REFUSED_STREAM)` (RFC 9113 section 8.7) —
//!    so it is retried whatever the method (`refused_stream`). The first refusal goes to
//!    another connection (another endpoint when one is left), outside the budget like a stale
//!    connection, since a graceful upstream restart refuses every stream in flight above its
//!    last id at once. A second refusal by a graceful GOAWAY (NO_ERROR: the connection's
//!    lifecycle, not a failure of the request) goes to a new connection whose first stream is
//!    this request's (`multiplex`: a connection the upstream ends after N requests processes
//!    its first), also outside the budget; these two are also outside `max_retries`
//!    ([`FREE_REFUSALS`]), unless `max_retries` is 0, which turns every retry off.
//!    `REFUSED_STREAM` (an upstream shedding load, whose connection stays: `H2Conn::shed`)
//!    counts in `max_retries`, and refused again, a new connection would not help: a retry
//!    after its second refusal goes to the endpoint's connections as they are, counted and
//!    within the budget. A stream refused by a graceful GOAWAY even as the first on its
//!    connection means the upstream is going away: from the third refusal on, a retry is an
//!    ordinary one, to another endpoint, counted and within the budget.
//! 7. gRPC: a call answered with only a status (a trailers-only response: no message reached
//!    the client, so nothing is committed) whose code the route lists in
//!    `grpc_status_codes` (`grpc_status`). gRPC calls are POSTs, so rules 1, 2 and 6 — the
//!    request provably never reached the application — are gRPC's "nothing was sent
//!    upstream"; rules 3 to 5 need an idempotent method and never apply to them.
//! 8. An upstream response whose status the route lists in `status_codes` (a `503` from an
//!    instance shutting down or shedding load, a `502` from a sidecar whose app is gone),
//!    under an idempotent request: another endpoint, as nginx's `proxy_next_upstream
//!    http_503` and Envoy's `retriable_status_codes` do (`upstream_status`). The upstream
//!    answered, so it received the request: a non-idempotent one is never sent again for
//!    its status. The response is given up only once a retry is certain (an endpoint to go
//!    to, within `max_retries` and the budget); otherwise the client gets it as it came.
//!
//! Then, in this order: the request must still be at hand to send again (a streamed body is
//! gone once sent), fewer than `max_retries` retries may have happened, and the cluster's
//! retry budget ([`super::budget`]) must have room. A `stale_connection` retry is outside the
//! budget: it goes on a fresh connection, where a second failure is no longer stale, so it
//! can at most double one request, and an upstream that closes keep-alive connections under
//! many requests at once (they were opened together, they are closed together) must not turn
//! into client errors.

use std::sync::Arc;

/// Refusals of a request's HTTP/2 streams retried outside `max_retries` and the budget (rule 6).
pub const FREE_REFUSALS: u32 = 2;

use super::{
    budget::{Budgets, RetryPermit},
    grpc::{GrpcCode, GrpcCodes},
};

/// What the kernel proves about whether this request's bytes reached the upstream's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// No kernel evidence, or no baseline to tell this request's bytes from earlier ones.
    Unknown,
    /// Not one byte of this request was ACKed.
    NotReceived,
    /// Some or all of it was ACKed.
    Received,
}

impl Delivery {
    /// From the connection's `bytes_acked` (SYN excluded) when it failed, and the same count
    /// when the request started (`baseline`): 0 on a fresh connection, `None` when unknown (a
    /// reused connection, whose earlier requests' bytes are not tracked).
    pub fn of(baseline: Option<u64>, acked: Option<u64>) -> Delivery {
        match (baseline, acked) {
            (Some(b), Some(a)) if a <= b => Delivery::NotReceived,
            (Some(_), Some(_)) => Delivery::Received,
            _ => Delivery::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made.
    ConnectFailed,
    /// The connection broke before a response: a reset or EOF, or (`host_died`) RTOs with
    /// the request unACKed. `reused`: it had carried earlier requests (a keep-alive
    /// connection from the pool).
    ConnectionDied {
        delivery: Delivery,
        host_died: bool,
        reused: bool,
    },
    /// The response timer fired.
    ResponseTimeout { delivery: Delivery },
    /// HTTP/2: the upstream refused the stream unprocessed (GOAWAY above its last-stream-id,
    /// or REFUSED_STREAM). `graceful`: by a GOAWAY with NO_ERROR, the way an upstream ends a
    /// connection after N requests or at a restart (not REFUSED_STREAM, which sheds load).
    Refused { graceful: bool },
    /// gRPC: a trailers-only response with this status.
    GrpcStatus(GrpcCode),
    /// A response head with this HTTP status (rule 8).
    UpstreamStatus(u16),
    /// A failure another endpoint would not fix (an invalid response, the client's body, a
    /// stalled write, …).
    Final,
}

/// Why a retry is allowed; names are metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    ConnectFailed,
    UnackedRequest,
    StaleConnection,
    ResponseTimeout,
    UpstreamReset,
    RefusedStream,
    GrpcStatus,
    UpstreamStatus,
}

impl RetryReason {
    pub const ALL: [RetryReason; 8] = [
        RetryReason::ConnectFailed,
        RetryReason::UnackedRequest,
        RetryReason::StaleConnection,
        RetryReason::ResponseTimeout,
        RetryReason::UpstreamReset,
        RetryReason::RefusedStream,
        RetryReason::GrpcStatus,
        RetryReason::UpstreamStatus,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            RetryReason::ConnectFailed => "connect_failed",
            RetryReason::UnackedRequest => "unacked_request",
            RetryReason::StaleConnection => "stale_connection",
            RetryReason::ResponseTimeout => "response_timeout",
            RetryReason::UpstreamReset => "upstream_reset",
            RetryReason::RefusedStream => "refused_stream",
            RetryReason::GrpcStatus => "grpc_status",
            RetryReason::UpstreamStatus => "upstream_status",
        }
    }
}

/// Where a retry may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    /// Another endpoint: this one failed.
    Elsewhere,
    /// A fresh connection, to another endpoint if one is left, else to the same one: the
    /// connection failed, not the endpoint (a stale keep-alive connection).
    FreshConnection,
    /// Another connection, to another endpoint if one is left, else to the same one: an
    /// HTTP/2 upstream refused the stream unprocessed on a connection that is now retired, so
    /// any other live connection will do, or a new one shared like any other. Not a fresh
    /// connection of its own: a GOAWAY refuses every stream above its last id at once, and a
    /// connection per refused stream would multiply the connections by the streams in flight.
    AnotherConnection,
}

/// The retry knobs of a route (its cluster's, with the route's overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    /// Retry idempotent requests whose response timed out.
    pub on_response_timeout: bool,
    /// Retry idempotent requests whose connection was reset after the request was ACKed.
    pub on_reset: bool,
    pub budget_percent: u32,
    pub min_retry_concurrency: u32,
    /// gRPC statuses retried (rule 7).
    pub grpc_status_codes: GrpcCodes,
    /// HTTP statuses retried (rule 8).
    pub status_codes: StatusCodes,
}

/// A set of HTTP statuses from 400 to 599 (a route's retryable ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusCodes([u64; 4]);

impl StatusCodes {
    pub const NONE: StatusCodes = StatusCodes([0; 4]);
    /// The statuses a set may hold: the client's and the server's errors.
    pub const RANGE: std::ops::RangeInclusive<u16> = 400..=599;

    /// `self` with `status` added; one outside [`StatusCodes::RANGE`] is not.
    pub fn with(mut self, status: u16) -> StatusCodes {
        if Self::RANGE.contains(&status) {
            let i = usize::from(status - Self::RANGE.start());
            self.0[i / 64] |= 1 << (i % 64);
        }
        self
    }

    pub fn contains(self, status: u16) -> bool {
        Self::RANGE.contains(&status) && {
            let i = usize::from(status - Self::RANGE.start());
            self.0[i / 64] & (1 << (i % 64)) != 0
        }
    }

    pub fn is_empty(self) -> bool {
        self == Self::NONE
    }
}

impl From<&crate::config::RetryPolicy> for RetryPolicy {
    fn from(r: &crate::config::RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_retries: r.max_retries,
            on_response_timeout: r.on_response_timeout,
            on_reset: r.on_reset,
            budget_percent: r.budget_percent,
            min_retry_concurrency: r.min_retry_concurrency,
            grpc_status_codes: r.grpc_status_codes,
            status_codes: r.status_codes,
        }
    }
}

/// What the request path knows about the request that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempted {
    pub idempotent: bool,
    /// The request can be sent again: it was never sent (a connect failure hands it back), or
    /// it had no body and a copy of its head was kept.
    pub resendable: bool,
    /// Retries so far.
    pub retries: u32,
    /// HTTP/2 streams of this request the upstream refused unprocessed so far (each also
    /// counted in `retries`), and those of them retried outside `max_retries` (rule 6).
    pub refused: u32,
    pub free_refusals: u32,
}

/// Why no retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The rule above says no.
    NotRetryable,
    /// The rule allows it but the request is gone (its body was streamed).
    NotResendable,
    MaxRetries,
    /// The cluster's retry budget is spent (counted in `gateway_retry_budget_exhausted_total`).
    BudgetSpent,
}

#[derive(Debug)]
pub enum Step {
    Retry {
        reason: RetryReason,
        to: Where,
        /// Held while the retry is in flight; `None` for a retry outside the budget.
        permit: Option<RetryPermit>,
        /// Counts against `max_retries` (all but a free refusal, rule 6).
        counted: bool,
    },
    Stop(Stop),
}

/// Rules 1–8 of the module doc: `Some(reason)` when the failure may be retried at all.
pub fn retry_allowed(
    failure: Failure,
    idempotent: bool,
    policy: &RetryPolicy,
) -> Option<RetryReason> {
    match failure {
        Failure::ConnectFailed => Some(RetryReason::ConnectFailed),
        Failure::ConnectionDied {
            delivery: Delivery::NotReceived,
            ..
        }
        | Failure::ResponseTimeout {
            delivery: Delivery::NotReceived,
        } => Some(RetryReason::UnackedRequest),
        Failure::ResponseTimeout { .. } => {
            (idempotent && policy.on_response_timeout).then_some(RetryReason::ResponseTimeout)
        }
        Failure::ConnectionDied {
            host_died: false,
            reused: true,
            ..
        } if idempotent => Some(RetryReason::StaleConnection),
        Failure::ConnectionDied { host_died, .. } => {
            (idempotent && (host_died || policy.on_reset)).then_some(RetryReason::UpstreamReset)
        }
        Failure::Refused { .. } => Some(RetryReason::RefusedStream),
        Failure::GrpcStatus(code) => policy
            .grpc_status_codes
            .contains(code)
            .then_some(RetryReason::GrpcStatus),
        Failure::UpstreamStatus(status) => (idempotent && policy.status_codes.contains(status))
            .then_some(RetryReason::UpstreamStatus),
        Failure::Final => None,
    }
}

/// The checks of [`next_step`] before the budget: the rule, the request at hand, and
/// `max_retries`. `Ok` with the reason, and whether the retry is a free refusal (rule 6).
fn admissible(
    failure: Failure,
    attempted: Attempted,
    policy: &RetryPolicy,
) -> Result<(RetryReason, bool), Stop> {
    let reason = retry_allowed(failure, attempted.idempotent, policy).ok_or(Stop::NotRetryable)?;
    if !attempted.resendable {
        return Err(Stop::NotResendable);
    }
    // `max_retries = 0` turns every retry off, these too.
    let free_refusal = failure == (Failure::Refused { graceful: true })
        && attempted.free_refusals < FREE_REFUSALS
        && policy.max_retries > 0;
    // Retries that count: all but the free refusals so far.
    let counted = attempted.retries.saturating_sub(attempted.free_refusals);
    if !free_refusal && counted >= policy.max_retries {
        return Err(Stop::MaxRetries);
    }
    Ok((reason, free_refusal))
}

/// Whether [`next_step`] could retry `failure`, leaving out the budget (which takes a permit):
/// asked before what has side effects of its own, such as picking the endpoint.
pub fn may_retry(failure: Failure, attempted: Attempted, policy: &RetryPolicy) -> bool {
    admissible(failure, attempted, policy).is_ok()
}

/// Retry, or stop and say why.
pub fn next_step(
    failure: Failure,
    attempted: Attempted,
    policy: &RetryPolicy,
    budgets: &Arc<Budgets>,
) -> Step {
    let (reason, free_refusal) = match admissible(failure, attempted, policy) {
        Ok(r) => r,
        Err(stop) => return Step::Stop(stop),
    };
    let to = match failure {
        // The connection broke, not the endpoint (a host that died is `host_died`).
        Failure::ConnectionDied {
            host_died: false,
            reused: true,
            ..
        } => Where::FreshConnection,
        // The upstream refused a stream unprocessed: another connection; refused there too by
        // a graceful GOAWAY (connections the upstream ends every N requests, all near their
        // end), a new one, whose first stream no upstream refuses for that.
        Failure::Refused { .. } if attempted.refused == 0 => Where::AnotherConnection,
        Failure::Refused { graceful: true } if attempted.refused < FREE_REFUSALS => {
            Where::FreshConnection
        }
        // Shed again (REFUSED_STREAM, or a GOAWAY with an error): a new connection would not
        // help, and another endpoint may have none to spare either; the endpoint's
        // connections as they are, as an ordinary retry (counted, within the budget).
        Failure::Refused { graceful: false } => Where::AnotherConnection,
        _ => Where::Elsewhere,
    };
    let shed_again = failure == (Failure::Refused { graceful: false }) && attempted.refused > 0;
    if to != Where::Elsewhere && !shed_again {
        return Step::Retry {
            reason,
            to,
            permit: None,
            counted: !free_refusal,
        };
    }
    match budgets.try_retry(policy.budget_percent, policy.min_retry_concurrency) {
        Some(permit) => Step::Retry {
            reason,
            to,
            permit: Some(permit),
            counted: true,
        },
        None => Step::Stop(Stop::BudgetSpent),
    }
}

#[cfg(test)]
mod tests;
