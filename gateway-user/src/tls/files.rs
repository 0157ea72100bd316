//! Reading certificate, key and CA files (PEM), and checking a certificate and its key
//! together: the key matches the leaf's public key, and every certificate of the chain is
//! valid now. Each file's bytes are kept, so that two loads of the same files compare equal
//! and a reload can tell whether anything changed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{RootCertStore, crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{CertificateInfo, TlsProblem, validity};

/// Which of the two files of a pair a problem is about (for the config key it is reported at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
}

/// A certificate chain and its key, checked together.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub key: Arc<CertifiedKey>,
    pub info: CertificateInfo,
    /// Certificates of the chain past the leaf that have expired (a stale cross-signed root,
    /// say), by subject and `notAfter`: a warning, not a refusal.
    pub expired_extras: Vec<(String, i64)>,
    /// Both files' bytes, for equality.
    pub inputs: Vec<u8>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsProblem> {
    std::fs::read(path).map_err(|e| TlsProblem::Unreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), TlsProblem> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsProblem::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsProblem::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok((certs, bytes))
}

fn load_key(path: &Path) -> Result<(PrivateKeyDer<'static>, Vec<u8>), TlsProblem> {
    let bytes = read(path)?;
    let text = String::from_utf8_lossy(&bytes);
    // PKCS#8 `ENCRYPTED PRIVATE KEY`, or a traditional key with `Proc-Type: 4,ENCRYPTED`: the
    // parser skips both, and "no private key" would point the wrong way.
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsProblem::EncryptedKey {
            path: path.to_owned(),
        });
    }
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Ok((k, bytes)),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsProblem::NoKey {
            path: path.to_owned(),
        }),
        Err(e) => Err(TlsProblem::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// The earliest `notAfter` of the chain's valid certificates, the leaf's subject, and the
/// expired certificates past the leaf (subject, `notAfter`).
type Dates = (i64, String, Vec<(String, i64)>);

/// The validity of every certificate in `chain`, checked against `now` (Unix seconds); the
/// earliest `notAfter` of those still valid, the leaf's subject, and the certificates past the
/// leaf that have expired. An expired certificate refuses the chain only as its leaf:
/// browsers, nginx and Envoy serve a chain with a stale extra certificate (a cross-signed root
/// past its date), whose clients build their path without it. (One not valid yet refuses it
/// wherever it is.) The expiry metric then follows the certificates still valid: it moves
/// forward on the reload after an extra certificate expired, and the warning says so.
fn check_dates(path: &Path, chain: &[CertificateDer<'_>], now: i64) -> Result<Dates, TlsProblem> {
    let mut earliest = i64::MAX;
    let mut leaf_subject = String::new();
    let mut expired_extras = Vec::new();
    for (i, c) in chain.iter().enumerate() {
        let v = validity::read(c).map_err(|reason| TlsProblem::BadCertificate {
            path: path.to_owned(),
            reason: reason.to_owned(),
        })?;
        if i == 0 {
            leaf_subject = v.subject.clone();
        }
        if i > 0 && v.not_after < now {
            expired_extras.push((v.subject, v.not_after));
            continue;
        }
        if v.not_after < now {
            return Err(TlsProblem::Expired {
                path: path.to_owned(),
                not_after: validity::display(v.not_after),
                subject: v.subject,
            });
        }
        if v.not_before > now {
            return Err(TlsProblem::NotYetValid {
                path: path.to_owned(),
                not_before: validity::display(v.not_before),
            });
        }
        earliest = earliest.min(v.not_after);
    }
    Ok((earliest, leaf_subject, expired_extras))
}

/// Loads `cert` (a PEM chain, leaf first) and `key`, and checks them together at `now` (Unix
/// seconds). `role` is `server` or `client`, for the expiry metric.
pub fn load_pair(
    cert: &Path,
    key: &Path,
    role: &'static str,
    provider: &CryptoProvider,
    now: i64,
) -> Result<CertPair, (Which, TlsProblem)> {
    let (chain, mut inputs) = load_certs(cert).map_err(|p| (Which::Cert, p))?;
    let (not_after, subject, expired_extras) =
        check_dates(cert, &chain, now).map_err(|p| (Which::Cert, p))?;
    let (key_der, key_bytes) = load_key(key).map_err(|p| (Which::Key, p))?;
    inputs.extend_from_slice(&key_bytes);
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| {
            let p = TlsProblem::BadKey {
                path: key.to_owned(),
                reason: e.to_string(),
            };
            (Which::Key, p)
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            let (cert, key) = (cert.to_owned(), key.to_owned());
            let p = match key_owner(&certified) {
                Some((i, false)) if i > 0 => TlsProblem::LeafNotFirst {
                    cert,
                    key,
                    position: i + 1,
                },
                Some((i, true)) => TlsProblem::IssuersKey {
                    cert,
                    key,
                    position: i + 1,
                },
                _ => TlsProblem::KeyMismatch { cert, key },
            };
            return Err((Which::Key, p));
        }
        // The provider cannot tell (no public key from this key type): rustls's own rule.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            let p = TlsProblem::BadCertificate {
                path: cert.to_owned(),
                reason: e.to_string(),
            };
            return Err((Which::Cert, p));
        }
    }
    Ok(CertPair {
        key: Arc::new(certified),
        info: CertificateInfo {
            file: cert.to_owned(),
            role,
            not_after,
            subject,
        },
        expired_extras,
        inputs,
    })
}

/// Which certificate of the chain the key's public key is in, if any, and whether that one is
/// a CA's: a key that matches no leaf may be the leaf's, written after its issuers, or an
/// issuer's own.
fn key_owner(certified: &CertifiedKey) -> Option<(usize, bool)> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let spki = certified.key.public_key()?;
    certified.cert.iter().enumerate().find_map(|(i, c)| {
        let (_, x) = X509Certificate::from_der(c).ok()?;
        (x.tbs_certificate.subject_pki.raw == spki.as_ref()).then(|| (i, x.is_ca()))
    })
}

/// A CA bundle (`ca_file`, `client_ca_file`) as a root store; its bytes for equality.
pub fn load_roots(path: &Path) -> Result<(RootCertStore, Vec<u8>), TlsProblem> {
    let (certs, bytes) = load_certs(path)?;
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsProblem::BadCa {
            path: path.to_owned(),
            reason: format!("none of its {ignored} certificate(s) parses as a trust anchor"),
        });
    }
    Ok((roots, bytes))
}

/// The system's CA certificates (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
pub fn system_roots() -> Result<(RootCertStore, Vec<u8>), TlsProblem> {
    let found = rustls_native_certs::load_native_certs();
    let mut bytes = Vec::new();
    for c in &found.certs {
        bytes.extend_from_slice(c);
    }
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let reason = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(TlsProblem::NoSystemRoots { reason });
    }
    Ok((roots, bytes))
}

/// A path as written, relative to the config file's directory.
pub fn resolve(base: Option<&Path>, written: &str) -> PathBuf {
    let p = Path::new(written);
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_owned(),
    }
}
