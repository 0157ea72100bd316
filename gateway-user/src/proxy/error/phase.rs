//! What a request was doing when its time ran out, as `request_timeout` messages say it.

use std::{fmt, net::SocketAddr, time::Duration};

/// What a request was doing, for `request_timeout` messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A gRPC call whose deadline had passed when it arrived (`Deadline::passed`).
    OnArrival,
    Routing,
    Connecting,
    SendingTheRequest,
    WaitingForTheResponseHead,
    /// For a connection to free up: all `max` of the cluster's were in use.
    WaitingForAConnection {
        max: usize,
    },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::OnArrival => "its deadline had passed on arrival",
            Phase::Routing => "routing",
            Phase::Connecting => "connecting",
            Phase::SendingTheRequest => "sending the request",
            Phase::WaitingForTheResponseHead => "waiting for the response head",
            Phase::WaitingForAConnection { max } => {
                return write!(
                    f,
                    "waiting for a connection: all {max} of the cluster's max_connections in use"
                );
            }
        })
    }
}

pub(super) struct During<'a>(pub &'a Option<SocketAddr>, pub Phase);

impl fmt::Display for During<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ep) => write!(f, "from {ep} ({})", self.1),
            None => write!(f, "({})", self.1),
        }
    }
}

/// How a client's body ran out of time, for `ProxyError::ClientBodyTimeout`: it stopped, or it
/// kept coming below the minimum rate (`request_body::MIN_BODY_RATE`).
pub(super) struct Pace {
    pub slow: Option<Duration>,
    pub grpc_deadline: bool,
    pub timeout: Duration,
}

impl fmt::Display for Pace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let timeout = self.timeout.as_millis();
        match self.slow {
            Some(took) => write!(
                f,
                "in {} ms, slower than {} bytes a second (each byte buys {} ms past the request \
                 timeout of {timeout} ms)",
                took.as_millis(),
                crate::proxy::request_body::MIN_BODY_RATE,
                1000.0 / crate::proxy::request_body::MIN_BODY_RATE,
            ),
            None if self.grpc_deadline => write!(
                f,
                "and not the rest when the call's deadline (grpc-timeout) of {timeout} ms passed"
            ),
            None => write!(
                f,
                "then nothing more for the request timeout of {timeout} ms"
            ),
        }
    }
}
