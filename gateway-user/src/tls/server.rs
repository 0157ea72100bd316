//! The HTTPS listener's TLS: a rustls server config whose certificate is chosen by SNI
//! ([`SniResolver`]: an exact name, then the longest `*.suffix`, then the default certificate
//! `[router.tls] cert_file`), with ALPN (`h2`, `http/1.1` by default), a minimum version,
//! optional client certificates (mTLS, `client_ca_file`), stateless session tickets and a
//! session cache for resumption.
//!
//! The config is built when the config file is validated, so a SIGHUP that re-reads the
//! certificates builds a new one: new connections get it at once, connections already
//! established keep theirs. The session tickets' keys and the session cache carry over from
//! one config to the next when its TLS files and options are the same ([`resumption`]):
//! every SIGHUP made every client's next connection a full handshake.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
};

use rustls::{
    RootCertStore, ServerConfig,
    server::{
        ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
        StoresServerSessions, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
};

use super::{CertificateInfo, MinVersion, TlsProblem, files::CertPair, provider};

/// TLS sessions remembered for resumption (TLS 1.2 session ids; TLS 1.3 uses tickets).
pub const SESSION_CACHE_ENTRIES: usize = 16_384;

/// Picks the certificate for a ClientHello's SNI.
#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `.example.com` for `*.example.com`, longest first.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// The certificate for `sni` (any case), if one is configured for it or a default exists.
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let by_name = sni.and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.exact.get(&name).or_else(|| {
                self.wildcard
                    .iter()
                    // One label only, as for certificates (RFC 6125 6.4.3).
                    .find(|(s, _)| {
                        name.strip_suffix(s.as_str())
                            .is_some_and(|l| !l.is_empty() && !l.contains('.'))
                    })
                    .map(|(_, k)| k)
            })
        });
        by_name.or(self.default.as_ref())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name()).cloned()
    }
}

/// The listener's TLS settings, other than certificates.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub min_version: MinVersion,
    /// In preference order.
    pub alpn: Vec<String>,
    /// Client certificates are required and verified against these roots (mTLS).
    pub client_ca: Option<(RootCertStore, Vec<u8>)>,
}

/// The HTTPS listener's TLS, built and checked.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub resolver: Arc<SniResolver>,
    pub certificates: Vec<CertificateInfo>,
    /// Every input file's bytes and option, for equality.
    inputs: Vec<u8>,
}

impl ServerTls {
    /// `default`: `[router.tls] cert_file`/`key_file`; `sni`: `[[router.tls.certificates]]`,
    /// each with its lowercase names (`*.example.com` for a wildcard).
    pub fn build(
        default: Option<CertPair>,
        sni: Vec<(Vec<String>, CertPair)>,
        opts: ServerOptions,
    ) -> Result<ServerTls, TlsProblem> {
        let mut inputs = format!("{:?}{:?}", opts.min_version, opts.alpn).into_bytes();
        let mut resolver = SniResolver::default();
        let mut certificates = Vec::new();
        if let Some(d) = default {
            inputs.extend_from_slice(&d.inputs);
            certificates.push(d.info);
            resolver.default = Some(d.key);
        }
        for (names, pair) in sni {
            inputs.extend_from_slice(names.join(",").as_bytes());
            inputs.extend_from_slice(&pair.inputs);
            certificates.push(pair.info);
            for n in names {
                match n.strip_prefix('*') {
                    Some(suffix) => resolver
                        .wildcard
                        .push((suffix.to_owned(), pair.key.clone())),
                    None => {
                        resolver.exact.insert(n, pair.key.clone());
                    }
                }
            }
        }
        resolver
            .wildcard
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let resolver = Arc::new(resolver);
        let provider = provider();
        let refused = |e: rustls::Error| TlsProblem::Config {
            reason: e.to_string(),
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(opts.min_version.versions())
            .map_err(refused)?;
        let builder = match opts.client_ca {
            Some((roots, bytes)) => {
                inputs.extend_from_slice(&bytes);
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsProblem::Config {
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        (config.ticketer, config.session_storage) = resumption(&inputs).map_err(refused)?;
        Ok(ServerTls {
            config: Arc::new(config),
            resolver,
            certificates,
            inputs,
        })
    }
}

/// What resumes sessions: the tickets' keys (rotated by rustls every 6 hours) and the
/// session cache, with the TLS inputs they were made under.
struct Resumption {
    inputs: Vec<u8>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions + Send + Sync>,
}

/// A config's ticketer and session cache.
type Resumes = (
    Arc<dyn ProducesTickets>,
    Arc<dyn StoresServerSessions + Send + Sync>,
);

/// The last config's.
static RESUMPTION: Mutex<Option<Resumption>> = Mutex::new(None);

/// The ticketer and session cache for a new config: the last config's when its TLS files
/// (certificates, keys, client CA) and options are the same, else new ones. A resumed session
/// skips what a full handshake checks: the client certificate (rustls copies the old one in)
/// and the server's certificate and key (a client resumed its session for up to 12 hours
/// after a key was replaced). So only a reload that leaves TLS as it was keeps them: the
/// common SIGHUP, for a route or a cluster.
fn resumption(inputs: &[u8]) -> Result<Resumes, rustls::Error> {
    let mut last = RESUMPTION.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = last.as_ref().filter(|r| r.inputs == inputs) {
        return Ok((r.ticketer.clone(), r.sessions.clone()));
    }
    let r = Resumption {
        inputs: inputs.to_vec(),
        ticketer: rustls::crypto::ring::Ticketer::new()?,
        sessions: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
    };
    let made = (r.ticketer.clone(), r.sessions.clone());
    *last = Some(r);
    Ok(made)
}

impl PartialEq for ServerTls {
    /// Same files with the same bytes, same options.
    fn eq(&self, other: &Self) -> bool {
        self.inputs == other.inputs
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("certificates", &self.certificates)
            .field("alpn", &self.config.alpn_protocols.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        let k = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&k)
            .unwrap();
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(k.serialize_der().into());
        let signing = provider().key_provider.load_private_key(der).unwrap();
        Arc::new(CertifiedKey::new(vec![c.der().clone()], signing))
    }

    #[test]
    fn sni_picks_exact_then_longest_wildcard_then_default() {
        let (a, w1, w2, d) = (key(), key(), key(), key());
        let mut r = SniResolver::default();
        r.exact.insert("api.example.com".into(), a.clone());
        r.wildcard.push((".example.com".into(), w1.clone()));
        r.wildcard.push((".eu.example.com".into(), w2.clone()));
        r.wildcard.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let is = |r: &SniResolver, sni: Option<&str>, want: Option<&Arc<CertifiedKey>>| {
            assert_eq!(
                r.lookup(sni).map(Arc::as_ptr),
                want.map(Arc::as_ptr),
                "{sni:?}"
            );
        };
        is(&r, Some("API.example.com"), Some(&a));
        is(&r, Some("shop.example.com"), Some(&w1));
        is(&r, Some("shop.eu.example.com"), Some(&w2));
        is(&r, Some("a.b.example.com"), None);
        is(&r, Some("example.com"), None);
        is(&r, None, None);
        r.default = Some(d.clone());
        is(&r, Some("other.org"), Some(&d));
        is(&r, None, Some(&d));
    }
}
