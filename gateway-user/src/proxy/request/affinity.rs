//! The key a `consistent_hash` cluster hashes a request on (`hash_on`): the client, a header
//! or a cookie.

use std::net::IpAddr;

use http::{HeaderMap, header::COOKIE};

use crate::{
    config::{HashOn, LbPolicy},
    proxy::upstream::{Cluster, key_hash},
};

/// The hash of the request's `hash_on` key, for a `consistent_hash` cluster. `None` for any
/// other policy, and for a request without the header or cookie, or with an empty one
/// (balanced round robin).
/// `client` is the client's address, or the client a trusted proxy names.
pub(super) fn key(cluster: &Cluster, headers: &HeaderMap, client: IpAddr) -> Option<u64> {
    if cluster.spec.lb_policy != LbPolicy::ConsistentHash {
        return None;
    }
    match &cluster.spec.hash_on {
        HashOn::Client => Some(match client.to_canonical() {
            IpAddr::V4(a) => key_hash(&a.octets()),
            IpAddr::V6(a) => key_hash(&a.octets()),
        }),
        // An empty value is no key: every client that sends one would share an endpoint.
        HashOn::Header(name) => headers
            .get(name)
            .map(|v| v.as_bytes())
            .filter(|v| !v.is_empty())
            .map(key_hash),
        HashOn::Cookie(name) => cookie(headers, name)
            .filter(|v| !v.is_empty())
            .map(key_hash),
    }
}

/// The value of cookie `name` in the request's `Cookie` fields (every one of them: an HTTP/2
/// client sends a field per cookie).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn a_cookie_is_found_in_any_cookie_field_by_its_exact_name() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; session_x=2"));
        h.append(COOKIE, HeaderValue::from_static("theme=dark;session=abc"));
        assert_eq!(cookie(&h, "session"), Some(&b"abc"[..]));
        assert_eq!(cookie(&h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie(&h, "session_x"), Some(&b"2"[..]));
        assert_eq!(cookie(&h, "sess"), None);
        assert_eq!(cookie(&HeaderMap::new(), "session"), None);
        let mut empty = HeaderMap::new();
        empty.append(COOKIE, HeaderValue::from_static("session=; b"));
        assert_eq!(cookie(&empty, "session"), Some(&b""[..]));
        assert_eq!(
            cookie(&empty, "b"),
            None,
            "a pair without `=` names no cookie"
        );
    }
}
