//! A route's `methods`: HTTP methods, case-sensitive as RFC 9110 section 9.1 has them.

use http::Method;

use super::super::{
    super::{model::RouteConfig, source::KeyPath},
    Checker, Invalid,
};

/// The route's methods (`None`: any), each a token; a standard one written in lowercase is
/// refused, since it would never match.
pub(super) fn methods(c: &mut Checker, r: &RouteConfig, key: &KeyPath) -> Option<Vec<Method>> {
    let list = r.methods.as_ref()?;
    let mk = key.key("methods");
    if list.is_empty() {
        c.fail(mk.clone(), Invalid::EmptyMethods);
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        // Methods are case-sensitive (RFC 9110 section 9.1); the standard ones are uppercase.
        let upper = m.to_ascii_uppercase();
        match Method::from_bytes(m.as_bytes()) {
            // `get` is a method of its own, which no client sends for GET.
            Ok(_) if *m != upper && is_standard(&upper) => c.fail(
                mk.index(i),
                Invalid::MethodCase {
                    value: m.clone(),
                    upper,
                },
            ),
            Ok(method) if !m.is_empty() => out.push(method),
            _ => c.fail(mk.index(i), Invalid::InvalidMethod { value: m.clone() }),
        }
    }
    Some(out)
}

/// The methods RFC 9110 and RFC 5789 define, which clients send in uppercase.
fn is_standard(m: &str) -> bool {
    matches!(
        m,
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
    )
}
