//! A route that can never match: an earlier route takes every request it would.

use super::super::{
    super::{
        settings::{HeaderIs, HeaderMatch, Route},
        source::KeyPath,
    },
    At, Checker, Warning,
};

/// Warns when an earlier route of `earlier` takes every request `r` would match. The router
/// tries routes by host (exact, then wildcard, then any), then the longest prefix, then the
/// most conditions, then the order written (`proxy::router`): an earlier route with `r`'s
/// host and prefix, and as many conditions, each of which `r`'s imply (its methods or more;
/// its headers, where a `value` implies `present = true`), always comes first. The usual
/// mistake: a copied route left in place, or a catch-all written before the route meant to
/// narrow it by header.
pub(super) fn warn_shadowed(c: &mut Checker, earlier: &[Route], r: &Route, key: &KeyPath) {
    let conditions = |x: &Route| usize::from(x.methods.is_some()) + x.headers.len();
    let Some(by) = earlier.iter().find(|e| {
        e.host == r.host
            && e.path_prefix == r.path_prefix
            && conditions(e) == conditions(r)
            && methods_cover(e, r)
            && e.headers
                .iter()
                .all(|h| r.headers.iter().any(|g| implies(g, h)))
    }) else {
        return;
    };
    c.warnings.push(At {
        key: key.clone(),
        what: Warning::ShadowedRoute {
            route: r.name.clone(),
            by: by.name.clone(),
        },
    });
}

/// `e` takes every method `r` takes.
fn methods_cover(e: &Route, r: &Route) -> bool {
    match (&e.methods, &r.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(em), Some(rm)) => rm.iter().all(|m| em.contains(m)),
    }
}

/// A request that meets `g` meets `h`.
fn implies(g: &HeaderMatch, h: &HeaderMatch) -> bool {
    g.name == h.name
        && (g.is == h.is || (h.is == HeaderIs::Present && matches!(g.is, HeaderIs::Exactly(_))))
}
