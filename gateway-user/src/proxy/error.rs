//! Everything that can go wrong with a proxied request, as one typed error with a kind (the
//! machine reason in `x-gateway-error` and the access log), a status (502/503/504/4xx), and
//! what it means for a retry ([`ProxyError::failure`], judged by `decide::retry`).

use std::{fmt, io, net::SocketAddr, time::Duration};

use thiserror::Error;

mod evidence_header;
mod kind;
mod phase;

use crate::{
    decide::{
        evidence::{ConnectFailure, TlsFailure},
        retry::{Delivery, Failure},
    },
    signals::{ConnectEvidence, EstablishedEvidence},
};
pub use kind::ErrorKind;
pub use phase::Phase;
use phase::{During, Pace};

/// Renders optional kernel evidence as a suffix.
struct Ev<'a, T>(&'a Option<T>);

impl<T: fmt::Display> fmt::Display for Ev<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(e) => write!(f, "; {e}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("connect timeout to {endpoint} after {} ms{}", timeout.as_millis(), Ev(evidence))]
    ConnectTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
        cookie: u64,
        evidence: Option<ConnectEvidence>,
    },
    #[error("connection refused by {endpoint} after {} ms{}", elapsed.as_millis(), Ev(evidence))]
    ConnectRefused {
        endpoint: SocketAddr,
        elapsed: Duration,
        cookie: u64,
        evidence: Option<ConnectEvidence>,
    },
    #[error("{endpoint} unreachable: {source}{}", Ev(evidence))]
    ConnectUnreachable {
        endpoint: SocketAddr,
        source: io::Error,
        cookie: u64,
        evidence: Option<ConnectEvidence>,
    },
    #[error("connect to {endpoint} failed: {source}")]
    ConnectFailed {
        endpoint: SocketAddr,
        source: io::Error,
        cookie: Option<u64>,
    },
    #[error(
        "TLS handshake with {endpoint} {} within {} ms; {tcp}{}",
        tcp.stalled(), timeout.as_millis(), TlsKernel(evidence)
    )]
    TlsHandshakeTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
        cookie: u64,
        tcp: Box<TcpUnderneath>,
        /// The kernel's final record of the TCP connection, read after it was closed.
        evidence: Option<Box<EstablishedEvidence>>,
    },
    #[error(
        "TLS handshake with {endpoint} failed ({}): {detail}; {tcp}{}",
        failure.name(), TlsKernel(evidence)
    )]
    TlsError {
        endpoint: SocketAddr,
        failure: TlsFailure,
        /// What rustls said (e.g. "invalid peer certificate: UnknownIssuer").
        detail: String,
        cookie: u64,
        tcp: Box<TcpUnderneath>,
        evidence: Option<Box<EstablishedEvidence>>,
    },
    #[error(
        "no response from {endpoint} within {} ms{}{}", timeout.as_millis(), Ev(evidence),
        if *slow_backend { " (slow_backend: the upstream's kernel ACKed the request and nothing needed retransmitting; the application did not answer)" } else { "" }
    )]
    ResponseTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
        cookie: u64,
        evidence: Option<EstablishedEvidence>,
        delivery: Delivery,
        /// Kernel evidence says the request arrived: the backend, not the network, is slow.
        slow_backend: bool,
    },
    #[error(
        "{endpoint} stopped answering mid-request after {} ms: the kernel retransmitted {} time(s) on its connection ({} RTOs) and {} byte(s) stay unACKed (host or path died){}",
        after.as_millis(), evidence.data_retransmits, evidence.rtos, evidence.unacked_bytes,
        if *delivery == Delivery::NotReceived { "; none of the request reached the upstream" } else { "" }
    )]
    UpstreamHostDied {
        endpoint: SocketAddr,
        after: Duration,
        cookie: u64,
        /// The kernel's record of the connection, over its whole life; `delivery`: what it
        /// proves of this request's own bytes.
        evidence: EstablishedEvidence,
        delivery: Delivery,
    },
    #[error("{endpoint} stopped reading the request for {} ms", timeout.as_millis())]
    UpstreamWriteTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    #[error("{endpoint} closed the connection before a complete response: {source}")]
    UpstreamReset {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
    #[error(
        "{endpoint} refused the request unprocessed ({}): {source}",
        if *goaway { "HTTP/2 GOAWAY below its stream" } else { "HTTP/2 REFUSED_STREAM" }
    )]
    UpstreamRefusedStream {
        endpoint: SocketAddr,
        source: hyper::Error,
        /// A GOAWAY (else an RST_STREAM with REFUSED_STREAM).
        goaway: bool,
        /// A GOAWAY with NO_ERROR (see [`ProxyError::graceful_goaway`]).
        graceful: bool,
    },
    #[error(
        "cluster `{cluster}` speaks {protocol} to its upstreams; an HTTP/1.1 `Upgrade` (WebSocket) needs protocol = \"http1\" (WebSocket over HTTP/2, RFC 8441, is not supported)"
    )]
    UpgradeUnsupported {
        cluster: String,
        protocol: &'static str,
    },
    #[error("{endpoint} answered the upgrade but {what}")]
    UpgradeFailed {
        endpoint: SocketAddr,
        what: &'static str,
    },
    #[error("invalid response from {endpoint}: {source}{}", head_limits(source))]
    InvalidUpstreamResponse {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
    /// A response hyper took but the gateway does not pass on (`respond::refused`).
    #[error("invalid response from {endpoint}: {what}")]
    UpstreamResponseRefused {
        endpoint: SocketAddr,
        what: &'static str,
    },
    #[error("no healthy endpoint in cluster `{cluster}` ({total} endpoint(s), {ejected} ejected)")]
    NoHealthyUpstream {
        cluster: String,
        total: usize,
        ejected: usize,
    },
    #[error(
        "cluster `{cluster}` overloaded: {limit} request(s) already waiting for a connection (max_pending_requests)"
    )]
    Overloaded { cluster: String, limit: usize },
    #[error(
        "no response {} within the {} of {} ms", During(endpoint, *phase),
        if *grpc_deadline { "call's deadline (grpc-timeout)" } else { "request timeout" },
        timeout.as_millis()
    )]
    RequestTimeout {
        timeout: Duration,
        endpoint: Option<SocketAddr>,
        phase: Phase,
        /// The deadline was the gRPC call's own `grpc-timeout`, shorter than the route's.
        grpc_deadline: bool,
    },
    #[error(
        "the client had sent {bytes} bytes of its request body, {}; {}",
        Pace { slow: *slow, grpc_deadline: *grpc_deadline, timeout: *timeout },
        if *upstream_waiting {
            "the upstream was waiting for it"
        } else {
            "no upstream had been asked (the gateway reads the start of a body before it takes an upstream connection: request_buffering)"
        }
    )]
    ClientBodyTimeout {
        timeout: Duration,
        bytes: u64,
        grpc_deadline: bool,
        /// The body was on its way to an upstream; `false` while the gateway read it ahead.
        upstream_waiting: bool,
        /// The body kept coming, below the minimum rate: for how long
        /// (`request_body::Progress::below_rate`).
        slow: Option<Duration>,
    },
    #[error("no route for host {host:?}, path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("client {client} is not in the route's allow_clients")]
    ClientNotAllowed { client: String },
    #[error("over the route's rate_limit; retry after {retry_after:?}")]
    RateLimited { retry_after: Duration },
    #[error("bad request: {what}")]
    BadRequest { what: &'static str },
    #[error("request head is {size} bytes; the limit is {limit} (max_request_header_bytes)")]
    RequestHeadersTooLarge { size: usize, limit: usize },
    #[error("request has {fields} {what}; the limit is {limit}")]
    TooManyRequestHeaders {
        fields: usize,
        what: &'static str,
        limit: usize,
    },
    #[error("request body exceeds {limit} bytes (max_request_body_bytes)")]
    RequestBodyTooLarge { limit: u64 },
    #[error("reading the request body from the client failed: {source}")]
    DownstreamBodyError { source: hyper::Error },
}

/// The largest response head an upstream may send (Envoy's default), checked once parsed
/// (`request::respond`; HTTP/2: the header list): clients take no more (curl, nghttp2).
pub(crate) const RESPONSE_HEAD_MAX_BYTES: usize = 60 * 1024;
/// The HTTP/1 client's read buffer, which also bounds each read of a body: so not the limit.
pub(crate) const UPSTREAM_READ_BUFFER: usize = 256 * 1024;
/// How many header fields an HTTP/1 response head may have: hyper's default, which keeps the
/// parser's table of fields inline. HAProxy and Envoy also stop at about 100; nginx counts only
/// bytes. `security_smuggling::an_upstream_response_over_the_field_limit_is_refused_naming_the_limits`
/// fails if hyper's default moves.
const RESPONSE_HEAD_MAX_FIELDS: usize = 100;

/// What an upstream's response head outgrew, for hyper's "message head is too large", which
/// says the same of too many fields as of too many bytes.
fn head_limits(e: &hyper::Error) -> String {
    if !e.is_parse_too_large() {
        return String::new();
    }
    format!(
        " (at most {RESPONSE_HEAD_MAX_FIELDS} header fields and {} KiB)",
        RESPONSE_HEAD_MAX_BYTES / 1024
    )
}

/// What is known of the TCP connection under a TLS handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpUnderneath {
    /// `connect()` to established, as the gateway measured it.
    pub connect: Duration,
    /// SYN to SYN-ACK, as the kernel measured it (eBPF), when it did.
    pub kernel_rtt: Option<Duration>,
    /// Bytes of the handshake the upstream sent (`TCP_INFO`), when read.
    pub server_bytes: Option<u64>,
}

impl TcpUnderneath {
    fn stalled(&self) -> String {
        match self.server_bytes {
            Some(0) => "got no ServerHello".to_owned(),
            Some(n) => format!("stalled after {n} byte(s) from the upstream"),
            None => "did not finish".to_owned(),
        }
    }
}

impl fmt::Display for TcpUnderneath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        match self.kernel_rtt {
            Some(rtt) => write!(f, "TCP established in {:.1} ms (kernel)", ms(rtt)),
            None => write!(f, "TCP established in {:.1} ms", ms(self.connect)),
        }
    }
}

/// The kernel's record of the TCP connection under a failed TLS handshake, in words.
struct TlsKernel<'a>(&'a Option<Box<EstablishedEvidence>>);

impl fmt::Display for TlsKernel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(e) = self.0 else { return Ok(()) };
        if crate::decide::evidence::host_died(e) {
            write!(
                f,
                "; {} RTOs on the connection, {} bytes unACKed (host or path died)",
                e.rtos, e.unacked_bytes
            )
        } else {
            write!(
                f,
                "; kernel: the upstream ACKed {} byte(s) of ours, {} retransmits, {} RTOs (the network is fine: the TLS server is at fault)",
                e.bytes_acked, e.data_retransmits, e.rtos
            )
        }
    }
}

impl ProxyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::ConnectTimeout { .. } => ErrorKind::ConnectTimeout,
            ProxyError::ConnectRefused { .. } => ErrorKind::ConnectRefused,
            ProxyError::ConnectUnreachable { .. } => ErrorKind::ConnectUnreachable,
            // The gateway itself is out of descriptors: its own overload, not the upstream's
            // failure (and no evidence about the endpoint, see `decide::evidence`).
            ProxyError::ConnectFailed { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) =>
            {
                ErrorKind::Overloaded
            }
            ProxyError::ConnectFailed { .. } => ErrorKind::ConnectFailed,
            ProxyError::TlsHandshakeTimeout { .. } => ErrorKind::TlsHandshakeTimeout,
            ProxyError::TlsError { .. } => ErrorKind::TlsError,
            ProxyError::ResponseTimeout { .. } => ErrorKind::ResponseTimeout,
            ProxyError::UpstreamHostDied { .. } => ErrorKind::UpstreamHostDied,
            ProxyError::UpstreamWriteTimeout { .. } => ErrorKind::UpstreamWriteTimeout,
            ProxyError::UpstreamReset { .. } => ErrorKind::UpstreamReset,
            ProxyError::UpstreamRefusedStream { .. } => ErrorKind::UpstreamRefusedStream,
            ProxyError::InvalidUpstreamResponse { .. }
            | ProxyError::UpstreamResponseRefused { .. } => ErrorKind::InvalidUpstreamResponse,
            ProxyError::UpgradeUnsupported { .. } => ErrorKind::UpgradeUnsupported,
            ProxyError::UpgradeFailed { .. } => ErrorKind::UpgradeFailed,
            ProxyError::NoHealthyUpstream { .. } => ErrorKind::NoHealthyUpstream,
            ProxyError::Overloaded { .. } => ErrorKind::Overloaded,
            ProxyError::RequestTimeout { .. } => ErrorKind::RequestTimeout,
            ProxyError::ClientBodyTimeout { .. } => ErrorKind::ClientBodyTimeout,
            ProxyError::NoRoute { .. } => ErrorKind::NoRoute,
            ProxyError::ClientNotAllowed { .. } => ErrorKind::ClientNotAllowed,
            ProxyError::RateLimited { .. } => ErrorKind::RateLimited,
            ProxyError::BadRequest { .. } => ErrorKind::BadRequest,
            ProxyError::RequestHeadersTooLarge { .. }
            | ProxyError::TooManyRequestHeaders { .. } => ErrorKind::RequestHeadersTooLarge,
            ProxyError::RequestBodyTooLarge { .. } => ErrorKind::RequestBodyTooLarge,
            ProxyError::DownstreamBodyError { .. } => ErrorKind::DownstreamBodyError,
        }
    }

    /// What this error means for a retry; `delivery` is what the kernel proves about the
    /// request's bytes, `reused` whether the connection had carried earlier requests (see
    /// `decide::retry`).
    pub fn failure(&self, delivery: Delivery, reused: bool) -> Failure {
        match self {
            ProxyError::ConnectTimeout { .. }
            | ProxyError::ConnectRefused { .. }
            | ProxyError::ConnectUnreachable { .. }
            | ProxyError::ConnectFailed { .. }
            // No usable connection: nothing of the request was sent.
            | ProxyError::TlsHandshakeTimeout { .. }
            | ProxyError::TlsError { .. } => Failure::ConnectFailed,
            ProxyError::ResponseTimeout { .. } => Failure::ResponseTimeout { delivery },
            ProxyError::UpstreamHostDied { .. } => Failure::ConnectionDied {
                delivery,
                host_died: true,
                reused,
            },
            ProxyError::UpstreamReset { .. } => Failure::ConnectionDied {
                delivery,
                host_died: false,
                reused,
            },
            ProxyError::UpstreamRefusedStream { .. } => Failure::Refused {
                graceful: self.graceful_goaway(),
            },
            _ => Failure::Final,
        }
    }

    /// A stream refused by the upstream's GOAWAY with NO_ERROR: it ends the connection in the
    /// ordinary way (a request limit, a restart), not to shed load or because of an error.
    pub fn graceful_goaway(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamRefusedStream { graceful: true, .. }
        )
    }

    /// How the connect failed, for connect errors.
    pub fn connect_failure(&self) -> Option<ConnectFailure> {
        match self {
            ProxyError::ConnectRefused { .. } => Some(ConnectFailure::Refused),
            ProxyError::ConnectUnreachable { .. } => Some(ConnectFailure::Unreachable),
            ProxyError::ConnectTimeout { .. } => Some(ConnectFailure::Unanswered),
            ProxyError::ConnectFailed { source, .. } => Some(
                source
                    .raw_os_error()
                    .map_or(ConnectFailure::Other, ConnectFailure::from_errno),
            ),
            _ => None,
        }
    }

    /// The kernel's record of the failed connect, when there is one.
    pub fn connect_evidence(&self) -> Option<&ConnectEvidence> {
        match self {
            ProxyError::ConnectRefused { evidence, .. }
            | ProxyError::ConnectUnreachable { evidence, .. }
            | ProxyError::ConnectTimeout { evidence, .. } => evidence.as_ref(),
            _ => None,
        }
    }

    /// How the TLS handshake failed, for TLS errors.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            ProxyError::TlsHandshakeTimeout { .. } => Some(TlsFailure::Timeout),
            ProxyError::TlsError { failure, .. } => Some(*failure),
            _ => None,
        }
    }

    /// The kernel's record of the established connection the error happened on.
    pub fn established_evidence(&self) -> Option<&EstablishedEvidence> {
        match self {
            ProxyError::TlsHandshakeTimeout { evidence, .. }
            | ProxyError::TlsError { evidence, .. } => evidence.as_deref(),
            ProxyError::ResponseTimeout { evidence, .. } => evidence.as_ref(),
            ProxyError::UpstreamHostDied { evidence, .. } => Some(evidence),
            _ => None,
        }
    }

    /// The errno the failed connect returned, as the proxy read it.
    pub fn connect_errno(&self) -> Option<u32> {
        let raw = |e: &io::Error| e.raw_os_error().map(|n| n as u32);
        match self {
            ProxyError::ConnectRefused { .. } => Some(gateway_common::errno::ECONNREFUSED),
            ProxyError::ConnectTimeout { .. } => Some(gateway_common::errno::ETIMEDOUT),
            ProxyError::ConnectUnreachable { source, .. }
            | ProxyError::ConnectFailed { source, .. } => raw(source),
            _ => None,
        }
    }

    /// `SO_COOKIE` of the upstream socket the error happened on, if there was one.
    pub fn cookie(&self) -> Option<u64> {
        match self {
            ProxyError::ConnectTimeout { cookie, .. }
            | ProxyError::ConnectRefused { cookie, .. }
            | ProxyError::ConnectUnreachable { cookie, .. }
            | ProxyError::ResponseTimeout { cookie, .. }
            | ProxyError::TlsHandshakeTimeout { cookie, .. }
            | ProxyError::TlsError { cookie, .. }
            | ProxyError::UpstreamHostDied { cookie, .. } => Some(*cookie),
            ProxyError::ConnectFailed { cookie, .. } => *cookie,
            _ => None,
        }
    }

    /// The upstream endpoint the error is about, if any.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            ProxyError::ConnectTimeout { endpoint, .. }
            | ProxyError::ConnectRefused { endpoint, .. }
            | ProxyError::ConnectUnreachable { endpoint, .. }
            | ProxyError::ConnectFailed { endpoint, .. }
            | ProxyError::TlsHandshakeTimeout { endpoint, .. }
            | ProxyError::TlsError { endpoint, .. }
            | ProxyError::ResponseTimeout { endpoint, .. }
            | ProxyError::UpstreamHostDied { endpoint, .. }
            | ProxyError::UpstreamWriteTimeout { endpoint, .. }
            | ProxyError::UpstreamReset { endpoint, .. }
            | ProxyError::UpstreamRefusedStream { endpoint, .. }
            | ProxyError::UpgradeFailed { endpoint, .. }
            | ProxyError::InvalidUpstreamResponse { endpoint, .. }
            | ProxyError::UpstreamResponseRefused { endpoint, .. } => Some(*endpoint),
            ProxyError::RequestTimeout { endpoint, .. } => *endpoint,
            _ => None,
        }
    }
}

#[cfg(test)]
mod evidence_tests;
