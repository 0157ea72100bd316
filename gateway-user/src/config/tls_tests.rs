//! Unit tests for the TLS half of the config: the seed layout, `gateway_host`, the HTTPS
//! listener and its certificates (missing, unreadable, mismatched, expired, SNI), and each
//! cluster's `tls` table (inheritance, ALPN, `insecure_skip_verify`). Certificates are made at
//! test time (`tls::testpki`).

use std::path::Path;

use super::*;
use crate::tls::testpki::TestPki;

fn load_in(pki: &TestPki, text: &str) -> Result<Loaded, ConfigError> {
    // Relative paths start from the config file's directory: the PKI's.
    load_str(text, &pki.path("gw.toml"))
}

fn err_in(pki: &TestPki, text: &str) -> String {
    match load_in(pki, text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// The issue's seed block, as a new user writes it.
const SEED: &str = r#"[router]
gateway_host = "*"
listener_port = 8080
https_enabled = true
https_port = 8443

[router.upstream.timeouts]
connect_timeout_ms = 6000
"#;

const UPSTREAM: &str = "\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n";

#[test]
fn the_seed_block_names_the_missing_certificate_then_passes_with_one() {
    let pki = TestPki::new("seed");
    let e = err_in(&pki, &format!("{SEED}{UPSTREAM}"));
    assert!(e.contains("gw.toml:4:1: key `router.https_enabled`"), "{e}");
    assert!(e.contains("`[router.tls] cert_file`"), "{e}");
    assert!(!e.contains("unknown field"), "{e}");

    pki.leaf("site", &["localhost"], (-1, 90));
    let text = format!(
        "{SEED}{UPSTREAM}\n[router.tls]\ncert_file = \"site.pem\"\nkey_file = \"site.key\"\n"
    );
    let l = load_in(&pki, &text).unwrap();
    let s = &l.settings;
    assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
    let https = s.https.as_ref().expect("HTTPS on");
    assert_eq!(https.listen, vec!["0.0.0.0:8443".parse().unwrap()]);
    assert_eq!(s.gateway_host, None, "\"*\" serves any host");
    assert_eq!(https.tls.certificates.len(), 1);
    assert_eq!(https.tls.certificates[0].subject, "localhost");
    assert_eq!(
        https.tls.config.alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    // Without https_enabled the block is the plain seed, accepted with an upstream.
    let plain = SEED.replace("https_enabled = true", "https_enabled = false");
    let l = load_in(&pki, &format!("{plain}{UPSTREAM}")).unwrap();
    assert!(l.settings.https.is_none());
    assert_eq!(
        l.warnings.len(),
        1,
        "https_port without HTTPS: {:?}",
        l.warnings
    );
}

#[test]
fn gateway_host_is_a_name_or_a_wildcard() {
    let pki = TestPki::new("host");
    let base = "[router]\nlistener_port = 8080\ngateway_host = \"HOST\"\n";
    for (host, want) in [
        (
            "api.example.com",
            Some(HostMatch::Exact("api.example.com".into())),
        ),
        (
            "*.Example.com",
            Some(HostMatch::Suffix(".example.com".into())),
        ),
        ("*", None),
    ] {
        let text = format!("{}{UPSTREAM}", base.replace("HOST", host));
        assert_eq!(
            load_in(&pki, &text).unwrap().settings.gateway_host,
            want,
            "{host}"
        );
    }
    let e = err_in(&pki, &format!("{}{UPSTREAM}", base.replace("HOST", "a*b")));
    assert!(e.contains("key `router.gateway_host`"), "{e}");
}

fn https_with(tls: &str) -> String {
    format!("[router]\nhttps_port = 8443\n{UPSTREAM}\n[router.tls]\n{tls}")
}

#[test]
fn certificate_problems_name_the_file_the_line_and_the_key() {
    let pki = TestPki::new("bad");
    pki.leaf("good", &["localhost"], (-1, 90));
    pki.leaf("other", &["localhost"], (-1, 90));
    pki.leaf("expired", &["localhost"], (-30, -1));
    std::fs::write(pki.path("junk.pem"), "hello\n").unwrap();
    // The CA first, then the leaf: a chain written in the wrong order.
    let ca = std::fs::read_to_string(pki.path("ca.pem")).unwrap();
    let good = std::fs::read_to_string(pki.path("good.pem")).unwrap();
    std::fs::write(pki.path("reversed.pem"), ca.clone() + &good).unwrap();
    std::fs::write(pki.path("chain.pem"), good + &ca).unwrap();
    for (tls, key, words) in [
        (
            "cert_file = \"missing.pem\"\nkey_file = \"good.key\"\n",
            "router.tls.cert_file",
            "cannot read",
        ),
        (
            "cert_file = \"junk.pem\"\nkey_file = \"good.key\"\n",
            "router.tls.cert_file",
            "holds no PEM certificate",
        ),
        (
            "cert_file = \"good.pem\"\nkey_file = \"good.pem\"\n",
            "router.tls.key_file",
            "holds no private key",
        ),
        (
            "cert_file = \"good.pem\"\nkey_file = \"other.key\"\n",
            "router.tls.key_file",
            "does not match the certificate",
        ),
        (
            "cert_file = \"expired.pem\"\nkey_file = \"expired.key\"\n",
            "router.tls.cert_file",
            "expired at",
        ),
        (
            "cert_file = \"good.pem\"\n",
            "router.tls.cert_file",
            "`cert_file` needs `key_file`",
        ),
        (
            "cert_file = \"good.pem\"\nkey_file = \"good.key\"\nalpn = [\"spdy/3\"]\n",
            "router.tls.alpn[0]",
            "not offered here",
        ),
        (
            "cert_file = \"good.pem\"\nkey_file = \"good.key\"\nclient_ca_file = \"junk.pem\"\n",
            "router.tls.client_ca_file",
            "holds no PEM certificate",
        ),
        (
            "cert_file = \"reversed.pem\"\nkey_file = \"good.key\"\n",
            "router.tls.key_file",
            "belongs to certificate 2 of the chain",
        ),
        (
            "cert_file = \"chain.pem\"\nkey_file = \"ca.key\"\n",
            "router.tls.key_file",
            "a CA certificate: it is an issuer's key",
        ),
        (
            "cert_file = \"good.pem\"\nkey_file = \"good.key\"\nforward_client_cert = true\n",
            "router.tls.forward_client_cert",
            "`forward_client_cert` needs `client_ca_file`",
        ),
    ] {
        let e = err_in(&pki, &https_with(tls));
        assert!(e.contains(&format!("key `{key}`")), "{tls}: {e}");
        assert!(e.contains(words), "{tls}: {e}");
        assert!(e.contains("gw.toml:"), "{e}");
    }
}

#[test]
fn sni_certificates_and_a_certificate_expiring_soon() {
    let pki = TestPki::new("sni");
    pki.leaf("a", &["a.example.com"], (-1, 90));
    pki.leaf("w", &["*.example.org"], (-1, 5));
    let tls = "[[router.tls.certificates]]\nserver_names = [\"a.example.com\"]\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n\
               [[router.tls.certificates]]\nserver_names = [\"*.example.org\"]\ncert_file = \"w.pem\"\nkey_file = \"w.key\"\n";
    let l = load_in(&pki, &https_with(tls)).unwrap();
    let t = &l.settings.https.as_ref().unwrap().tls;
    assert!(t.resolver.lookup(Some("a.example.com")).is_some());
    assert!(t.resolver.lookup(Some("x.example.org")).is_some());
    assert!(
        t.resolver.lookup(Some("b.example.com")).is_none(),
        "no default"
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.to_string().contains("w.pem expires at")
                && w.key.to_string() == "router.tls.certificates[1].cert_file"),
        "{:?}",
        l.warnings
    );
    let empty = tls.replace("[\"a.example.com\"]", "[]");
    assert!(err_in(&pki, &https_with(&empty)).contains("`server_names` is empty"));
}

/// Findings of a black-box audit: a name listed for two certificates (the last won, in
/// silence), a name with a fully qualified name's trailing dot (never matched), an expired
/// certificate past the leaf (a stale cross-signed root: refused, where browsers and nginx
/// serve the chain), an encrypted key (reported as "no private key").
#[test]
fn duplicate_and_dotted_server_names_stale_chain_extras_and_encrypted_keys() {
    let pki = TestPki::new("sni-more");
    pki.leaf("a", &["a.example.com"], (-1, 90));
    pki.leaf("b", &["a.example.com"], (-1, 90));
    pki.leaf("old", &["old.example.com"], (-30, -1));
    let entry = |names: &str, file: &str| {
        format!(
            "[[router.tls.certificates]]\nserver_names = {names}\ncert_file = \"{file}.pem\"\nkey_file = \"{file}.key\"\n"
        )
    };
    let twice = entry("[\"a.example.com\"]", "a") + &entry("[\"A.example.com\"]", "b");
    let e = err_in(&pki, &https_with(&twice));
    assert!(
        e.contains("\"a.example.com\" is listed for another certificate too")
            && e.contains("router.tls.certificates[1].server_names[0]"),
        "{e}"
    );
    // Twice in one entry (once with the trailing dot) is no conflict.
    let l = load_in(
        &pki,
        &https_with(&entry("[\"a.example.com.\", \"a.example.com\"]", "a")),
    )
    .unwrap();
    let t = &l.settings.https.as_ref().unwrap().tls;
    assert!(
        t.resolver.lookup(Some("a.example.com")).is_some(),
        "the trailing dot"
    );
    // The leaf, then an expired certificate: served, with a warning.
    let chain = std::fs::read_to_string(pki.path("a.pem")).unwrap()
        + &std::fs::read_to_string(pki.path("old.pem")).unwrap();
    std::fs::write(pki.path("stale.pem"), chain).unwrap();
    std::fs::copy(pki.path("a.key"), pki.path("stale.key")).unwrap();
    let l = load_in(&pki, &https_with(&entry("[\"a.example.com\"]", "stale"))).unwrap();
    assert!(
        l.warnings
            .iter()
            .any(|w| w.to_string().contains("past the leaf that expired")),
        "{:?}",
        l.warnings
    );
    std::fs::write(
        pki.path("enc.key"),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::copy(pki.path("a.pem"), pki.path("enc.pem")).unwrap();
    let e = err_in(&pki, &https_with(&entry("[\"a.example.com\"]", "enc")));
    assert!(e.contains("is encrypted") && e.contains("key_file"), "{e}");
}

#[test]
fn cluster_tls_inherits_from_router_upstream_and_can_be_turned_off() {
    let pki = TestPki::new("up");
    let text = format!(
        "[router]\nlistener_port = 8080\n[router.upstream.tls]\nca_file = \"{}\"\nserver_name = \"api.internal\"\n\
         [clusters.a]\nendpoints = [\"127.0.0.1:9000\"]\n[clusters.b]\nendpoints = [\"127.0.0.1:9001\"]\n[clusters.b.tls]\nenabled = false\n\
         [clusters.c]\nendpoints = [\"127.0.0.1:9002\"]\n[clusters.c.tls]\ninsecure_skip_verify = true\n\
         [[routes]]\ncluster = \"a\"\n[[routes]]\npath_prefix = \"/b\"\ncluster = \"b\"\n[[routes]]\npath_prefix = \"/c\"\ncluster = \"c\"\n",
        pki.path("ca.pem").display()
    );
    let l = load_in(&pki, &text).unwrap();
    let c = &l.settings.clusters;
    let a = c["a"].tls.as_ref().expect("inherited");
    assert_eq!(
        a.server_name.as_ref().map(|n| n.to_str().into_owned()),
        Some("api.internal".into())
    );
    assert_eq!(a.config.alpn_protocols, [b"http/1.1".to_vec()]);
    assert!(c["b"].tls.is_none());
    assert!(c["c"].tls.as_ref().unwrap().insecure_skip_verify);
    assert_eq!(
        c["a"].timeouts.tls_handshake,
        std::time::Duration::from_millis(5000)
    );
    let w: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.iter().any(|w| w.contains("insecure_skip_verify = true")),
        "{w:?}"
    );
    // ALPN offers what the cluster's protocol speaks: http/1.1 by default.
    let h2 = text.replace("enabled = false", "alpn = [\"h2\"]");
    let e = err_in(&pki, &h2);
    assert!(
        e.contains("key `clusters.b.tls.alpn[0]`") && e.contains("\"h2\""),
        "{e}"
    );
    // protocol = "h2" offers h2 (and accepts it written), "auto" both.
    let h2_cluster = h2.replace("[clusters.b.tls]", "protocol = \"h2\"\n[clusters.b.tls]");
    let l = load_in(&pki, &h2_cluster).unwrap();
    let b = &l.settings.clusters["b"];
    assert_eq!(b.protocol, UpstreamProtocol::H2);
    assert_eq!(
        b.tls.as_ref().unwrap().config.alpn_protocols,
        [b"h2".to_vec()]
    );
    let auto = text.replace(
        "[clusters.a]\nendpoints = [\"127.0.0.1:9000\"]",
        "[clusters.a]\nendpoints = [\"127.0.0.1:9000\"]\nprotocol = \"auto\"",
    );
    let l = load_in(&pki, &auto).unwrap();
    let a = &l.settings.clusters["a"];
    assert_eq!(a.protocol, UpstreamProtocol::Auto);
    assert_eq!(
        a.tls.as_ref().unwrap().config.alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    // h2c is HTTP/2 over plain TCP: refused with TLS, at the key that asked for it.
    let h2c = text.replace(
        "[clusters.a]\nendpoints = [\"127.0.0.1:9000\"]",
        "[clusters.a]\nendpoints = [\"127.0.0.1:9000\"]\nprotocol = \"h2c\"",
    );
    let e = err_in(&pki, &h2c);
    assert!(
        e.contains("key `clusters.a.protocol`") && e.contains("has TLS"),
        "{e}"
    );
    let bad_ca = text.replace("ca.pem", "nope.pem");
    assert!(err_in(&pki, &bad_ca).contains("key `router.upstream.tls.ca_file`"));
    let _ = Path::new("unused");
}

#[test]
fn https_redirect_names_the_https_listeners_port_and_refuses_port_0() {
    let pki = TestPki::new("redirect");
    pki.leaf("site", &["localhost"], (-1, 90));
    let tls = "\n[router.tls]\ncert_file = \"site.pem\"\nkey_file = \"site.key\"\n";
    let seed = SEED.replace(
        "https_port = 8443",
        "https_port = 8443\nhttps_redirect = true",
    );
    let s = load_in(&pki, &format!("{seed}{UPSTREAM}{tls}"))
        .unwrap()
        .settings;
    assert_eq!(s.routes[0].https_redirect, Some(8443));
    // Port 0 is chosen at bind: the URL needs https_redirect_port.
    let zero = seed.replace("https_port = 8443", "https_listen = [\"127.0.0.1:0\"]");
    let e = err_in(&pki, &format!("{zero}{UPSTREAM}{tls}"));
    assert!(
        e.contains("key `router.https_redirect`") && e.contains("`https_redirect_port`"),
        "{e}"
    );
    // Port 0 matters only where a route redirects.
    let none =
        format!("{zero}{UPSTREAM}{tls}[[routes]]\ncluster = \"default\"\nhttps_redirect = false\n");
    assert!(load_in(&pki, &none).is_ok());
    let fixed = zero.replace(
        "https_redirect = true",
        "https_redirect = true\nhttps_redirect_port = 443",
    );
    let s = load_in(&pki, &format!("{fixed}{UPSTREAM}{tls}"))
        .unwrap()
        .settings;
    assert_eq!(s.routes[0].https_redirect, Some(443));
}

/// An HTTPS-only config whose certificate is refused says so, and only so: it began with
/// "no listener", which sent its reader to look for the wrong mistake.
#[test]
fn an_https_only_config_with_a_bad_certificate_names_only_the_certificate() {
    let pki = TestPki::new("https-only");
    pki.leaf("old", &["localhost"], (-90, -1));
    let text = format!(
        "[router]\nhttps_port = 8443\n{UPSTREAM}\n[router.tls]\ncert_file = \"old.pem\"\nkey_file = \"old.key\"\n"
    );
    let e = err_in(&pki, &text);
    assert!(e.contains("expired"), "{e}");
    assert!(!e.contains("no listener"), "{e}");
    // Turned off, with no other listener: that is the one error.
    let off = text.replace(
        "https_port = 8443",
        "https_port = 8443\nhttps_enabled = false",
    );
    assert!(err_in(&pki, &off).contains("no listener"));
}
