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
