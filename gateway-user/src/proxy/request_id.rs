//! Request IDs (`[router.request_id]`): a client's own `x-request-id` is kept when it looks
//! like one (1 to `MAX_REQUEST_ID_LEN` visible ASCII characters) and `keep_incoming` allows
//! it; otherwise the gateway makes one, a random UUID (version 4, RFC 9562), as Envoy and
//! nginx's `$request_id` users expect. The ID goes upstream, back to the client (on the
//! upstream's response and on the gateway's own errors) and into the access log.

use http::{HeaderMap, HeaderValue, header::Entry};

use crate::config::{RequestId, model::MAX_REQUEST_ID_LEN};

/// The request's ID: the client's, or a new one; written into `headers` (the request on its
/// way upstream).
///
/// Either is marked sensitive, which only HPACK reads: over HTTP/2 (to an h2 upstream, back
/// to an h2 client) the ID is sent as a literal that is never indexed. An ID is unique to its
/// request, so putting it in the dynamic table (h2's default) only churns the table, ours and
/// the peer's: each one evicts headers that would have been reused, and h2's lookup of the
/// name compared the new ID with every ID still in the table, about 50 of them in 4 KiB.
pub(crate) fn assign(cfg: &RequestId, headers: &mut HeaderMap) -> HeaderValue {
    // One lookup both reads the client's ID and writes a new one: hashing the (custom) name
    // costs more than the rest of either.
    match headers.entry(&cfg.header) {
        Entry::Occupied(mut e) if cfg.keep_incoming && acceptable(e.get()) => {
            e.get_mut().set_sensitive(true);
            let id = e.get().clone();
            // One line goes upstream: the first, which the log and the response name. An
            // upstream that read a client's second line, or the lines joined, logged another.
            if e.iter().nth(1).is_some() {
                e.insert(id.clone());
            }
            id
        }
        // Replaces every value the client sent, as `HeaderMap::insert` does.
        Entry::Occupied(mut e) => {
            let id = generate();
            e.insert(id.clone());
            id
        }
        Entry::Vacant(e) => {
            let id = generate();
            e.insert(id.clone());
            id
        }
    }
}

fn acceptable(v: &HeaderValue) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&v.len()) && v.as_bytes().iter().all(u8::is_ascii_graphic)
}

/// A random UUID, version 4: `8-4-4-4-12` lowercase hex digits.
pub(crate) fn generate() -> HeaderValue {
    // From the thread's cryptographically secure generator, as RFC 9562 section 6.9 asks of
    // version 4 UUIDs (a non-cryptographic one saved about 140 instructions per request, its
    // block refills: not worth guessable IDs).
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Where each byte's two digits go, dashes between the groups: fixed places, so the loop
    // unrolls with no branch and no bounds check.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut out = [b'-'; 36];
    for (byte, at) in b.iter().zip(AT) {
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0xf)];
    }
    // Owned, not copied: the ID is cloned into the request, the response and the log, and a
    // `Bytes` copied from a slice allocates again (its shared count) at its first clone.
    // SAFETY: hex digits and dashes only, all visible ASCII: a valid header value.
    let mut id = unsafe { HeaderValue::from_maybe_shared_unchecked(bytes::Bytes::from_owner(out)) };
    id.set_sensitive(true);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(keep: bool) -> RequestId {
        RequestId {
            header: http::HeaderName::from_static("x-request-id"),
            keep_incoming: keep,
        }
    }

    #[test]
    fn generated_ids_are_distinct_v4_uuids() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "{s}");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_eq!(s.matches('-').count(), 4);
        assert!(a.is_sensitive(), "never indexed by HPACK");
        let groups: Vec<usize> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
        assert!(
            s.bytes()
                .all(|c| c == b'-' || matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        );
    }

    #[test]
    fn a_clients_id_is_kept_when_allowed_and_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(assign(&cfg(true), &mut h), "abc-123");
        assert_eq!(h["x-request-id"], "abc-123");
        assert!(
            h["x-request-id"].is_sensitive(),
            "a kept ID is not indexed either"
        );
        let id = assign(&cfg(false), &mut h);
        assert_ne!(id, "abc-123");
        assert_eq!(h["x-request-id"], id);
        for bad in ["", "has space", &"x".repeat(MAX_REQUEST_ID_LEN + 1)] {
            let mut h = HeaderMap::new();
            h.insert("x-request-id", HeaderValue::from_str(bad).unwrap());
            let id = assign(&cfg(true), &mut h);
            assert_eq!(id.len(), 36, "{bad:?} replaced");
        }
        let mut h = HeaderMap::new();
        let id = assign(&cfg(true), &mut h);
        assert_eq!(h["x-request-id"], id);
        // A new ID replaces every line the client sent.
        let mut h = HeaderMap::new();
        h.append("x-request-id", HeaderValue::from_static("has space"));
        h.append("x-request-id", HeaderValue::from_static("abc-123"));
        let id = assign(&cfg(true), &mut h);
        let all: Vec<_> = h.get_all("x-request-id").iter().collect();
        assert_eq!(all, vec![&id]);
        // A kept ID goes upstream alone too.
        let mut h = HeaderMap::new();
        h.append("x-request-id", HeaderValue::from_static("abc-123"));
        h.append("x-request-id", HeaderValue::from_static("forged"));
        assert_eq!(assign(&cfg(true), &mut h), "abc-123");
        let all: Vec<_> = h.get_all("x-request-id").iter().collect();
        assert_eq!(all, ["abc-123"]);
    }
}
