//! Unit tests for what issue 10 added to the config: routes' conditions, rewrites, header
//! rules and policy overrides, cluster `protocol` and its HTTP/2 knobs, gRPC retry statuses,
//! request IDs and `expose_upstream_errors` — each accepted with its default, and each bad
//! value refused with file, line and key.

use std::time::Duration;

use http::Method;

use super::{
    test_util::{BASE, err, load, with_route},
    *,
};

#[test]
fn a_route_inherits_its_clusters_policy_and_overrides_what_it_says() {
    let text = format!(
        r#"{BASE}
[[routes]]
path_prefix = "/plain"
cluster = "api"

[[routes]]
path_prefix = "/api/"
cluster = "api"
methods = ["GET", "POST"]
headers = [{{ name = "x-canary", value = "1" }}, {{ name = "x-debug", present = false }}]
rewrite_prefix = "/v2/"
[routes.timeouts]
response_timeout_ms = 250
upgrade_idle_timeout_ms = 1000
[routes.retry]
max_retries = 0
on_response_timeout = false
hedge = false
grpc_status_codes = ["UNAVAILABLE", "resource_exhausted"]
status_codes = [503, 502]
[routes.request_headers]
set = {{ "x-env" = "prod" }}
add = {{ "x-tag" = "a" }}
remove = ["x-internal"]
[routes.response_headers]
remove = ["server"]
"#
    );
    let s = load(&text).unwrap().settings;
    let plain = &s.routes[0];
    assert_eq!(plain.policy.response_timeout, Duration::from_millis(900));
    assert_eq!(plain.policy.request_timeout, Duration::from_millis(5000));
    assert_eq!(plain.policy.retry.max_retries, 3);
    assert!(plain.policy.retry.on_response_timeout && plain.policy.retry.on_reset);
    assert!(plain.policy.retry.hedge);
    assert_eq!(
        plain.policy.upgrade_idle_timeout,
        Duration::from_millis(model::DEFAULT_UPGRADE_IDLE_TIMEOUT_MS)
    );
    assert!(plain.policy.retry.status_codes.is_empty());
    assert!(plain.methods.is_none() && plain.headers.is_empty());
    let r = &s.routes[1];
    assert_eq!(r.methods.as_deref(), Some(&[Method::GET, Method::POST][..]));
    assert_eq!(r.headers.len(), 2);
    assert_eq!(r.headers[1].is, HeaderIs::Absent);
    assert_eq!(r.rewrite_prefix.as_deref(), Some("/v2/"));
    assert_eq!(r.policy.response_timeout, Duration::from_millis(250));
    assert_eq!(r.policy.request_timeout, Duration::from_millis(5000));
    assert_eq!(r.policy.upgrade_idle_timeout, Duration::from_millis(1000));
    assert_eq!(r.policy.retry.max_retries, 0);
    assert!(!r.policy.retry.on_response_timeout && !r.policy.retry.on_reset);
    assert!(!r.policy.retry.hedge);
    let codes = r.policy.retry.grpc_status_codes;
    assert!(codes.contains(crate::decide::grpc::GrpcCode::UNAVAILABLE));
    assert!(codes.contains(crate::decide::grpc::GrpcCode::RESOURCE_EXHAUSTED));
    let statuses = r.policy.retry.status_codes;
    assert!(statuses.contains(503) && statuses.contains(502) && !statuses.contains(504));
    assert_eq!(r.request_headers.set[0].0, "x-env");
    assert_eq!(r.request_headers.add[0].1, "a");
    assert_eq!(r.request_headers.remove[0], "x-internal");
    assert_eq!(r.response_headers.remove[0], "server");
    // The cluster's own policy is untouched by the route's overrides.
    assert_eq!(s.clusters["api"].retry.max_retries, 3);
}

#[test]
fn every_new_route_key_is_refused_with_file_line_and_key() {
    let route = |body: &str| format!("{BASE}\n[[routes]]\ncluster = \"api\"\n{body}\n");
    // BASE has 11 lines, then a blank line, `[[routes]]` (13), `cluster` (14), the body (15).
    for (body, want) in [
        (
            "methods = [\"GET\", \"BAD METHOD\"]",
            "gw.toml:15:19: key `routes[0].methods[1]`: \"BAD METHOD\" is not an HTTP method",
        ),
        (
            "methods = []",
            "gw.toml:15:1: key `routes[0].methods`: `methods` is empty",
        ),
        (
            "methods = [\"PURGE\", \"get\"]",
            "gw.toml:15:21: key `routes[0].methods[1]`: \"get\" would never match GET",
        ),
        (
            "headers = [{ name = \"bad name\", value = \"1\" }]",
            "gw.toml:15:14: key `routes[0].headers[0].name`: \"bad name\" is not a valid header name",
        ),
        (
            "headers = [{ name = \"x-a\", value = \"1\", present = true }]",
            "gw.toml:15:12: key `routes[0].headers[0]`: a header condition needs exactly one of",
        ),
        (
            "rewrite_prefix = \"v2\"",
            "gw.toml:15:1: key `routes[0].rewrite_prefix`: \"v2\" must start with '/'",
        ),
        (
            "rewrite_prefix = \"/v2?x=1\"",
            "gw.toml:15:1: key `routes[0].rewrite_prefix`: rewrite_prefix \"/v2?x=1\" must be a path",
        ),
        (
            "timeouts = { response_timeout_ms = 0 }",
            "gw.toml:15:14: key `routes[0].timeouts.response_timeout_ms`: 0 is out of range",
        ),
        (
            "retry = { max_retries = 11 }",
            "gw.toml:15:11: key `routes[0].retry.max_retries`: 11 is out of range",
        ),
        (
            "retry = { grpc_status_codes = [\"UNAVAILABLE\", \"NOPE\"] }",
            "gw.toml:15:47: key `routes[0].retry.grpc_status_codes[1]`: unknown gRPC status \"NOPE\"",
        ),
        (
            "retry = { status_codes = [503, 302] }",
            "gw.toml:15:32: key `routes[0].retry.status_codes[1]`: 302 is out of range",
        ),
        (
            "request_headers = { set = { connection = \"close\" } }",
            "gw.toml:15:29: key `routes[0].request_headers.set.connection`: header `connection` cannot be rewritten",
        ),
        (
            "response_headers = { add = { \"x-gateway-error\" = \"x\" } }",
            "gw.toml:15:30: key `routes[0].response_headers.add.x-gateway-error`: header `x-gateway-error` cannot be rewritten",
        ),
        (
            "request_headers = { add = { \"x-a\" = \"bad\\nvalue\" } }",
            "gw.toml:15:29: key `routes[0].request_headers.add.x-a`: \"bad\\nvalue\" is not a valid header value",
        ),
    ] {
        let e = err(&route(body));
        // Line 15, at the column of the value or key refused.
        let (at, what) = want.split_at(want.find(": key").unwrap());
        assert!(
            e.starts_with(at) && e.contains(what),
            "{body}\ngot:  {e}\nwant: {want}"
        );
    }
    // A connection-level timeout is the cluster's, not a route's: serde names the keys.
    let e = err(&route("timeouts = { connect_timeout_ms = 5 }"));
    assert!(
        e.contains("key `routes[0].timeouts.connect_timeout_ms`: unknown field `connect_timeout_ms`, expected one of `request_timeout_ms`"),
        "{e}"
    );
}

#[test]
fn protocol_and_http2_knobs_have_defaults_and_are_checked() {
    let s = load(&with_route(BASE)).unwrap().settings;
    let api = &s.clusters["api"];
    assert_eq!(api.protocol, UpstreamProtocol::Http1);
    assert_eq!(
        api.limits.max_concurrent_streams,
        model::DEFAULT_MAX_CONCURRENT_STREAMS as usize
    );
    let h2c = BASE.replace(
        "endpoints = [\"127.0.0.1:9000\"]",
        "endpoints = [\"127.0.0.1:9000\"]\nprotocol = \"h2c\"\n[clusters.api.limits]\nmax_concurrent_streams = 8",
    );
    let h2c = with_route(&h2c);
    let api = &load(&h2c).unwrap().settings.clusters["api"];
    assert_eq!(api.protocol, UpstreamProtocol::H2c);
    assert_eq!(api.limits.max_concurrent_streams, 8);
    // "h2" needs TLS; "auto" without TLS is HTTP/1.1; [router.upstream] is every cluster's
    // default.
    let h2 = with_route(&BASE.replace(
        "[clusters.api]",
        "[router.upstream]\nprotocol = \"h2\"\n[clusters.api]",
    ));
    let e = err(&h2);
    assert!(
        e.starts_with("gw.toml:5:1: key `router.upstream.protocol`: cluster `api`: protocol = \"h2\" is HTTP/2 over TLS"),
        "{e}"
    );
    let auto = h2.replace("\"h2\"", "\"auto\"");
    assert_eq!(
        load(&auto).unwrap().settings.clusters["api"].protocol,
        UpstreamProtocol::Http1
    );
    let e = err(&with_route(&BASE.replace(
        "endpoints = [\"127.0.0.1:9000\"]",
        "endpoints = [\"127.0.0.1:9000\"]\nprotocol = \"http3\"",
    )));
    assert!(
        e.starts_with("gw.toml:6:12: key `clusters.api.protocol`: unknown variant `http3`"),
        "{e}"
    );
    let e = err(&h2c.replace("max_concurrent_streams = 8", "max_concurrent_streams = 0"));
    assert!(
        e.contains("key `clusters.api.limits.max_concurrent_streams`: 0 is out of range"),
        "{e}"
    );
}

#[test]
fn request_ids_and_error_exposure_have_defaults_and_are_checked() {
    let s = load(&with_route(BASE)).unwrap().settings;
    let id = s.request_id.expect("on by default");
    assert_eq!(id.header, "x-request-id");
    assert!(id.keep_incoming);
    assert_eq!(s.expose_errors, None, "by listener");
    let text = with_route(&BASE.replace(
        "listener_port = 8080",
        "listener_port = 8080\nexpose_upstream_errors = \"none\"\n[router.request_id]\nheader = \"x-trace\"\nkeep_incoming = false",
    ));
    let s = load(&text).unwrap().settings;
    assert_eq!(s.expose_errors, Some(ExposeErrors::None));
    let id = s.request_id.unwrap();
    assert_eq!((id.header.as_str(), id.keep_incoming), ("x-trace", false));
    let off = with_route(&BASE.replace(
        "listener_port = 8080",
        "listener_port = 8080\n[router.request_id]\nenabled = false",
    ));
    assert!(load(&off).unwrap().settings.request_id.is_none());
    let e = err(&text.replace("\"x-trace\"", "\"x trace\""));
    assert!(
        e.starts_with(
            "gw.toml:5:1: key `router.request_id.header`: \"x trace\" is not a valid header name"
        ),
        "{e}"
    );
    let e = err(&text.replace("\"none\"", "\"some\""));
    assert!(
        e.starts_with("gw.toml:3:26: key `router.expose_upstream_errors`: unknown variant `some`, expected one of `full`, `reason`, `none`"),
        "{e}"
    );
}

#[test]
fn upgrade_limits_and_on_reset_are_cluster_settings() {
    let text = with_route(&BASE.replace(
        "request_timeout_ms = 5000",
        "request_timeout_ms = 5000\nupgrade_idle_timeout_ms = 30000\nupgrade_max_duration_ms = 600000",
    ));
    let text = text.replace(
        "on_response_timeout = true",
        "on_response_timeout = true\non_reset = false",
    );
    let api = &load(&text).unwrap().settings.clusters["api"];
    assert_eq!(api.timeouts.upgrade_idle, Duration::from_secs(30));
    assert_eq!(api.timeouts.upgrade_max_duration, Duration::from_secs(600));
    assert!(api.retry.on_response_timeout && !api.retry.on_reset);
    let e = err(&text.replace("= 30000", "= 0"));
    assert!(
        e.contains("key `clusters.api.timeouts.upgrade_idle_timeout_ms`: 0 is out of range"),
        "{e}"
    );
}

#[test]
fn route_names_are_unique_and_generated_ones_are_numbered() {
    let text = format!(
        "{BASE}[[routes]]\nname = \"api\"\ncluster = \"api\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/b\"\ncluster = \"api\"\n"
    );
    let e = err(&text);
    assert!(
        e.contains("key `routes[1].name`: route name `api` is taken by routes[0]"),
        "{e}"
    );
    // Two routes told apart by their methods alone: their generated names differ.
    let text = format!(
        "{BASE}[[routes]]\npath_prefix = \"/x\"\nmethods = [\"GET\"]\ncluster = \"api\"\n\
         [[routes]]\npath_prefix = \"/x\"\ncluster = \"api\"\n"
    );
    let loaded = load(&text).unwrap();
    let names: Vec<&str> = loaded
        .settings
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["*/x", "*/x#2"]);
}

#[test]
fn request_buffering_is_on_by_default_and_a_cluster_or_a_route_turns_it_off() {
    let text = r#"[router]
listener_port = 8080

[router.upstream]
request_buffering = false

[clusters.api]
endpoints = ["127.0.0.1:9000"]

[clusters.uploads]
endpoints = ["127.0.0.1:9001"]
request_buffering = true

[[routes]]
path_prefix = "/a"
cluster = "api"

[[routes]]
path_prefix = "/u"
cluster = "uploads"

[[routes]]
path_prefix = "/s"
cluster = "uploads"
request_buffering = false
"#;
    let routes = load(text).unwrap().settings.routes;
    let on: Vec<bool> = routes.iter().map(|r| r.policy.request_buffering).collect();
    assert_eq!(on, [false, true, false]);
    let routes = load(&with_route(BASE)).unwrap().settings.routes;
    assert!(routes[0].policy.request_buffering);
    assert!(
        err(&format!(
            "{BASE}[[routes]]\ncluster = \"api\"\nrequest_buffering = 1\n"
        ))
        .contains("request_buffering")
    );
}

#[test]
fn a_route_may_set_its_own_request_body_limit() {
    let text = format!(
        "{BASE}[router.downstream]\nmax_request_body_bytes = 1000\n\
         [[routes]]\npath_prefix = \"/u\"\ncluster = \"api\"\nmax_request_body_bytes = 100000000\n\
         [[routes]]\ncluster = \"api\"\n"
    );
    let s = load(&text).unwrap().settings;
    assert_eq!(s.downstream.max_request_body_bytes, Some(1000));
    let own: Vec<Option<u64>> = s
        .routes
        .iter()
        .map(|r| r.policy.max_request_body_bytes)
        .collect();
    assert_eq!(own, [Some(100_000_000), None]);
    let bad = err(&format!(
        "{BASE}[[routes]]\ncluster = \"api\"\nmax_request_body_bytes = -1\n"
    ));
    assert!(bad.contains("max_request_body_bytes"), "{bad}");
}

#[test]
fn a_route_may_list_its_own_upgrades() {
    let text = format!(
        "{BASE}[clusters.grpc]\nendpoints = [\"127.0.0.1:9002\"]\nprotocol = \"h2c\"\n\
         [[routes]]\npath_prefix = \"/api/\"\ncluster = \"api\"\nupgrades = []\n\
         [[routes]]\npath_prefix = \"/exec/\"\ncluster = \"api\"\nupgrades = [\"SPDY/3.1\"]\n\
         [[routes]]\npath_prefix = \"/g/\"\ncluster = \"grpc\"\nupgrades = [\"websocket\"]\n\
         [[routes]]\ncluster = \"api\"\n"
    );
    let loaded = load(&text).unwrap();
    let lists: Vec<Vec<String>> = loaded
        .settings
        .routes
        .iter()
        .map(|r| r.upgrades.clone())
        .collect();
    assert_eq!(
        lists,
        [
            vec![],
            vec!["spdy/3.1".to_owned()],
            vec!["websocket".to_owned()],
            vec!["websocket".to_owned()]
        ]
    );
    // A list for an HTTP/2 cluster: the warning names the route's key.
    let w: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.iter()
            .any(|w| w.contains("routes[2].upgrades") && w.contains("501")),
        "{w:?}"
    );
    let e = err(&format!(
        "{BASE}[[routes]]\ncluster = \"api\"\nupgrades = [\"h2c\"]\n"
    ));
    assert!(
        e.contains("routes[0].upgrades") && e.contains("h2c smuggling"),
        "{e}"
    );
}

#[test]
fn upgrades_a_cluster_lists_for_http2_are_a_warning() {
    // (the cluster's protocol, its own upgrades, [router.upstream]'s) -> warned.
    let warned = |protocol: &str, own: &str, base: &str| {
        let text = with_route(
            &BASE
                .replace(
                    "listener_port = 8080\n",
                    &format!("listener_port = 8080\n\n[router.upstream]\n{base}\n"),
                )
                .replace(
                    "[clusters.api.timeouts]",
                    &format!("protocol = \"{protocol}\"\n{own}\n[clusters.api.timeouts]"),
                ),
        );
        let w: Vec<String> = load(&text)
            .unwrap()
            .warnings
            .iter()
            .map(ToString::to_string)
            .filter(|w| w.contains("upgrades"))
            .collect();
        assert!(w.len() <= 1, "{w:?}");
        w.first().cloned()
    };
    let w = warned("h2c", r#"upgrades = ["websocket"]"#, "").expect("warned");
    assert!(
        w.contains("clusters.api.upgrades")
            && w.contains("protocol = \"h2c\"")
            && w.contains("501"),
        "{w}"
    );
    assert_eq!(warned("h2c", "upgrades = []", ""), None);
    assert_eq!(warned("http1", r#"upgrades = ["websocket"]"#, ""), None);
    // The default, or a list for every cluster, is no warning on an HTTP/2 one.
    assert_eq!(warned("h2c", "", ""), None);
    assert_eq!(warned("h2c", "", r#"upgrades = ["websocket"]"#), None);
}

#[test]
fn upgrades_are_websocket_by_default_a_cluster_lists_its_own_and_h2c_is_refused() {
    let api = |text: &str| {
        load(text).unwrap().settings.clusters["api"]
            .upgrades
            .clone()
    };
    assert_eq!(api(&with_route(BASE)), ["websocket"]);
    let with = |list: &str| {
        with_route(&BASE.replace(
            "[clusters.api.timeouts]",
            &format!("upgrades = {list}\n[clusters.api.timeouts]"),
        ))
    };
    assert_eq!(
        api(&with(r#"["websocket", "SPDY/3.1"]"#)),
        ["websocket", "spdy/3.1"]
    );
    assert!(api(&with("[]")).is_empty());
    let inherited = with_route(&BASE.replace(
        "listener_port = 8080\n",
        "listener_port = 8080\n\n[router.upstream]\nupgrades = [\"tcp\"]\n",
    ));
    assert_eq!(api(&inherited), ["tcp"]);
    let e = err(&with(r#"["websocket", "H2C"]"#));
    assert!(
        e.contains("key `clusters.api.upgrades`") && e.contains("h2c smuggling"),
        "{e}"
    );
    for bad in [r#"["web socket"]"#, r#"["spdy/"]"#, r#"[""]"#] {
        let e = err(&with(bad));
        assert!(
            e.contains("key `clusters.api.upgrades`") && e.contains("not a protocol name"),
            "{bad}: {e}"
        );
    }
}
