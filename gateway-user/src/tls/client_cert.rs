//! A client certificate as the next hop reads it (`[router.tls] forward_client_cert`): one
//! element of Envoy's `X-Forwarded-Client-Cert`, `Hash=…;Subject="…";URI=…;DNS=…`, the
//! header Envoy writes with `forward_client_cert_details: SANITIZE_SET` and its subject, URI
//! and DNS details, and which Istio, Linkerd's and SPIFFE's tooling read. `Hash` is the
//! SHA-256 of the certificate's DER, in lowercase hex; `Subject` its subject in RFC 4514
//! form (the last RDN first, Envoy's and OpenSSL's `RFC2253` order); `URI` and `DNS` each of
//! its alternative names of that kind. rustls has verified the chain before this reads it.

use std::fmt::Write as _;

use http::{HeaderName, HeaderValue};
use x509_parser::{
    certificate::X509Certificate,
    extensions::GeneralName,
    objects::{oid_registry, oid2abbrev},
    prelude::FromDer as _,
    x509::X509Name,
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
        quoted(&mut out, &rfc4514(cert.subject()));
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
            for (key, v) in uris.chain(dns) {
                out.push_str(key);
                element_value(&mut out, v);
            }
        }
    }
    HeaderValue::from_str(&out).unwrap_or(hash_only)
}

/// An X.509 name as RFC 4514 writes it: the last RDN first, RDNs joined by `,`, the attributes
/// of one by `+`, each `type=value` with its special characters escaped. A value that is no
/// string (RFC 4514 section 2.4) is `#` and the hex of its content.
fn rfc4514(name: &X509Name) -> String {
    let mut out = String::new();
    for (i, rdn) in name
        .iter_rdn()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .enumerate()
    {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match oid2abbrev(attr.attr_type(), oid_registry()) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(v) => escape_rfc4514(&mut out, v),
                Err(_) => {
                    out.push('#');
                    for b in attr.attr_value().data {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

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

/// A `URI` or `DNS` value: as it is, or quoted when it holds `,`, `;`, `=` or `"`; a control
/// character (an IA5String may hold one) is dropped.
fn element_value(out: &mut String, v: &str) {
    let clean: String = v.chars().filter(|c| !c.is_ascii_control()).collect();
    if clean.contains([',', ';', '=', '"']) {
        quoted(out, &clean);
    } else {
        out.push_str(&clean);
    }
}

#[cfg(test)]
mod tests;
