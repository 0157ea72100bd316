//! A client certificate as the next hop reads it (`[router.tls] forward_client_cert`): one
//! element of Envoy's `X-Forwarded-Client-Cert`, `Hash=…;Subject="…";URI=…;DNS=…`, the
//! header Envoy writes with `forward_client_cert_details: SANITIZE_SET` and its subject, URI
//! and DNS details, and which Istio, Linkerd's and SPIFFE's tooling read. `Hash` is the
//! SHA-256 of the certificate's DER, in lowercase hex; `Subject` its subject in OpenSSL's RFC
//! 2253 form, as Envoy sends it; `URI` and `DNS` each of its alternative names of that kind.
//! rustls has verified the chain before this reads it.

use std::fmt::Write as _;

use http::{HeaderName, HeaderValue};
use x509_parser::{
    certificate::X509Certificate, der_parser::asn1_rs::ToDer as _, extensions::GeneralName,
    prelude::FromDer as _, x509::X509Name,
};

pub const HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The header's value for the certificate `der`. A certificate x509-parser cannot read (rustls
/// accepted it, so hardly ever) is named by its hash alone.
pub fn forwarded(der: &[u8]) -> HeaderValue {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::from("Hash=");
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    let hash_only = HeaderValue::from_str(&out).expect("hex digits");
    if let Ok((_, cert)) = X509Certificate::from_der(der) {
        out.push_str(";Subject=");
        quoted(&mut out, &rfc2253(cert.subject()));
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            let names = &san.value.general_names;
            // Envoy's order: the URIs, then the DNS names.
            let uris = names.iter().filter_map(|n| match n {
                GeneralName::URI(v) => Some((";URI=", v)),
                _ => None,
            });
            let dns = names.iter().filter_map(|n| match n {
                GeneralName::DNSName(v) => Some((";DNS=", v)),
                _ => None,
            });
            for (key, v) in uris.chain(dns).filter(|(_, v)| plain(v)) {
                out.push_str(key);
                element_value(&mut out, v);
            }
        }
    }
    HeaderValue::from_str(&out).unwrap_or(hash_only)
}

/// An X.509 name as OpenSSL's RFC 2253 form writes it (`openssl x509 -nameopt RFC2253`, and
/// so Envoy's `Subject`): every attribute in reverse order, those of one RDN joined by `+`,
/// RDNs by `,`; each `name=value`, the name OpenSSL's ([`NAMES`]), the value escaped as RFC
/// 4514 has it. An attribute OpenSSL has no name for is its OID, `=#` and the hex of its DER,
/// and so is a value that is no string.
fn rfc2253(name: &X509Name) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.into_iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let attrs: Vec<_> = rdn.iter().collect();
        for (j, attr) in attrs.into_iter().rev().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attr.attr_type().to_id_string();
            let known = NAMES.iter().find(|(o, _)| *o == oid).map(|(_, n)| *n);
            out.push_str(known.unwrap_or(&oid));
            out.push('=');
            match (known, attr.as_str()) {
                (Some(_), Ok(v)) => escape_rfc4514(&mut out, v),
                _ => {
                    out.push('#');
                    let value = attr.attr_value();
                    let der = value.to_der_vec().unwrap_or_else(|_| value.data.to_vec());
                    for b in der {
                        let _ = write!(out, "{b:02X}");
                    }
                }
            }
        }
    }
    out
}

/// OpenSSL's names of the attributes a subject holds (`objects.txt`: the short name, else the
/// long one), by OID.
const NAMES: [(&str, &str); 27] = [
    ("2.5.4.3", "CN"),
    ("2.5.4.4", "SN"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.12", "title"),
    ("2.5.4.13", "description"),
    ("2.5.4.15", "businessCategory"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.41", "name"),
    ("2.5.4.42", "GN"),
    ("2.5.4.43", "initials"),
    ("2.5.4.44", "generationQualifier"),
    ("2.5.4.46", "dnQualifier"),
    ("2.5.4.65", "pseudonym"),
    ("2.5.4.97", "organizationIdentifier"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("1.2.840.113549.1.9.1", "emailAddress"),
    ("1.3.6.1.4.1.311.60.2.1.1", "jurisdictionL"),
    ("1.3.6.1.4.1.311.60.2.1.2", "jurisdictionST"),
    ("1.3.6.1.4.1.311.60.2.1.3", "jurisdictionC"),
    ("2.5.4.16", "postalAddress"),
];

/// RFC 4514 section 2.4: `+,;<>\` anywhere, `#` or a space first and a space last take a
/// backslash; a control character, and each byte of a character past ASCII, is `\` and two
/// hex digits (a control character could not go in a header; an upstream may read other bytes
/// as Latin-1).
/// A `"` is left to [`quoted`], whose `\"` is the escape both read (as Envoy's subject has it:
/// OpenSSL's `\"`, in quotes that escape nothing more).
fn escape_rfc4514(out: &mut String, v: &str) {
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        if matches!(c, '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ')
        {
            out.push('\\');
            out.push(c);
        } else if c.is_ascii_control() || !c.is_ascii() {
            // OpenSSL's RFC 2253 form, which Envoy sends: each byte of the UTF-8 as `\XX`.
            let mut utf8 = [0; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(out, "\\{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

/// A value in double quotes, a `"` in it escaped with `\` (Envoy's header format: `Subject`
/// always quoted, any other value when it holds `,`, `;` or `=`). A backslash stays as it is,
/// as Envoy leaves it: an RFC 4514 escape (`CN=a\, b`) reaches the upstream as the
/// certificate's name spells it.
fn quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        if c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A `URI` or `DNS` name that can go as it is: visible ASCII without `"` or `\`, which no valid
/// URI (RFC 3986) or host name holds. Any other is left out whole: a control character could
/// not go in the header, and to drop it would name another identity (`ad\nmin` read as
/// `admin`); a `\` or `"` would let the value run into the next field for a reader of quoted
/// strings.
fn plain(v: &str) -> bool {
    v.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// A [`plain`] `URI` or `DNS` value: as it is, or quoted when it holds `,`, `;` or `=`.
fn element_value(out: &mut String, v: &str) {
    if v.contains([',', ';', '=']) {
        quoted(out, v);
    } else {
        out.push_str(v);
    }
}

#[cfg(test)]
mod tests;
