use super::*;

#[test]
fn keep_alive_timeout_is_read_from_the_upstreams_header() {
    let mut h = HeaderMap::new();
    assert_eq!(keep_alive_timeout(&h), None);
    h.insert("keep-alive", HeaderValue::from_static("timeout=5, max=100"));
    assert_eq!(
        keep_alive_timeout(&h),
        Some(std::time::Duration::from_secs(5))
    );
    h.insert(
        "keep-alive",
        HeaderValue::from_static("max=100, Timeout = 2"),
    );
    assert_eq!(
        keep_alive_timeout(&h),
        Some(std::time::Duration::from_secs(2))
    );
    for junk in ["timeout=", "timeout=x", "timeout=0", "max=3"] {
        h.insert("keep-alive", HeaderValue::from_static(junk));
        assert_eq!(keep_alive_timeout(&h), None, "{junk}");
    }
}

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

#[test]
fn hop_by_hop_and_connection_listed_headers_are_removed() {
    let mut h = map(&[
        ("connection", "keep-alive, x-secret"),
        ("keep-alive", "timeout=5"),
        ("x-secret", "1"),
        ("transfer-encoding", "chunked"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("x-keep", "yes"),
    ]);
    let stripped = strip_hop_by_hop(&mut h);
    let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(names, vec!["x-keep"]);
    assert_eq!(
        stripped,
        Stripped {
            upgrade: None,
            te_trailers: true,
            keep_alive: Some(HeaderValue::from_static("timeout=5")),
            listed: true,
            other_coding: false,
        },
        "an Upgrade that Connection does not name is no upgrade"
    );
}

#[test]
fn only_a_listed_upgrade_is_tunnelled_whole_and_without_case() {
    let ws = ["websocket".to_owned()];
    let v = HeaderValue::from_static;
    assert!(tunnels(&v("websocket"), &ws));
    assert!(tunnels(&v("WebSocket"), &ws));
    assert!(tunnels(&v(" websocket "), &ws));
    assert!(!tunnels(&v("h2c"), &ws));
    assert!(
        !tunnels(&v("websocket, h2c"), &ws),
        "a list is not one protocol"
    );
    assert!(!tunnels(&v("websocket"), &[]));
}

#[test]
fn a_transfer_encoded_message_loses_its_content_length() {
    let mut h = map(&[
        ("content-length", "100"),
        ("transfer-encoding", "chunked"),
        ("x-keep", "yes"),
    ]);
    let _ = to_downstream(&mut h, Version::HTTP_11);
    let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(names, vec!["x-keep", "via"]);
    let mut h = map(&[("content-length", "100")]);
    let _ = to_downstream(&mut h, Version::HTTP_11);
    assert_eq!(h["content-length"], "100", "a length alone is the framing");
}

#[test]
fn an_upgrade_and_te_trailers_are_handed_back() {
    let mut h = map(&[
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-key", "k"),
        ("te", "gzip, trailers;q=1"),
    ]);
    let up = to_upstream(
        &mut h,
        Version::HTTP_11,
        &client_value("10.0.0.9".parse().unwrap()),
        None,
        (Scheme::Http, None),
    );
    assert_eq!(up.upgrade, Some(HeaderValue::from_static("websocket")));
    assert!(h.get("connection").is_none() && h.get("upgrade").is_none());
    assert_eq!(h["te"], "trailers");
    assert_eq!(h["sec-websocket-key"], "k");
    let mut h = map(&[("te", "gzip")]);
    strip_hop_by_hop(&mut h);
    assert!(h.get("te").is_none());
    for (coding, other) in [
        ("chunked", false),
        ("gzip, chunked", true),
        ("Chunked", false),
    ] {
        let mut h = map(&[("transfer-encoding", coding)]);
        assert_eq!(strip_hop_by_hop(&mut h).other_coding, other, "{coding}");
    }
    // `Connection: TE`, as RFC 9110 asks a client that sends `TE` to say.
    let mut h = map(&[("connection", "TE"), ("te", "trailers")]);
    assert!(strip_hop_by_hop(&mut h).te_trailers);
}

#[test]
fn an_upstreams_gateway_headers_are_removed() {
    let mut h = map(&[
        ("x-gateway-error", "upstream_host_died"),
        ("x-gateway-evidence", "syns=9"),
        ("x-gateways", "kept"),
        ("x-keep", "yes"),
    ]);
    to_downstream(&mut h, Version::HTTP_11);
    let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, vec!["via", "x-gateways", "x-keep"]);
}

#[test]
fn forwarded_headers_are_appended() {
    let mut h = map(&[
        ("x-forwarded-for", "1.1.1.1"),
        ("x-forwarded-for", "2.2.2.2"),
        ("via", "1.0 edge"),
        ("x-forwarded-proto", "https"),
    ]);
    let mut kept = h.clone();
    to_upstream(
        &mut h,
        Version::HTTP_11,
        &client_value("10.0.0.9".parse().unwrap()),
        None,
        (Scheme::Http, None),
    );
    assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
    assert_eq!(h["x-forwarded-proto"], "http");
    let via: Vec<_> = h.get_all(VIA).iter().collect();
    assert_eq!(via, vec!["1.0 edge", "1.1 gateway"]);
    // A trusted proxy's scheme is kept (the TLS it terminated).
    to_upstream(
        &mut kept,
        Version::HTTP_11,
        &client_value("10.0.0.9".parse().unwrap()),
        None,
        (Scheme::Http, Some(HeaderValue::from_static("https"))),
    );
    assert_eq!(kept["x-forwarded-proto"], "https");
}

#[test]
fn cookie_fields_are_joined_into_one_line() {
    let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
    join_cookies(&mut h);
    let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
    assert_eq!(all, ["a=1; b=2; c=3"]);
    let mut one = map(&[("cookie", "a=1; b=2")]);
    join_cookies(&mut one);
    assert_eq!(one[header::COOKIE], "a=1; b=2");
}

#[test]
fn http2_authority_becomes_host() {
    let mut h = HeaderMap::new();
    let authority = HeaderValue::from_static("api.example.com");
    to_upstream(
        &mut h,
        Version::HTTP_2,
        &client_value("::ffff:127.0.0.1".parse().unwrap()),
        Some(&authority),
        (Scheme::Https, None),
    );
    assert_eq!(h[HOST], "api.example.com");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h[VIA], "2 gateway");
}
