//! When a failed request may be sent to another endpoint. The rule, exactly:
//!
//! 1. The connect failed (no connection): always retry, on a different endpoint, within the
//!    retry budget. Nothing was sent.
//! 2. The connection died (reset, or RTOs until the response timer fired) and the kernel says
//!    **none** of this request's bytes were ACKed by the upstream's kernel — that is,
//!    `bytes_acked` on the connection did not grow past what earlier requests on it had
//!    sent: the request never reached the upstream application, so it may be retried even
//!    when the method is not idempotent (`unacked_request`).
//! 3. Anything else — some or all of the request ACKed, or no kernel evidence — is retried
//!    only when the method is idempotent and the policy allows retries on that failure
//!    (`response_timeout` / `upstream_reset`). A partial ACK is never "safe".

/// What the proxy knows about the request's bytes on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckState {
    /// Bytes written on the connection before this request started.
    pub written_before: u64,
    /// The kernel's `bytes_acked` for the connection when it failed.
    pub acked: u64,
}

impl AckState {
    /// No byte of this request reached the upstream's kernel.
    pub fn none_acked(&self) -> bool {
        self.acked <= self.written_before
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    ConnectFailed,
    /// The connection broke (RST, EOF, RTOs) before a response.
    ConnectionDied {
        ack: Option<AckState>,
    },
    /// The response timer fired.
    ResponseTimeout {
        ack: Option<AckState>,
    },
}

/// Why a retry is allowed; names are metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    ConnectFailed,
    UnackedRequest,
    ResponseTimeout,
    UpstreamReset,
}

impl RetryReason {
    pub const fn name(self) -> &'static str {
        match self {
            RetryReason::ConnectFailed => "connect_failed",
            RetryReason::UnackedRequest => "unacked_request",
            RetryReason::ResponseTimeout => "response_timeout",
            RetryReason::UpstreamReset => "upstream_reset",
        }
    }
}

/// The retry policy knobs this rule needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retry idempotent requests whose response timed out.
    pub on_response_timeout: bool,
    /// Retry idempotent requests whose connection was reset after the request was ACKed.
    pub on_reset: bool,
}

/// `Some(reason)` when the failed attempt may be retried on another endpoint.
pub fn retry_allowed(
    failure: Failure,
    idempotent: bool,
    policy: RetryPolicy,
) -> Option<RetryReason> {
    match failure {
        Failure::ConnectFailed => Some(RetryReason::ConnectFailed),
        Failure::ConnectionDied { ack: Some(a) } | Failure::ResponseTimeout { ack: Some(a) }
            if a.none_acked() =>
        {
            Some(RetryReason::UnackedRequest)
        }
        Failure::ResponseTimeout { .. } => {
            (idempotent && policy.on_response_timeout).then_some(RetryReason::ResponseTimeout)
        }
        Failure::ConnectionDied { .. } => {
            (idempotent && policy.on_reset).then_some(RetryReason::UpstreamReset)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_ON: RetryPolicy = RetryPolicy {
        on_response_timeout: true,
        on_reset: true,
    };

    #[test]
    fn connect_failures_are_always_retried() {
        assert_eq!(
            retry_allowed(
                Failure::ConnectFailed,
                false,
                RetryPolicy {
                    on_response_timeout: false,
                    on_reset: false
                }
            ),
            Some(RetryReason::ConnectFailed)
        );
    }

    #[test]
    fn an_unacked_post_is_safe_to_retry() {
        // A reused connection: 500 bytes of earlier requests ACKed, nothing of this one.
        let ack = Some(AckState {
            written_before: 500,
            acked: 500,
        });
        assert_eq!(
            retry_allowed(Failure::ConnectionDied { ack }, false, ALL_ON),
            Some(RetryReason::UnackedRequest)
        );
        assert_eq!(
            retry_allowed(Failure::ResponseTimeout { ack }, false, ALL_ON),
            Some(RetryReason::UnackedRequest)
        );
    }

    #[test]
    fn a_partial_ack_is_never_safe_for_a_post() {
        let ack = Some(AckState {
            written_before: 500,
            acked: 501,
        });
        assert_eq!(
            retry_allowed(Failure::ConnectionDied { ack }, false, ALL_ON),
            None
        );
        assert_eq!(
            retry_allowed(Failure::ResponseTimeout { ack }, false, ALL_ON),
            None
        );
    }

    #[test]
    fn acked_or_unknown_requests_follow_the_idempotent_policy() {
        let acked = Some(AckState {
            written_before: 0,
            acked: 120,
        });
        for ack in [acked, None] {
            assert_eq!(
                retry_allowed(Failure::ResponseTimeout { ack }, true, ALL_ON),
                Some(RetryReason::ResponseTimeout)
            );
            assert_eq!(
                retry_allowed(Failure::ResponseTimeout { ack }, false, ALL_ON),
                None
            );
            assert_eq!(
                retry_allowed(
                    Failure::ResponseTimeout { ack },
                    true,
                    RetryPolicy {
                        on_response_timeout: false,
                        on_reset: true
                    }
                ),
                None
            );
            assert_eq!(
                retry_allowed(Failure::ConnectionDied { ack }, true, ALL_ON),
                Some(RetryReason::UpstreamReset)
            );
        }
    }
}
