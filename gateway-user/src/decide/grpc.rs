//! gRPC's rules, as plain code: the status codes and their names, the `grpc-timeout` header
//! (its deadline, and the value to send upstream), which statuses a route retries, and the
//! percent-encoding of `grpc-message`.
//!
//! References: gRPC over HTTP/2 (`doc/PROTOCOL-HTTP2.md` in grpc/grpc: `grpc-timeout` is at
//! most 8 digits and a unit, `grpc-message` is percent-encoded) and `doc/statuscodes.md`.

use std::{fmt, time::Duration};

/// A gRPC status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcCode(pub u8);

impl GrpcCode {
    pub const OK: GrpcCode = GrpcCode(0);
    pub const CANCELLED: GrpcCode = GrpcCode(1);
    pub const UNKNOWN: GrpcCode = GrpcCode(2);
    pub const INVALID_ARGUMENT: GrpcCode = GrpcCode(3);
    pub const DEADLINE_EXCEEDED: GrpcCode = GrpcCode(4);
    pub const NOT_FOUND: GrpcCode = GrpcCode(5);
    pub const PERMISSION_DENIED: GrpcCode = GrpcCode(7);
    pub const RESOURCE_EXHAUSTED: GrpcCode = GrpcCode(8);
    pub const UNIMPLEMENTED: GrpcCode = GrpcCode(12);
    pub const INTERNAL: GrpcCode = GrpcCode(13);
    pub const UNAVAILABLE: GrpcCode = GrpcCode(14);

    /// The names, by code, as in `doc/statuscodes.md` (and gRPC service configs).
    pub const NAMES: [&'static str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];

    /// The code of a name, whatever its case.
    pub fn from_name(name: &str) -> Option<GrpcCode> {
        GrpcCode::NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .map(|i| GrpcCode(i as u8))
    }

    /// A `grpc-status` header value.
    pub fn parse(value: &[u8]) -> Option<GrpcCode> {
        let n: u8 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
        (usize::from(n) < GrpcCode::NAMES.len()).then_some(GrpcCode(n))
    }

    /// The header value, `"14"`.
    pub fn as_str(self) -> &'static str {
        const DIGITS: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        DIGITS.get(usize::from(self.0)).copied().unwrap_or("2")
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match GrpcCode::NAMES.get(usize::from(self.0)) {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.0),
        }
    }
}

/// A set of gRPC status codes (a route's retryable ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcCodes(u32);

impl GrpcCodes {
    pub const NONE: GrpcCodes = GrpcCodes(0);

    pub fn with(self, c: GrpcCode) -> GrpcCodes {
        GrpcCodes(self.0 | 1 << c.0)
    }

    pub fn contains(self, c: GrpcCode) -> bool {
        c.0 < 32 && self.0 & (1 << c.0) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The longest `grpc-timeout` value gRPC allows: 8 digits.
const MAX_TIMEOUT_DIGITS: usize = 8;

/// `grpc-timeout: 250m` → 250 ms. `None` for a malformed value (which gRPC servers treat as
/// no deadline, so the route's own limit applies).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty()
        || digits.len() > MAX_TIMEOUT_DIGITS
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-timeout` value for `d`, in the finest unit that fits 8 digits (rounded up, so
/// that the upstream never sees a deadline shorter than 1 ms as 0).
pub fn format_timeout(d: Duration) -> String {
    let max = 10u128.pow(MAX_TIMEOUT_DIGITS as u32) - 1;
    let ms = d.as_nanos().div_ceil(1_000_000).max(1);
    if ms <= max {
        return format!("{ms}m");
    }
    let s = d.as_nanos().div_ceil(1_000_000_000).max(1);
    if s <= max {
        return format!("{s}S");
    }
    format!("{}H", s.div_ceil(3600).min(max))
}

/// `grpc-message`'s percent-encoding: every byte outside 0x20..=0x7E, and `%`.
pub fn encode_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is a gRPC call: `content-type: application/grpc` or
/// `application/grpc+proto`, `application/grpc+json`, ….
pub fn is_grpc(content_type: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    content_type.len() >= GRPC.len()
        && content_type[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(content_type.get(GRPC.len()), None | Some(b'+' | b';'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_in_every_unit_and_refuse_malformed_values() {
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout(b"1500u"), Some(Duration::from_micros(1500)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            &b""[..],
            b"m",
            b"123456789m",
            b"12x",
            b"-1S",
            b"1.5S",
            b"12",
        ] {
            assert_eq!(parse_timeout(bad), None, "{:?}", std::str::from_utf8(bad));
        }
    }

    #[test]
    fn a_timeout_sent_upstream_keeps_its_value_within_8_digits() {
        assert_eq!(format_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(format_timeout(Duration::from_micros(1)), "1m");
        assert_eq!(format_timeout(Duration::from_secs(90_000)), "90000000m");
        assert_eq!(format_timeout(Duration::from_secs(500_000)), "500000S");
        for d in [1u64, 999, 123_456_789] {
            let v = format_timeout(Duration::from_millis(d));
            assert!(parse_timeout(v.as_bytes()).unwrap() >= Duration::from_millis(d));
        }
    }

    #[test]
    fn names_codes_and_sets() {
        assert_eq!(
            GrpcCode::from_name("unavailable"),
            Some(GrpcCode::UNAVAILABLE)
        );
        assert_eq!(GrpcCode::from_name("NOPE"), None);
        assert_eq!(GrpcCode::UNAVAILABLE.as_str(), "14");
        assert_eq!(GrpcCode::DEADLINE_EXCEEDED.to_string(), "DEADLINE_EXCEEDED");
        assert_eq!(GrpcCode::parse(b"14"), Some(GrpcCode::UNAVAILABLE));
        assert_eq!(GrpcCode::parse(b"17"), None);
        let set = GrpcCodes::default().with(GrpcCode::UNAVAILABLE);
        assert!(set.contains(GrpcCode::UNAVAILABLE));
        assert!(!set.contains(GrpcCode::INTERNAL));
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("a b%c"), "a b%25c");
        assert_eq!(encode_message("µ\n"), "%C2%B5%0A");
    }

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc(b"application/grpc"));
        assert!(is_grpc(b"application/grpc+proto"));
        assert!(is_grpc(b"Application/GRPC;charset=x"));
        assert!(!is_grpc(b"application/grpc-web"));
        assert!(!is_grpc(b"application/json"));
    }
}
