//! A certificate's validity period and subject common name, read straight from its DER (RFC
//! 5280 section 4.1): just enough ASN.1 to walk `tbsCertificate` to `validity` and `subject`,
//! so that an expired certificate is refused at load time and its expiry exported as a metric
//! without an X.509 parsing library in the binary. rustls itself verifies chains; this only
//! reads dates and a name.

use std::time::{SystemTime, UNIX_EPOCH};

/// What the gateway reads from one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The subject's common name, or the whole subject's byte length as a hint when it has none.
    pub subject: String,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION_TAG: u8 = 0xa0;
/// id-at-commonName, 2.5.4.3.
const CN_OID: &[u8] = &[0x55, 0x04, 0x03];

/// One DER element: its tag, its contents, and what follows it.
fn next(der: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    let (&tag, rest) = der.split_first().ok_or("truncated")?;
    if tag & 0x1f == 0x1f {
        return Err("multi-byte tags are not used in certificates");
    }
    let (&first, mut rest) = rest.split_first().ok_or("truncated length")?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad length");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err("truncated contents");
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect(der: &[u8], want: u8) -> Result<(&[u8], &[u8]), &'static str> {
    let (tag, body, rest) = next(der)?;
    if tag != want {
        return Err("unexpected element");
    }
    Ok((body, rest))
}

/// Reads the validity period and subject of a DER certificate.
pub fn read(cert: &[u8]) -> Result<Validity, &'static str> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION_TAG) {
        rest = next(rest)?.2;
    }
    let rest = next(rest)?.2; // serialNumber
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, rest) = expect(rest, SEQUENCE)?;
    let (subject, _) = expect(rest, SEQUENCE)?;
    let (not_before, after) = time(validity)?;
    let (not_after, _) = time(after)?;
    Ok(Validity {
        not_before,
        not_after,
        subject: common_name(subject).unwrap_or_else(|| "(no common name)".to_owned()),
    })
}

/// A UTCTime or GeneralizedTime in UTC (`Z`), as Unix seconds, and what follows it.
fn time(der: &[u8]) -> Result<(i64, &[u8]), &'static str> {
    let (tag, body, rest) = next(der)?;
    let digits = |s: &[u8]| -> Result<i64, &'static str> {
        s.iter().try_fold(0i64, |a, &b| {
            b.is_ascii_digit()
                .then(|| a * 10 + i64::from(b - b'0'))
                .ok_or("a time with a non-digit")
        })
    };
    let (year, tail) = match (tag, body.len()) {
        (UTC_TIME, 13) => {
            // RFC 5280 4.1.2.5.1: YY >= 50 is 19YY, else 20YY.
            let yy = digits(&body[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &body[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&body[..4])?, &body[4..]),
        _ => return Err("a validity time that is neither UTCTime nor GeneralizedTime in UTC"),
    };
    if tail[10] != b'Z' {
        return Err("a validity time not in UTC");
    }
    let [mo, d, h, mi, s] = [0, 2, 4, 6, 8].map(|i| digits(&tail[i..i + 2]));
    let (mo, d, h, mi, s) = (mo?, d?, h?, mi?, s?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err("a validity time out of range");
    }
    let days = days_from_civil(year, mo, d);
    Ok((days * 86_400 + h * 3600 + mi * 60 + s, rest))
}

/// The first commonName of a Name, if it is a string.
fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (set, rest) = expect(name, SET).ok()?;
        name = rest;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (attr, more) = expect(attrs, SEQUENCE).ok()?;
            attrs = more;
            let (oid, value) = expect(attr, OID).ok()?;
            if oid == CN_OID {
                let (_, text, _) = next(value).ok()?;
                return std::str::from_utf8(text).ok().map(str::to_owned);
            }
        }
    }
    None
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date (year, month, day) of a day since 1970-01-01: the inverse of
/// [`days_from_civil`] (H. Hinnant's `civil_from_days`). Also the access log's timestamps.
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unix seconds as `2025-01-31 12:00:00 UTC`.
pub fn display(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Now, as Unix seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["api.example.com".to_owned()]).unwrap();
        p.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "api.example.com");
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn validity_and_common_name_are_read_from_the_der() {
        // 2049 is still a UTCTime, 2050 and later a GeneralizedTime (RFC 5280 4.1.2.5).
        for (nb, na) in [
            ((2024, 1, 2), (2049, 12, 31)),
            ((1999, 3, 4), (2077, 6, 30)),
        ] {
            let v = read(&cert(nb, na)).unwrap();
            assert_eq!(
                display(v.not_before),
                format!("{:04}-{:02}-{:02} 00:00:00 UTC", nb.0, nb.1, nb.2)
            );
            assert_eq!(
                display(v.not_after),
                format!("{:04}-{:02}-{:02} 00:00:00 UTC", na.0, na.1, na.2)
            );
            assert_eq!(v.subject, "api.example.com");
        }
        assert_eq!(display(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = cert((2024, 1, 1), (2030, 1, 1));
        for cut in [0, 1, 2, 5, 40, good.len() / 2] {
            assert!(read(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(read(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(read(b"-----BEGIN CERTIFICATE-----").is_err());
    }
}
