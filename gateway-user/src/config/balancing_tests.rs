//! Unit tests for how a cluster spreads requests and retries them: `lb_policy =
//! "consistent_hash"` with `hash_on`, `retry.status_codes` and
//! `health.error_statuses_to_eject`, each with its default, inherited from
//! `[router.upstream]`, and refused (or warned about) with file, line and key.

use super::{
    test_util::{err, load},
    *,
};

/// `[router.upstream]` with `upstream`, and the clusters `a` and `b` with their own keys.
fn config(upstream: &str, a: &str, b: &str) -> String {
    format!(
        "[router]\nlistener_port = 8080\n[router.upstream]\n{upstream}\n\
         [clusters.a]\nendpoints = [\"127.0.0.1:9000\"]\n{a}\n\
         [clusters.b]\nendpoints = [\"127.0.0.1:9001\"]\n{b}\n\
         [[routes]]\ncluster = \"a\"\n[[routes]]\npath_prefix = \"/b/\"\ncluster = \"b\"\n"
    )
}

#[test]
fn hash_on_defaults_to_the_client_and_is_inherited_and_checked() {
    let s = load(&config(
        "hash_on = \"cookie:session\"",
        "lb_policy = \"consistent_hash\"\nhash_on = \"header:X-User-Id\"",
        "lb_policy = \"consistent_hash\"",
    ))
    .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let a = &s.settings.clusters["a"];
    assert_eq!(a.lb_policy, LbPolicy::ConsistentHash);
    assert_eq!(
        a.hash_on,
        HashOn::Header(http::HeaderName::from_static("x-user-id"))
    );
    assert_eq!(
        s.settings.clusters["b"].hash_on,
        HashOn::Cookie("session".into())
    );
    let plain = load(&config("", "", "lb_policy = \"consistent_hash\"")).unwrap();
    assert_eq!(plain.settings.clusters["b"].hash_on, HashOn::Client);

    for bad in [
        "\"ip\"",
        "\"header:\"",
        "\"header:bad name\"",
        "\"cookie:\"",
        "\"cookie:a;b\"",
        "\"header:Connection\"",
        "\"header:te\"",
    ] {
        let e = err(&config("", &format!("hash_on = {bad}"), ""));
        assert!(
            e.contains("gw.toml:7:1: key `clusters.a.hash_on`:")
                && e.contains("is not what a request can be hashed on"),
            "{bad}: {e}"
        );
    }
    // In [router.upstream], which is also the cluster `default`: a key its clusters inherit,
    // not one nothing reads.
    let fleet = load(
        "[router]\nlistener_port = 8080\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n\
         hash_on = \"header:x-user\"\n[clusters.a]\nendpoints = [\"127.0.0.1:9001\"]\n\
         lb_policy = \"consistent_hash\"\n[[routes]]\ncluster = \"a\"\n\
         [[routes]]\npath_prefix = \"/d/\"\ncluster = \"default\"\n",
    )
    .unwrap();
    assert!(fleet.warnings.is_empty(), "{:?}", fleet.warnings);
    assert_eq!(
        fleet.settings.clusters["a"].hash_on,
        HashOn::Header(http::HeaderName::from_static("x-user"))
    );
    // Set on a cluster that does not hash: a warning at its key.
    let w = load(&config("", "hash_on = \"client\"", ""))
        .unwrap()
        .warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].to_string().contains("clusters.a.hash_on"), "{}", w[0]);
}

#[test]
fn hash_balance_factor_is_unbounded_by_default_inherited_and_checked() {
    let s = load(&config(
        "hash_balance_factor = 150",
        "lb_policy = \"consistent_hash\"\nhash_balance_factor = 125",
        "lb_policy = \"consistent_hash\"",
    ))
    .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(s.settings.clusters["a"].hash_balance_factor, Some(125));
    assert_eq!(s.settings.clusters["b"].hash_balance_factor, Some(150));
    let plain = load(&config("", "", "lb_policy = \"consistent_hash\"")).unwrap();
    assert_eq!(plain.settings.clusters["b"].hash_balance_factor, None);
    for bad in [99, 1001, 0] {
        let e = err(&config("", &format!("hash_balance_factor = {bad}"), ""));
        assert!(
            e.contains("gw.toml:7:1: key `clusters.a.hash_balance_factor`:")
                && e.contains(&format!("{bad} is out of range: allowed 100..=1000 %")),
            "{bad}: {e}"
        );
    }
    let w = load(&config("", "hash_balance_factor = 125", ""))
        .unwrap()
        .warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    let w = w[0].to_string();
    assert!(
        w.contains("clusters.a.hash_balance_factor")
            && w.contains("hash_balance_factor is set, but lb_policy is not"),
        "{w}"
    );
}

#[test]
fn status_codes_and_error_statuses_to_eject_have_defaults_and_are_inherited() {
    let s = load(&config(
        "retry = { status_codes = [503] }\nhealth = { error_statuses_to_eject = 3 }",
        "retry = { status_codes = [502, 504] }\nhealth = { error_statuses_to_eject = 0 }",
        "",
    ))
    .unwrap()
    .settings;
    let (a, b) = (&s.clusters["a"], &s.clusters["b"]);
    assert!(a.retry.status_codes.contains(502) && !a.retry.status_codes.contains(503));
    assert!(b.retry.status_codes.contains(503) && !b.retry.status_codes.contains(502));
    assert_eq!(a.health.machine.error_statuses_to_eject, 0);
    assert_eq!(b.health.machine.error_statuses_to_eject, 3);
    let d = load(&config("", "", "")).unwrap().settings;
    assert!(d.clusters["a"].retry.status_codes.is_empty());
    assert_eq!(d.clusters["a"].health.machine.error_statuses_to_eject, 5);
    let e = err(&config("retry = { status_codes = [200] }", "", ""));
    assert!(
        e.contains("key `router.upstream.retry.status_codes[0]`: 200 is out of range"),
        "{e}"
    );
    let e = err(&config(
        "",
        "health = { error_statuses_to_eject = 1001 }",
        "",
    ));
    assert!(
        e.contains("key `clusters.a.health.error_statuses_to_eject`: 1001 is out of range"),
        "{e}"
    );
}

#[test]
fn slow_start_is_off_by_default_inherited_and_at_most_an_hour() {
    let s = load(&config(
        "[router.upstream.health]\nslow_start_ms = 30000",
        "[clusters.a.health]\nslow_start_ms = 5000",
        "",
    ))
    .unwrap();
    let window = |c: &str| s.settings.clusters[c].health.slow_start;
    assert_eq!(window("a"), std::time::Duration::from_secs(5));
    assert_eq!(window("b"), std::time::Duration::from_secs(30));
    let plain = load(&config("", "", "")).unwrap();
    assert!(plain.settings.clusters["a"].health.slow_start.is_zero());
    let e = err(&config(
        "",
        "[clusters.a.health]\nslow_start_ms = 3600001",
        "",
    ));
    assert!(
        e.contains(
            "key `clusters.a.health.slow_start_ms`: 3600001 is out of range: allowed 0..=3600000 ms"
        ),
        "{e}"
    );
}

#[test]
fn status_lists_that_max_retries_0_makes_moot_warn_where_they_are_set() {
    let warnings = |text: &str| -> Vec<String> {
        load(text)
            .unwrap()
            .warnings
            .iter()
            .map(ToString::to_string)
            .filter(|w| w.contains("none of them is ever retried"))
            .collect()
    };
    let w = warnings(&config(
        "",
        "[clusters.a.retry]\nmax_retries = 0\nstatus_codes = [503]\ngrpc_status_codes = [\"UNAVAILABLE\"]",
        "[clusters.b.retry]\nstatus_codes = [503]",
    ));
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("clusters.a.retry.grpc_status_codes"), "{w:?}");
    assert!(w[1].contains("clusters.a.retry.status_codes"), "{w:?}");
    // A route that turns retries off over a cluster that lists statuses.
    let route = config("", "", "[clusters.b.retry]\nstatus_codes = [503]").replace(
        "path_prefix = \"/b/\"\ncluster = \"b\"\n",
        "path_prefix = \"/b/\"\ncluster = \"b\"\n[routes.retry]\nmax_retries = 0\n",
    );
    let w = warnings(&route);
    assert!(
        w.len() == 1 && w[0].contains("routes[1].retry.status_codes"),
        "{w:?}"
    );
    assert!(warnings(&config("", "[clusters.a.retry]\nmax_retries = 0", "")).is_empty());
}
