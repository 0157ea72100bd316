//! TLS to an upstream cluster: a rustls client config per cluster that verifies the upstream's
//! certificate against `ca_file` (or the system's roots) and the name the gateway asked for
//! (`server_name`, else the endpoint's host name, else its IP address), offers ALPN
//! (`http/1.1` today; a later HTTP/2 upstream can offer `h2` through the same setting), may
//! present a client certificate, and resumes sessions to cut repeated handshakes short.
//!
//! `insecure_skip_verify = true` accepts any certificate (the handshake's signatures are still
//! checked, so the peer holds the key of whatever it presented): for tests and broken
//! internal PKI only; validation warns about it and the gateway logs it at every start.

use std::{fmt, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{CertificateInfo, MinVersion, TlsProblem, files::CertPair, provider};

/// A cluster's TLS settings, files loaded.
pub struct ClientOptions {
    /// `ca_file`'s roots, or `None` for the system's.
    pub roots: Option<(RootCertStore, Vec<u8>)>,
    pub server_name: Option<ServerName<'static>>,
    pub client_cert: Option<CertPair>,
    pub insecure_skip_verify: bool,
    pub alpn: Vec<String>,
    pub min_version: MinVersion,
}

/// A cluster's TLS, built and checked.
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// The name to send and verify; `None`: the endpoint's host name or IP address.
    pub server_name: Option<ServerName<'static>>,
    pub insecure_skip_verify: bool,
    pub certificates: Vec<CertificateInfo>,
    inputs: Vec<u8>,
}

impl ClientTls {
    pub fn build(opts: ClientOptions) -> Result<ClientTls, TlsProblem> {
        let provider = provider();
        let mut inputs = format!(
            "{:?}{:?}{}{:?}",
            opts.server_name, opts.alpn, opts.insecure_skip_verify, opts.min_version
        )
        .into_bytes();
        let refused = |e: rustls::Error| TlsProblem::Config {
            reason: e.to_string(),
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(opts.min_version.versions())
            .map_err(refused)?;
        let builder = if opts.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        } else {
            let (roots, bytes) = match opts.roots {
                Some(r) => r,
                None => super::files::system_roots()?,
            };
            inputs.extend_from_slice(&bytes);
            builder.with_root_certificates(roots)
        };
        let mut certificates = Vec::new();
        let mut config = match opts.client_cert {
            Some(pair) => {
                inputs.extend_from_slice(&pair.inputs);
                certificates.push(pair.info);
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    pair.key,
                )))
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: opts.server_name,
            insecure_skip_verify: opts.insecure_skip_verify,
            certificates,
            inputs,
        })
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.inputs == other.inputs
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

/// `insecure_skip_verify`: any certificate for any name, signatures still verified.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
