//! The machine-readable reason of a [`ProxyError`](super::ProxyError) and what it maps to: the
//! HTTP status of the gateway's answer and, for gRPC calls, the gRPC status.

use std::fmt;

use http::StatusCode;

use crate::decide::grpc::GrpcCode;

/// The machine-readable reason, as sent in `x-gateway-error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    ConnectTimeout,
    ConnectRefused,
    ConnectUnreachable,
    ConnectFailed,
    TlsHandshakeTimeout,
    TlsError,
    ResponseTimeout,
    UpstreamHostDied,
    UpstreamWriteTimeout,
    UpstreamReset,
    UpstreamRefusedStream,
    InvalidUpstreamResponse,
    UpgradeUnsupported,
    UpgradeFailed,
    NoHealthyUpstream,
    Overloaded,
    RequestTimeout,
    ClientBodyTimeout,
    NoRoute,
    ClientNotAllowed,
    RateLimited,
    BadRequest,
    RequestHeadersTooLarge,
    RequestBodyTooLarge,
    DownstreamBodyError,
}

impl ErrorKind {
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectUnreachable => "connect_unreachable",
            ErrorKind::ConnectFailed => "connect_failed",
            ErrorKind::TlsHandshakeTimeout => "tls_handshake_timeout",
            ErrorKind::TlsError => "tls_error",
            ErrorKind::ResponseTimeout => "response_timeout",
            ErrorKind::UpstreamHostDied => "upstream_host_died",
            ErrorKind::UpstreamWriteTimeout => "upstream_write_timeout",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::UpstreamRefusedStream => "upstream_refused_stream",
            ErrorKind::InvalidUpstreamResponse => "invalid_upstream_response",
            ErrorKind::UpgradeUnsupported => "upgrade_unsupported",
            ErrorKind::UpgradeFailed => "upgrade_failed",
            ErrorKind::NoHealthyUpstream => "no_healthy_upstream",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::ClientBodyTimeout => "client_body_timeout",
            ErrorKind::NoRoute => "no_route",
            ErrorKind::ClientNotAllowed => "client_not_allowed",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::RequestHeadersTooLarge => "request_headers_too_large",
            ErrorKind::RequestBodyTooLarge => "request_body_too_large",
            ErrorKind::DownstreamBodyError => "downstream_body_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::ConnectRefused
            | ErrorKind::ConnectUnreachable
            | ErrorKind::ConnectFailed
            | ErrorKind::TlsError
            | ErrorKind::UpstreamReset
            | ErrorKind::UpstreamHostDied
            | ErrorKind::InvalidUpstreamResponse
            | ErrorKind::UpgradeFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::NoHealthyUpstream
            | ErrorKind::Overloaded
            | ErrorKind::UpstreamRefusedStream => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpgradeUnsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::ConnectTimeout
            | ErrorKind::TlsHandshakeTimeout
            | ErrorKind::ResponseTimeout
            | ErrorKind::UpstreamWriteTimeout
            | ErrorKind::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::ClientNotAllowed => StatusCode::FORBIDDEN,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::BadRequest | ErrorKind::DownstreamBodyError => StatusCode::BAD_REQUEST,
            ErrorKind::RequestHeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::RequestBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

impl ErrorKind {
    /// The gRPC status of the gateway's own answer to a gRPC call: UNAVAILABLE when no
    /// upstream could take the call (connect failures, an ejected or overloaded cluster, a
    /// connection that died or refused the stream: gRPC clients may retry those),
    /// DEADLINE_EXCEEDED when a timer ran out, and the mapping of gRPC's
    /// `doc/http-grpc-status-mapping.md` for the rest.
    pub fn grpc_status(self) -> GrpcCode {
        match self {
            ErrorKind::ConnectTimeout
            | ErrorKind::ConnectRefused
            | ErrorKind::ConnectUnreachable
            | ErrorKind::ConnectFailed
            | ErrorKind::TlsHandshakeTimeout
            | ErrorKind::TlsError
            | ErrorKind::UpstreamHostDied
            | ErrorKind::UpstreamReset
            | ErrorKind::UpstreamRefusedStream
            | ErrorKind::NoHealthyUpstream
            | ErrorKind::Overloaded
            | ErrorKind::UpstreamWriteTimeout => GrpcCode::UNAVAILABLE,
            ErrorKind::ResponseTimeout
            | ErrorKind::RequestTimeout
            | ErrorKind::ClientBodyTimeout => GrpcCode::DEADLINE_EXCEEDED,
            ErrorKind::NoRoute | ErrorKind::UpgradeUnsupported => GrpcCode::UNIMPLEMENTED,
            ErrorKind::ClientNotAllowed => GrpcCode::PERMISSION_DENIED,
            ErrorKind::RequestHeadersTooLarge
            | ErrorKind::RequestBodyTooLarge
            | ErrorKind::RateLimited => GrpcCode::RESOURCE_EXHAUSTED,
            ErrorKind::BadRequest
            | ErrorKind::DownstreamBodyError
            | ErrorKind::InvalidUpstreamResponse
            | ErrorKind::UpgradeFailed => GrpcCode::INTERNAL,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}
