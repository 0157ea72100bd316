//! Unit tests for what a gateway at the edge or behind a load balancer needs from the config:
//! `[router.forwarded] trusted_proxies`, `https_redirect`, and a route's `allow_clients` and
//! `rate_limit` — each accepted with its default, and each bad value refused with file, line
//! and key. (The HTTPS listener's side of `https_redirect` is in `tls_tests`.)

use super::{
    test_util::{BASE, err, load, with_route},
    *,
};

#[test]
fn trusted_proxies_are_addresses_or_blocks_and_trusting_everyone_warns() {
    let s = load(&with_route(BASE)).unwrap().settings;
    assert_eq!(
        s.trusted_proxies, None,
        "not set: every peer's list is appended to"
    );
    let with = |list: &str| {
        with_route(&BASE.replace(
            "listener_port = 8080",
            &format!("listener_port = 8080\n[router.forwarded]\ntrusted_proxies = {list}"),
        ))
    };
    let loaded = load(&with(
        r#"["10.1.2.3/8", "192.0.2.7", " 2001:db8::/32", "::ffff:198.51.100.1"]"#,
    ))
    .unwrap();
    let nets: Vec<String> = loaded
        .settings
        .trusted_proxies
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        nets,
        [
            "10.0.0.0/8",
            "192.0.2.7/32",
            "2001:db8::/32",
            "198.51.100.1/32"
        ]
    );
    let trust_warnings = |w: &[Located<Warning>]| -> Vec<String> {
        w.iter()
            .map(ToString::to_string)
            .filter(|w| w.contains("trusted proxy"))
            .collect()
    };
    assert_eq!(trust_warnings(&loaded.warnings), Vec::<String>::new());
    let none = load(&with("[]")).unwrap().settings.trusted_proxies.unwrap();
    assert!(none.is_empty(), "[]: no peer is trusted");
    let e = err(&with(r#"["10.0.0.0/8", "lb.internal"]"#));
    assert!(
        e.starts_with("gw.toml:4:34: key `router.forwarded.trusted_proxies[1]`: trusted proxy \"lb.internal\" is not an address or a CIDR block"),
        "{e}"
    );
    assert!(err(&with(r#"["10.0.0.0/33"]"#)).contains("not an address or a CIDR block"));
    // An IPv4-mapped block is the IPv4 block it maps, as peers are matched.
    let mapped = load(&with(r#"["::ffff:10.0.0.0/104"]"#)).unwrap().settings;
    assert_eq!(mapped.trusted_proxies.unwrap()[0].to_string(), "10.0.0.0/8");
    let w = trust_warnings(&load(&with(r#"["0.0.0.0/0"]"#)).unwrap().warnings);
    assert!(
        w.len() == 1
            && w[0].contains("router.forwarded.trusted_proxies[0]")
            && w[0].contains("covers every address"),
        "{w:?}"
    );
}

#[test]
fn https_redirect_is_the_routers_unless_a_route_says_and_names_a_port() {
    let two_routes = |router: &str| {
        format!(
            "{}[[routes]]\ncluster = \"api\"\n[[routes]]\npath_prefix = \"/.well-known/acme-challenge/\"\ncluster = \"api\"\nhttps_redirect = false\n[[routes]]\npath_prefix = \"/only/\"\ncluster = \"api\"\nhttps_redirect = true\n",
            BASE.replace(
                "listener_port = 8080",
                &format!("listener_port = 8080\n{router}")
            )
        )
    };
    let redirects = |router: &str| -> Vec<Option<u16>> {
        load(&two_routes(router))
            .unwrap()
            .settings
            .routes
            .iter()
            .map(|r| r.https_redirect)
            .collect()
    };
    // Off by default; a route may turn it on for itself.
    assert_eq!(redirects(""), [None, None, Some(443)]);
    assert_eq!(
        redirects("https_redirect = true"),
        [Some(443), None, Some(443)]
    );
    assert_eq!(
        redirects("https_redirect = true\nhttps_redirect_port = 8443"),
        [Some(8443), None, Some(8443)]
    );
    // With no [[routes]], the default route follows the router.
    let default = "[router]\nlistener_port = 8080\nhttps_redirect = true\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n";
    let s = load(default).unwrap().settings;
    assert_eq!(s.routes[0].https_redirect, Some(443));
    let e = err(&two_routes(
        "https_redirect = true\nhttps_redirect_port = 0",
    ));
    assert!(
        e.contains("key `router.https_redirect_port`: 0 is out of range"),
        "{e}"
    );
}

#[test]
fn allow_clients_are_addresses_or_blocks_and_never_empty() {
    let route = |list: &str| {
        format!(
            "{BASE}[[routes]]\npath_prefix = \"/admin/\"\ncluster = \"api\"\nallow_clients = {list}\n"
        )
    };
    let s = load(&route(r#"["10.0.0.0/8", "2001:db8::1"]"#))
        .unwrap()
        .settings;
    let nets: Vec<String> = s.routes[0]
        .allow_clients
        .as_ref()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "2001:db8::1/128"]);
    assert_eq!(
        load(&with_route(BASE)).unwrap().settings.routes[0].allow_clients,
        None
    );
    let e = err(&route(r#"["10.0.0.0/8", "office"]"#));
    assert!(
        e.contains("key `routes[0].allow_clients[1]`: allowed client \"office\" is not an address or a CIDR block"),
        "{e}"
    );
    let e = err(&route("[]"));
    assert!(
        e.contains("key `routes[0].allow_clients`: allow_clients is empty"),
        "{e}"
    );
}

#[test]
fn rate_limits_have_defaults_and_ranges() {
    let route = |table: &str| {
        format!("{BASE}[[routes]]\ncluster = \"api\"\n[routes.rate_limit]\n{table}\n")
    };
    let limit = |table: &str| {
        load(&route(table)).unwrap().settings.routes[0]
            .rate_limit
            .unwrap()
    };
    let l = limit("requests_per_second = 2.5");
    assert_eq!(
        (l.burst, l.by, l.max_clients),
        (3, RateLimitBy::Client, 100_000),
        "a second's worth, by client"
    );
    assert_eq!(limit("requests_per_second = 0.1").burst, 1);
    let l = limit("requests_per_second = 100\nburst = 500\nby = \"route\"\nmax_clients = 10");
    assert_eq!(
        (l.burst, l.by, l.max_clients),
        (500, RateLimitBy::Route, 10)
    );
    assert_eq!(
        load(&with_route(BASE)).unwrap().settings.routes[0].rate_limit,
        None
    );
    for (table, key) in [
        (
            "requests_per_second = 0",
            "rate_limit.requests_per_second`: 0 is out of range",
        ),
        (
            "requests_per_second = 0.00001",
            "rate_limit.requests_per_second`: 0.00001 is out of range: from one request a day",
        ),
        (
            "requests_per_second = -1",
            "rate_limit.requests_per_second`: -1 is out of range",
        ),
        (
            "requests_per_second = 1\nburst = 0",
            "rate_limit.burst`: 0 is out of range",
        ),
        (
            "requests_per_second = 1\nmax_clients = 0",
            "rate_limit.max_clients`: 0 is out of range",
        ),
    ] {
        let e = err(&route(table));
        assert!(e.contains(key), "{table}: {e}");
    }
    let e = err(&route("requests_per_second = 1\nby = \"ip\""));
    assert!(
        e.contains("unknown variant `ip`, expected `client` or `route`"),
        "{e}"
    );
}

#[test]
fn proxy_protocol_is_off_by_default_and_expects_a_header_from_the_peers_listed() {
    let with = |table: &str| {
        with_route(&BASE.replace(
            "listener_port = 8080",
            &format!("listener_port = 8080\n[router.proxy_protocol]\n{table}"),
        ))
    };
    assert_eq!(
        load(&with_route(BASE)).unwrap().settings.proxy_protocol,
        None
    );
    let on = load(&with("enabled = true")).unwrap();
    let anyone = |w: &[Located<Warning>]| {
        w.iter().map(ToString::to_string).any(|w| {
            w.contains("router.proxy_protocol.from") && w.contains("can name another client")
        })
    };
    assert!(
        anyone(&on.warnings),
        "no `from`: every peer may name a client"
    );
    let everyone = load(&with("enabled = true\nfrom = [\"0.0.0.0/0\"]")).unwrap();
    assert!(anyone(&everyone.warnings));
    let on = on.settings.proxy_protocol.unwrap();
    assert_eq!(on.from, None, "default: every peer");
    assert!(on.required);
    assert_eq!(on.timeout, std::time::Duration::from_secs(5));
    assert!(on.expected_from("203.0.113.9".parse().unwrap()));

    let listed = load(&with(
        "enabled = true\nfrom = [\"10.0.0.0/8\", \"::ffff:192.0.2.7\"]\nrequired = false\ntimeout_ms = 250",
    ))
    .unwrap();
    assert!(!anyone(&listed.warnings), "{:?}", listed.warnings);
    let listed = listed.settings.proxy_protocol.unwrap();
    assert!(!listed.required);
    assert_eq!(listed.timeout, std::time::Duration::from_millis(250));
    for (peer, expected) in [
        ("10.9.8.7", true),
        ("192.0.2.7", true),
        ("::ffff:10.1.1.1", true),
        ("192.0.2.8", false),
        ("2001:db8::1", false),
    ] {
        assert_eq!(
            listed.expected_from(peer.parse().unwrap()),
            expected,
            "{peer}"
        );
    }

    let e = err(&with("enabled = true\nfrom = [\"10.0.0.0/8\", \"lb-1\"]"));
    assert!(
        e.starts_with("gw.toml:5:23: key `router.proxy_protocol.from[1]`: load balancer \"lb-1\" is not an address or a CIDR block"),
        "{e}"
    );
    let e = err(&with("enabled = true\nfrom = []"));
    assert!(
        e.contains("`router.proxy_protocol.from`: from is empty"),
        "{e}"
    );
    let e = err(&with("enabled = true\ntimeout_ms = 0"));
    assert!(
        e.contains("`router.proxy_protocol.timeout_ms`: 0 is out of range"),
        "{e}"
    );
    assert!(err(&with("enabled = true\nversion = 2")).contains("unknown field `version`"));

    let off = load(&with("from = [\"10.0.0.0/8\"]")).unwrap();
    assert_eq!(off.settings.proxy_protocol, None);
    let w: Vec<String> = off.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.iter().any(|w| w.contains("router.proxy_protocol.from")
            && w.contains("not enabled (enabled = true), so this does nothing")),
        "{w:?}"
    );
}
