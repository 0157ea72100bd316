//! `[router.tls]`, the HTTPS listener, and each cluster's `tls` table: the keys checked, the
//! files read and checked through `crate::tls` (a problem is reported at the key that names
//! the file), and the rustls configs built, so that a config that validates also starts, and
//! a SIGHUP with a bad certificate is refused like `check-config` refuses it.

use std::{net::SocketAddr, path::Path, sync::Arc};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::ServerName;

use super::{
    super::{model::*, settings::*, source::KeyPath},
    At, Checker, Invalid, Warning,
};
use crate::tls::{
    self, ClientTls, ServerTls,
    client::ClientOptions,
    files::{self, CertPair, Which},
    server::ServerOptions,
};

/// A certificate that expires sooner than this is a warning (`check-config`, start, reload).
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// What loading needs: the config file's directory (relative paths), the time, the provider.
pub(super) struct Files<'a> {
    pub base: Option<&'a Path>,
    pub now: i64,
    pub provider: Arc<CryptoProvider>,
}

impl Files<'_> {
    /// A certificate and key, each problem reported at the key of the file it is about.
    fn pair(
        &self,
        c: &mut Checker,
        (cert, cert_key): (&str, KeyPath),
        (key, key_key): (&str, KeyPath),
        role: &'static str,
    ) -> Option<CertPair> {
        let (cp, kp) = (
            files::resolve(self.base, cert),
            files::resolve(self.base, key),
        );
        match files::load_pair(&cp, &kp, role, &self.provider, self.now) {
            Ok(pair) => {
                for (subject, not_after) in &pair.expired_extras {
                    c.warnings.push(At {
                        key: cert_key.clone(),
                        what: Warning::ChainCertificateExpired {
                            path: cp.display().to_string(),
                            not_after: tls::validity::display(*not_after),
                            subject: subject.clone(),
                        },
                    });
                }
                let days = (pair.info.not_after - self.now) / 86_400;
                if days < EXPIRY_WARNING_DAYS {
                    c.warnings.push(At {
                        key: cert_key,
                        what: Warning::CertificateExpiresSoon {
                            path: cp.display().to_string(),
                            not_after: tls::validity::display(pair.info.not_after),
                            days,
                        },
                    });
                }
                Some(pair)
            }
            Err((Which::Cert, p)) => {
                c.fail(cert_key, Invalid::Tls(p));
                None
            }
            Err((Which::Key, p)) => {
                c.fail(key_key, Invalid::Tls(p));
                None
            }
        }
    }
}

/// The HTTPS listeners, and their TLS when HTTPS is on.
pub(super) fn https(c: &mut Checker, r: &RouterConfig, x: &Files<'_>) -> Option<Https> {
    let key = KeyPath::root().key("router");
    let mut listen = r.https_listen.clone();
    if let Some(port) = r.https_port {
        listen.push(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let enabled = r.https_enabled.unwrap_or(!listen.is_empty());
    if !enabled {
        https_off(c, r, &key);
        return None;
    }
    let at = if r.https_enabled.is_some() {
        key.key("https_enabled")
    } else {
        key.clone()
    };
    if listen.is_empty() {
        c.fail(at.clone(), Invalid::NoHttpsListener);
    }
    let Some(t) = &r.tls else {
        c.fail(at, Invalid::HttpsWithoutCertificate);
        return None;
    };
    let tk = key.key("tls");
    let default = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(k)) => x.pair(
            c,
            (cert, tk.key("cert_file")),
            (k, tk.key("key_file")),
            "server",
        ),
        (None, None) if !t.certificates.is_empty() => None,
        (None, None) => {
            c.fail(at, Invalid::HttpsWithoutCertificate);
            return None;
        }
        (Some(_), None) => return incomplete(c, tk.key("cert_file"), "cert_file", "key_file"),
        (None, Some(_)) => return incomplete(c, tk.key("key_file"), "key_file", "cert_file"),
    };
    let sni = sni_certificates(c, t, &tk, x);
    let alpn = alpn(
        c,
        &t.alpn,
        &DEFAULT_SERVER_ALPN,
        &tk.key("alpn"),
        "\"h2\", \"http/1.1\"",
    );
    let client_ca = t.client_ca_file.as_deref().and_then(|f| {
        files::load_roots(&files::resolve(x.base, f))
            .map_err(|p| c.fail(tk.key("client_ca_file"), Invalid::Tls(p)))
            .ok()
    });
    if t.forward_client_cert && t.client_ca_file.is_none() {
        let at = tk.key("forward_client_cert");
        return incomplete(c, at, "forward_client_cert", "client_ca_file");
    }
    if !c.problems.is_empty() {
        return None;
    }
    let opts = ServerOptions {
        min_version: t.min_version.unwrap_or_default(),
        alpn,
        client_ca,
    };
    match ServerTls::build(default, sni, opts) {
        Ok(tls) => Some(Https {
            listen,
            tls: Arc::new(tls),
            forward_client_cert: t.forward_client_cert,
        }),
        Err(p) => {
            c.fail(tk, Invalid::Tls(p));
            None
        }
    }
}

/// HTTPS is off: a warning for each HTTPS key that was set all the same.
fn https_off(c: &mut Checker, r: &RouterConfig, key: &KeyPath) {
    let set = [
        (r.https_port.is_some(), "https_port"),
        (!r.https_listen.is_empty(), "https_listen"),
        (r.tls.is_some(), "tls"),
    ];
    for (_, what) in set.into_iter().filter(|(set, _)| *set) {
        c.warnings.push(At {
            key: key.key(what),
            what: Warning::HttpsOff { what },
        });
    }
}

/// `[[router.tls.certificates]]`: each entry's server names (checked) and its certificate and
/// key (loaded and matched).
fn sni_certificates(
    c: &mut Checker,
    t: &ServerTlsConfig,
    tk: &KeyPath,
    x: &Files<'_>,
) -> Vec<(Vec<String>, CertPair)> {
    let mut sni = Vec::new();
    // Each name, with the entry that lists it.
    let mut seen = std::collections::HashMap::new();
    for (i, e) in t.certificates.iter().enumerate() {
        let ek = tk.key("certificates").index(i);
        if e.server_names.is_empty() {
            c.fail(ek.key("server_names"), Invalid::EmptyServerNames);
        }
        let mut names = Vec::new();
        for (j, n) in e.server_names.iter().enumerate() {
            match super::addresses::parse_host(n) {
                Ok(h) if *seen.entry(h.to_string()).or_insert(i) != i => c.fail(
                    ek.key("server_names").index(j),
                    Invalid::DuplicateServerName {
                        name: h.to_string(),
                    },
                ),
                Ok(h) => names.push(h.to_string()),
                Err(reason) => c.fail(
                    ek.key("server_names").index(j),
                    Invalid::InvalidHost {
                        value: n.clone(),
                        reason,
                    },
                ),
            }
        }
        let cert = (e.cert_file.as_str(), ek.key("cert_file"));
        if let Some(pair) = x.pair(c, cert, (&e.key_file, ek.key("key_file")), "server") {
            sni.push((names, pair));
        }
    }
    sni
}

fn incomplete<T>(
    c: &mut Checker,
    at: KeyPath,
    what: &'static str,
    needs: &'static str,
) -> Option<T> {
    c.fail(at, Invalid::Incomplete { what, needs });
    None
}

/// The ALPN list (default `default`), each protocol one of `allowed`.
fn alpn(
    c: &mut Checker,
    written: &Option<Vec<String>>,
    default: &[&str],
    key: &KeyPath,
    allowed: &'static str,
) -> Vec<String> {
    let Some(list) = written else {
        return default.iter().map(|s| (*s).to_owned()).collect();
    };
    if list.is_empty() {
        c.fail(
            key.clone(),
            Invalid::InvalidAlpn {
                value: String::new(),
                allowed,
            },
        );
    }
    for (i, p) in list.iter().enumerate() {
        if !allowed.contains(&format!("\"{p}\"")) {
            c.fail(
                key.index(i),
                Invalid::InvalidAlpn {
                    value: p.clone(),
                    allowed,
                },
            );
        }
    }
    list.clone()
}

/// The ALPN list offered to a cluster's upstreams: as written (`written`, checked against what
/// its `protocol` can speak over TLS), or by default all of that.
fn upstream_alpn(
    c: &mut Checker,
    protocol: UpstreamProtocol,
    written: Option<(&Vec<String>, KeyPath)>,
    tls_key: &KeyPath,
) -> Vec<String> {
    let (written, key) = match written {
        Some((v, k)) => (Some(v.clone()), k),
        None => (None, tls_key.key("alpn")),
    };
    let (default, allowed): (&[&str], _) = match protocol {
        UpstreamProtocol::Http1 | UpstreamProtocol::H2c => {
            (&["http/1.1"], "\"http/1.1\" (with protocol http1 or h2c)")
        }
        UpstreamProtocol::H2 => (&["h2"], "\"h2\" (with protocol h2)"),
        UpstreamProtocol::Auto => (
            &["h2", "http/1.1"],
            "\"h2\", \"http/1.1\" (with protocol auto)",
        ),
    };
    alpn(c, &written, default, &key, allowed)
}

/// One setting of a cluster's `tls`, from its own table or `[router.upstream.tls]`.
fn field<'a, T>(
    own: Option<&'a UpstreamTlsConfig>,
    own_key: &KeyPath,
    base: Option<&'a UpstreamTlsConfig>,
    base_key: &KeyPath,
    get: impl Fn(&'a UpstreamTlsConfig) -> Option<&'a T>,
    name: &str,
) -> Option<(&'a T, KeyPath)> {
    own.and_then(&get)
        .map(|v| (v, own_key.key(name)))
        .or_else(|| base.and_then(&get).map(|v| (v, base_key.key(name))))
}

/// `insecure_skip_verify`, and where it was set.
fn insecure_setting<'a>(
    own: Option<&'a UpstreamTlsConfig>,
    ok: &KeyPath,
    base: Option<&'a UpstreamTlsConfig>,
    bk: &KeyPath,
) -> Option<(bool, KeyPath)> {
    let get = |t: &'a UpstreamTlsConfig| t.insecure_skip_verify.as_ref();
    field(own, ok, base, bk, get, "insecure_skip_verify").map(|(v, at)| (*v, at))
}

/// A cluster's TLS (`None`: plain HTTP).
pub(super) fn upstream(
    c: &mut Checker,
    spec: &ClusterSpec,
    (own, own_key): (Option<&UpstreamTlsConfig>, KeyPath),
    (base, base_key): (Option<&UpstreamTlsConfig>, KeyPath),
    x: &Files<'_>,
) -> Option<Arc<ClientTls>> {
    let (ok, bk) = (own_key.key("tls"), base_key.key("tls"));
    let f = |get: fn(&UpstreamTlsConfig) -> Option<&String>, name| {
        field(own, &ok, base, &bk, get, name)
    };
    let enabled = own.and_then(|t| t.enabled).or(base.and_then(|t| t.enabled));
    if (own.is_none() && base.is_none()) || enabled == Some(false) {
        return None;
    }
    let before = c.problems.len();
    let roots = f(|t| t.ca_file.as_ref(), "ca_file").and_then(|(path, at)| {
        files::load_roots(&files::resolve(x.base, path))
            .map_err(|p| c.fail(at, Invalid::Tls(p)))
            .ok()
    });
    let server_name = f(|t| t.server_name.as_ref(), "server_name").and_then(|(n, at)| {
        ServerName::try_from(n.clone())
            .map_err(|_| {
                let value = n.clone();
                c.fail(at, Invalid::InvalidServerName { value });
            })
            .ok()
    });
    let client_cert = match (
        f(|t| t.cert_file.as_ref(), "cert_file"),
        f(|t| t.key_file.as_ref(), "key_file"),
    ) {
        (Some((cert, ck)), Some((key, kk))) => x.pair(c, (cert, ck), (key, kk), "client"),
        (None, None) => None,
        (Some((_, at)), None) => return incomplete(c, at, "cert_file", "key_file"),
        (None, Some((_, at))) => return incomplete(c, at, "key_file", "cert_file"),
    };
    let insecure = insecure_setting(own, &ok, base, &bk);
    let insecure_skip_verify = insecure.as_ref().is_some_and(|(v, _)| *v);
    if let Some((true, at)) = insecure {
        c.warnings.push(At {
            key: at,
            what: Warning::InsecureSkipVerify {
                cluster: spec.name.clone(),
            },
        });
    }
    let written = field(own, &ok, base, &bk, |t| t.alpn.as_ref(), "alpn");
    let alpn = upstream_alpn(c, spec.protocol, written, &ok);
    let min_version = own
        .and_then(|t| t.min_version)
        .or(base.and_then(|t| t.min_version))
        .unwrap_or_default();
    if c.problems.len() > before {
        return None;
    }
    let opts = ClientOptions {
        roots,
        server_name,
        client_cert,
        insecure_skip_verify,
        alpn,
        min_version,
    };
    match ClientTls::build(opts) {
        Ok(t) => Some(Arc::new(t)),
        Err(p) => {
            let at = if own.is_some() { ok } else { bk };
            c.fail(at, Invalid::Tls(p));
            None
        }
    }
}
