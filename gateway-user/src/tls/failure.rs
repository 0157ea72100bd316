//! Naming a failed TLS handshake: the error tokio-rustls returns (an `io::Error` that wraps a
//! `rustls::Error`, or the socket's own error) as a [`TlsFailure`] (`decide::evidence`), and
//! the same for the listener's side as a metric reason.

use std::io;

use rustls::{AlertDescription, CertificateError};

use crate::decide::evidence::TlsFailure;

/// The rustls error inside an I/O error from a handshake, if there is one.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// How an upstream handshake failed.
pub fn classify(e: &io::Error) -> TlsFailure {
    match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(c)) => certificate(c),
        Some(rustls::Error::AlertReceived(_)) => TlsFailure::PeerAlert,
        Some(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::PeerIncompatible(_)
            | rustls::Error::PeerMisbehaved(_)
            | rustls::Error::NoApplicationProtocol
            | rustls::Error::PeerSentOversizedRecord
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::DecryptError,
        ) => TlsFailure::Protocol,
        Some(_) => TlsFailure::Protocol,
        None if e.kind() == io::ErrorKind::UnexpectedEof => TlsFailure::PeerClosed,
        None => TlsFailure::Io,
    }
}

fn certificate(c: &CertificateError) -> TlsFailure {
    match c {
        CertificateError::UnknownIssuer => TlsFailure::UnknownCa,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            TlsFailure::NameMismatch
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => TlsFailure::Expired,
        _ => TlsFailure::BadCertificate,
    }
}

/// Why a client's handshake with the HTTPS listener failed (the `reason` label of
/// `gateway_tls_handshake_errors_total{side="downstream"}`).
pub fn downstream_reason(e: &io::Error) -> &'static str {
    match rustls_error(e) {
        // The client refused our certificate (unknown CA, wrong name, expired, …).
        Some(rustls::Error::AlertReceived(a)) => match a {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked => "client_rejected_certificate",
            _ => "client_alert",
        },
        Some(rustls::Error::InvalidCertificate(_)) => "bad_client_certificate",
        // mTLS: the client showed none (a client not set up for it), not a wrong one.
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::PeerIncompatible(_)) => "no_shared_parameters",
        Some(rustls::Error::NoApplicationProtocol) => "no_shared_alpn",
        Some(_) => "protocol",
        None if e.kind() == io::ErrorKind::UnexpectedEof => "client_closed",
        None => "io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn certificate_errors_are_named_for_what_the_operator_must_fix() {
        for (e, want) in [
            (CertificateError::UnknownIssuer, TlsFailure::UnknownCa),
            (CertificateError::NotValidForName, TlsFailure::NameMismatch),
            (CertificateError::Expired, TlsFailure::Expired),
            (CertificateError::BadEncoding, TlsFailure::BadCertificate),
        ] {
            assert_eq!(classify(&wrap(rustls::Error::InvalidCertificate(e))), want);
        }
        assert_eq!(
            classify(&wrap(rustls::Error::AlertReceived(
                AlertDescription::HandshakeFailure
            ))),
            TlsFailure::PeerAlert
        );
        assert_eq!(
            classify(&io::Error::new(io::ErrorKind::UnexpectedEof, "eof")),
            TlsFailure::PeerClosed
        );
        assert_eq!(
            classify(&io::Error::from(io::ErrorKind::ConnectionReset)),
            TlsFailure::Io
        );
    }

    #[test]
    fn downstream_reasons_tell_the_client_refusing_us_from_a_bad_client() {
        assert_eq!(
            downstream_reason(&wrap(rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
            ))),
            "client_rejected_certificate"
        );
        assert_eq!(
            downstream_reason(&wrap(rustls::Error::NoCertificatesPresented)),
            "no_client_certificate"
        );
        assert_eq!(
            downstream_reason(&io::Error::new(io::ErrorKind::UnexpectedEof, "eof")),
            "client_closed"
        );
    }
}
