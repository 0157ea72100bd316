//! Unit tests of the `check-config` warning for a route that an earlier one always takes
//! (`validate/routes/shadowed.rs`).

use super::test_util::{BASE, load};

/// A route that an earlier one always takes is a warning at its key; a route that only looks
/// alike (a narrower earlier one, a later one with more conditions, which the router tries
/// first) is not.
#[test]
fn a_route_an_earlier_one_always_takes_is_a_warning() {
    let shadowed = |a: &str, b: &str| -> Vec<String> {
        let text = format!(
            "{BASE}[[routes]]\nname = \"a\"\ncluster = \"api\"\n{a}\n\
             [[routes]]\nname = \"b\"\ncluster = \"api\"\n{b}\n"
        );
        load(&text)
            .unwrap()
            .warnings
            .iter()
            .map(ToString::to_string)
            .filter(|w| w.contains("never matches"))
            .collect()
    };
    let prefix = "path_prefix = \"/api/\"";
    let get_post = "methods = [\"GET\", \"POST\"]";
    let canary = "headers = [{ name = \"x-canary\", value = \"1\" }]";
    let present = "headers = [{ name = \"x-canary\", present = true }]";
    for (a, b) in [
        (prefix.to_owned(), prefix.to_owned()),
        (
            format!("{prefix}\n{get_post}"),
            format!("{prefix}\nmethods = [\"GET\"]"),
        ),
        (
            format!("{prefix}\n{present}"),
            format!("{prefix}\n{canary}"),
        ),
        (String::new(), "path_prefix = \"/\"".to_owned()),
    ] {
        let w = shadowed(&a, &b);
        assert_eq!(w.len(), 1, "{a} / {b}: {w:?}");
        assert!(
            w[0].contains("routes[1]") && w[0].contains("route `b` never matches: route `a`"),
            "{w:?}"
        );
    }
    for (a, b) in [
        (prefix.to_owned(), format!("{prefix}\n{canary}")),
        (
            format!("{prefix}\n{canary}"),
            format!("{prefix}\n{present}"),
        ),
        (
            format!("{prefix}\nmethods = [\"GET\"]"),
            format!("{prefix}\n{get_post}"),
        ),
        (prefix.to_owned(), "path_prefix = \"/api/v2/\"".to_owned()),
        (format!("host = \"a.example\"\n{prefix}"), prefix.to_owned()),
        (
            format!("{prefix}\n{canary}"),
            format!("{prefix}\nmethods = [\"GET\"]"),
        ),
    ] {
        assert_eq!(shadowed(&a, &b), Vec::<String>::new(), "{a} / {b}");
    }
}
