//! TLS for both sides of the proxy, with rustls and its `ring` provider (no OpenSSL in the
//! binary): certificate and key files read and checked ([`files`], with each certificate's
//! validity read from its DER by [`validity`]), the HTTPS listener's server config with one
//! certificate per SNI name ([`server`]), each upstream cluster's client config ([`client`]),
//! and how a failed upstream handshake is named ([`failure`]).
//!
//! Everything that can be wrong with a file (unreadable, not PEM, a key that does not match
//! its certificate, an expired certificate) is a [`TlsProblem`], found by `config::validate`,
//! so that `gateway check-config`, a start and a SIGHUP reload refuse the same files with the
//! same words, naming the config key.
//!
//! Why `ring` rather than `aws-lc-rs`: it builds from Rust and a little assembly with the C
//! compiler the eBPF toolchain already needs (aws-lc-sys adds CMake-era C builds and minutes
//! to every clean build on a two-core machine), has no FIPS or post-quantum needs to meet
//! here, and covers everything the gateway negotiates: TLS 1.2 and 1.3, ECDSA P-256/P-384,
//! RSA and Ed25519 keys, X25519 and P-256 key exchange.

pub mod client;
pub mod client_cert;
pub mod failure;
pub mod files;
pub mod server;
pub mod validity;

use std::{path::PathBuf, sync::Arc};

use rustls::{SupportedProtocolVersion, crypto::CryptoProvider};
use thiserror::Error;

pub use self::{
    client::ClientTls,
    server::{ServerTls, SniResolver},
};

/// The crypto provider every config is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The lowest TLS version accepted (`min_version`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub enum MinVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl MinVersion {
    pub(crate) fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static BOTH: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static ONLY_13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            MinVersion::Tls12 => &BOTH,
            MinVersion::Tls13 => &ONLY_13,
        }
    }
}

/// A negotiated protocol version as a metric label value.
pub fn version_label(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(_) => "other",
        None => "unknown",
    }
}

/// What is wrong with a certificate, key or CA file, in words that say what to do.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum TlsProblem {
    #[error("cannot read {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "{} holds no PEM certificate (expected a `-----BEGIN CERTIFICATE-----` block)",
        path.display()
    )]
    NoCertificate { path: PathBuf },
    #[error("{} is not valid PEM: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error(
        "{} holds no private key (expected PKCS#8 `BEGIN PRIVATE KEY`, PKCS#1 `BEGIN RSA PRIVATE KEY` or SEC1 `BEGIN EC PRIVATE KEY`)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error(
        "the private key in {} is encrypted (a passphrase): the gateway reads unencrypted keys; decrypt it (`openssl pkey -in KEY -out KEY.plain`) and keep the file readable by the gateway only",
        path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error("the private key in {} is not usable: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "the private key in {} does not match the certificate in {}: pair each certificate with its own key",
        key.display(), cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "the private key in {} belongs to certificate {position} of the chain in {}, not to the first: put that certificate (the leaf, the one the key is for) first, then the intermediates it was issued by (a file written CA first, or with the bundle before the certificate)",
        key.display(), cert.display()
    )]
    LeafNotFirst {
        cert: PathBuf,
        key: PathBuf,
        position: usize,
    },
    #[error(
        "the private key in {} belongs to certificate {position} of the chain in {}, a CA certificate: it is an issuer's key, not the leaf's; use the key the first certificate was made with",
        key.display(), cert.display()
    )]
    IssuersKey {
        cert: PathBuf,
        key: PathBuf,
        position: usize,
    },
    #[error("certificate {} cannot be parsed: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error(
        "certificate {} expired at {not_after}; renew it (its subject: {subject})",
        path.display()
    )]
    Expired {
        path: PathBuf,
        not_after: String,
        subject: String,
    },
    #[error("certificate {} is not valid before {not_before}; check the host's clock", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("{} holds no usable CA certificate: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error(
        "no system CA certificates found{reason}; install the ca-certificates package or set `ca_file`"
    )]
    NoSystemRoots { reason: String },
    #[error("TLS settings refused by rustls: {reason}")]
    Config { reason: String },
}

/// One certificate file the gateway presents, for the expiry metric and `/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    pub file: PathBuf,
    /// `server` (the HTTPS listener) or `client` (to an upstream).
    pub role: &'static str,
    /// The earliest `notAfter` of the chain, Unix seconds: when the chain stops validating.
    pub not_after: i64,
    pub subject: String,
}

#[cfg(test)]
pub(crate) mod testpki;
