//! Checks of the request target the gateway routes on, so that the upstream serves the path the
//! route was chosen for.
//!
//! **Dot-segments.** Routing compares the path as sent with each route's prefix, and
//! `rewrite_prefix` replaces that prefix; an upstream then resolves `.` and `..` (RFC 3986
//! section 5.2.4), so `/public/../admin` chose the route of `/public/` and reached `/admin`
//! (`/api/admin` under `rewrite_prefix = "/api/public/"`), outside what the route exposes and
//! past its method, header and `request_headers` rules. Browsers and curl resolve dot-segments
//! before they send a request, so one that arrives is refused (400) rather than resolved here:
//! upstreams disagree on how they spell them (nginx decodes `%2e` and `%2f` before resolving,
//! Tomcat takes `..;` for `..`), and each spelling is refused as the one it could become.
//!
//! **Other spellings of a path.** An upstream may also read `/%61dmin/users`, `//admin/users`
//! or `/admin%2Fusers` as `/admin/users` (nginx decodes and merges slashes before it matches a
//! location), where the gateway, comparing the path as sent, chose the route of `/` and not the
//! one of `/admin/` with its `allow_clients`, methods and rate limit. A path that reads as
//! another route's once spelt plainly ([`as_upstreams_read`]) is refused (400); one that
//! reads as the same route's goes upstream as sent, since some APIs put `%2F` in a segment on
//! purpose.

/// Whether `path` has a `.` or `..` segment as some upstream would read it: dots plain or
/// percent-encoded (`%2e`), segments separated by `/`, `%2f`, `\` or `%5c` (IIS and some
/// Java servers take a backslash for a slash), and a segment's `;` parameters ignored.
pub(super) fn has_dot_segment(path: &str) -> bool {
    let b = path.as_bytes();
    // A dot-segment starts a segment: after a `/` (or an encoded separator, or a backslash).
    // Most paths, those of static files and versioned APIs included, have none of these.
    if !(path.contains("/.") || b.iter().any(|&c| c == b'%' || c == b'\\')) {
        return false;
    }
    let encoded = |i: usize, hi: u8, lo: u8| {
        b.len() >= i + 3 && b[i] == b'%' && b[i + 1] == hi && b[i + 2].eq_ignore_ascii_case(&lo)
    };
    // The current segment: its dots, and whether anything else came before its parameters.
    let (mut dots, mut other, mut params) = (0u32, false, false);
    let mut i = 0;
    while i <= b.len() {
        let sep = if i == b.len() || b[i] == b'/' || b[i] == b'\\' {
            1
        } else if encoded(i, b'2', b'f') || encoded(i, b'5', b'c') {
            3
        } else {
            0
        };
        if sep > 0 {
            if !other && (dots == 1 || dots == 2) {
                return true;
            }
            (dots, other, params) = (0, false, false);
            i += sep;
        } else if params {
            i += 1;
        } else if b[i] == b'.' {
            dots += 1;
            i += 1;
        } else if encoded(i, b'2', b'e') {
            dots += 1;
            i += 3;
        } else if b[i] == b';' {
            params = true;
            i += 1;
        } else {
            other = true;
            i += 1;
        }
    }
    false
}

/// `path` as an upstream may read it, for routing only: percent-encoded printable ASCII
/// decoded (`%61` is `a`; nginx decodes before it matches a location), encoded slashes and
/// backslashes and plain backslashes taken for `/`, runs of `/` merged (nginx's
/// `merge_slashes`, on by default), and each segment's `;` parameters dropped (Tomcat, Jetty
/// and Spring read `/admin;x/users` as `/admin/users`). `%25` stays: decoding it would read a
/// path twice. `None` when there is nothing to read otherwise.
pub(super) fn as_upstreams_read(path: &str) -> Option<String> {
    let b = path.as_bytes();
    if !(b.iter().any(|&c| matches!(c, b'%' | b'\\' | b';')) || path.contains("//")) {
        return None;
    }
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let (c, step) = match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => match (hi * 16 + lo) as u8 {
                b'/' | b'\\' => (b'/', 3),
                d if d.is_ascii_graphic() && d != b'%' => (d, 3),
                _ => {
                    out.extend_from_slice(&b[i..i + 3]);
                    i += 3;
                    continue;
                }
            },
            (b'\\', ..) => (b'/', 1),
            (b';', ..) => {
                // The segment's parameters, up to its end.
                while i < b.len() && !matches!(b[i], b'/' | b'\\') {
                    i += 1;
                }
                continue;
            }
            (c, ..) => (c, 1),
        };
        if !(c == b'/' && out.last() == Some(&b'/')) {
            out.push(c);
        }
        i += step;
    }
    // ASCII in, ASCII out: the path of a `Uri` is ASCII.
    String::from_utf8(out).ok()
}

/// An authority (`Host`, `:authority`) without its port, and without the trailing dot of a
/// fully qualified name, as routes match it: `example.com:8080` and `example.com.` are
/// `example.com`, `[::1]:8080` is `[::1]`.
pub(super) fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::{as_upstreams_read, has_dot_segment, host_without_port};

    #[test]
    fn dot_segments_are_found_however_they_are_spelt() {
        for p in [
            "/public/../admin",
            "/public/..",
            "/./x",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/.%2e",
            "/public%2f..%2fadmin",
            "/public%2F..",
            "/a\\..\\b",
            "/public%5c..%5cadmin",
            "/public%5C..",
            "/public/..;/admin",
            "/public/.;x=1/a",
            "/a/b/..",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
    }

    #[test]
    fn names_with_dots_are_not_dot_segments() {
        for p in [
            "/",
            "/index.html",
            "/.well-known/acme-challenge/x",
            "/a/.../b",
            "/a/..b/c",
            "/a/b..",
            "/v1.2/items",
            "/x%20y/%41",
            "/a/%2e%2e%2e",
            "/a;..",
            "/a/x;../b",
        ] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }

    #[test]
    fn host_port_is_stripped() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("example.com."), "example.com");
        assert_eq!(host_without_port("example.com.:80"), "example.com");
    }

    #[test]
    fn a_path_is_read_as_an_upstream_may_read_it() {
        for (sent, read) in [
            ("/%61dmin/users", Some("/admin/users")),
            ("//admin//users", Some("/admin/users")),
            ("/admin%2Fusers", Some("/admin/users")),
            ("/admin%2fusers", Some("/admin/users")),
            ("/admin%5Cusers", Some("/admin/users")),
            ("/admin\\users", Some("/admin/users")),
            ("/a%7Eb%2D%5F", Some("/a~b-_")),
            ("/v1/x%3Aadmin", Some("/v1/x:admin")),
            ("/admin;x=1/users", Some("/admin/users")),
            ("/admin;/users;jsessionid=1", Some("/admin/users")),
            // Spaces, control bytes and `%25` stay as sent; a stray `%` too.
            ("/x%20y%00%25", Some("/x%20y%00%25")),
            ("/100%", Some("/100%")),
            ("/%zz/%4", Some("/%zz/%4")),
            ("/admin/users", None),
            ("/", None),
        ] {
            assert_eq!(as_upstreams_read(sent).as_deref(), read, "{sent}");
        }
    }
}
