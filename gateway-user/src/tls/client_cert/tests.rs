//! The header value for certificates made here with rcgen.

use rcgen::{CertificateParams, DnType, KeyPair, SanType};

use super::*;

fn der(params: CertificateParams) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn hash_subject_uris_and_names_as_envoy_writes_them() {
    let mut p = CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
    p.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/ns/a/sa/b".try_into().unwrap(),
    ));
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CountryName, "DE");
    p.distinguished_name
        .push(DnType::OrganizationName, "Acme \"Q\"");
    p.distinguished_name.push(DnType::CommonName, "client, one");
    let der = der(p);
    let v = forwarded(&der);
    let v = v.to_str().unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        v,
        format!(
            "Hash={hex};Subject=\"CN=client\\, one,O=Acme \\\"Q\\\",C=DE\";\
             URI=spiffe://example.org/ns/a/sa/b;DNS=client.test"
        )
    );
}

#[test]
fn a_control_character_or_a_separator_cannot_break_the_header() {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, " a\nb;c=d#é");
    p.subject_alt_names
        .push(SanType::DnsName("x;y=z".try_into().unwrap()));
    let v = forwarded(&der(p));
    let v = v.to_str().unwrap();
    assert!(
        v.ends_with(";Subject=\"CN=\\ a\\0Ab\\;c=d#\\C3\\A9\";DNS=\"x;y=z\""),
        "{v}"
    );
}

#[test]
fn what_is_no_certificate_is_named_by_its_hash() {
    let v = forwarded(b"not DER");
    assert!(v.to_str().unwrap().starts_with("Hash="));
    assert_eq!(v.len(), "Hash=".len() + 64);
}

#[test]
fn a_name_that_cannot_go_as_it_is_is_left_out_not_rewritten() {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "c");
    for uri in [
        "spiffe://acme/sa/ad\nmin",
        "spiffe://evil/x\\",
        "spiffe://a/\"b",
    ] {
        p.subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
    }
    p.subject_alt_names
        .push(SanType::URI("spiffe://acme/sa/ok".try_into().unwrap()));
    let v = forwarded(&der(p));
    assert!(
        v.to_str()
            .unwrap()
            .ends_with(";Subject=\"CN=c\";URI=spiffe://acme/sa/ok"),
        "{v:?}"
    );
}

/// The subject as `openssl x509 -nameopt RFC2253` prints it, which is what Envoy sends: names
/// (`emailAddress`, `UID`, `GN`, `SN`, `street`, `pseudonym`), a multi-valued RDN, escapes.
#[test]
fn the_subject_is_openssls_rfc2253_form() {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("gw-xfcc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    let subj = "/C=DE/O=Acme, Inc./pseudonym=jd/street=1 Main/SN=Doe/GN=Jo/emailAddress=a@b.c\
                /CN=multi+UID=u123/CN=Zo\u{eb} \"Q\"";
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-utf8",
            "-multivalue-rdn",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-subj",
            subj,
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{made:?}");
    let read = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(["x509", "-in"])
            .arg(&cert)
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    let want = String::from_utf8(read(&["-noout", "-subject", "-nameopt", "RFC2253"])).unwrap();
    let want = want.trim().strip_prefix("subject=").unwrap().to_owned();
    let der = read(&["-outform", "DER"]);
    let _ = std::fs::remove_dir_all(&dir);
    let v = forwarded(&der);
    let v = v.to_str().unwrap();
    let subject = v
        .split(";Subject=\"")
        .nth(1)
        .unwrap()
        .strip_suffix('"')
        .unwrap();
    assert_eq!(subject, want, "{v}");
}

#[test]
fn an_attribute_openssl_has_no_name_for_is_its_oid_and_der() {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CustomDnType(vec![1, 2, 3, 4, 5]), "custom");
    let v = forwarded(&der(p));
    assert!(
        v.to_str()
            .unwrap()
            .ends_with(";Subject=\"1.2.3.4.5=#0C06637573746F6D\""),
        "{v:?}"
    );
}
