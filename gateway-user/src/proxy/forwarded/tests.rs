use super::*;

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn headers(lines: &[(&str, &[u8])]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in lines {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    h
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const SPOOFED: &[(&str, &[u8])] = &[
    ("x-forwarded-for", b"203.0.113.9"),
    ("x-forwarded-proto", b"https"),
    ("x-forwarded-host", b"admin.example.com"),
    ("x-forwarded-port", b"443"),
    ("x-forwarded-ssl", b"on"),
    ("x-real-ip", b"203.0.113.9"),
    ("true-client-ip", b"203.0.113.9"),
    ("forwarded", b"for=203.0.113.9;proto=https"),
    ("client-ip", b"203.0.113.9"),
    (
        "x-forwarded-client-cert",
        b"By=spiffe://a;URI=spiffe://admin",
    ),
    ("x-ssl-client-s-dn", b"CN=admin"),
    ("x_ssl_client_verify", b"SUCCESS"),
    // Read as X-Forwarded-For by CGI-style servers.
    ("x_forwarded_for", b"10.0.0.1"),
    ("x-real_ip", b"10.0.0.1"),
    ("x-end-to-end", b"kept"),
    ("x_end_to_end", b"kept"),
];

/// The names left of [`SPOOFED`] in `h`, but the `_` spelling of `X-Forwarded-For`.
fn all_but_the_written_spelt_with_underscore(h: &HeaderMap) {
    let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    let mut want: Vec<&str> = SPOOFED
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| *k != "x_forwarded_for")
        .collect();
    left.sort_unstable();
    want.sort_unstable();
    assert_eq!(left, want);
}

/// Nothing is removed but the `_` spelling of a header the gateway writes itself, which a
/// CGI-style server would read beside the gateway's own.
#[test]
fn without_trusted_proxies_nothing_is_removed_but_an_underscored_x_forwarded_for() {
    let mut h = headers(SPOOFED);
    let got = admit(None, ip("198.51.100.1"), &mut h);
    assert_eq!(got, (Peer::Unlisted, Source::Peer(ip("198.51.100.1"))));
    all_but_the_written_spelt_with_underscore(&h);
    assert_eq!(proto(Peer::Unlisted, &h), None);
}

#[test]
fn an_untrusted_peer_loses_every_forwarding_header_and_nothing_else() {
    let trusted = nets(&["10.0.0.0/8"]);
    for list in [&trusted[..], &[]] {
        let mut h = headers(SPOOFED);
        let got = admit(Some(list), ip("::ffff:198.51.100.1"), &mut h);
        assert_eq!(got, (Peer::Untrusted, Source::Peer(ip("198.51.100.1"))));
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-end-to-end", "x_end_to_end"]);
    }
}

#[test]
fn a_trusted_peer_keeps_them_and_names_the_client() {
    let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
    let mut h = headers(SPOOFED);
    let got = admit(Some(&trusted), ip("10.1.2.3"), &mut h);
    assert_eq!(got, (Peer::Trusted, Source::Named(ip("203.0.113.9"))));
    all_but_the_written_spelt_with_underscore(&h);
    assert_eq!(proto(Peer::Trusted, &h).unwrap(), "https");
    // An IPv4 client on a dual-stack listener is seen as IPv4-mapped IPv6.
    assert_eq!(
        admit(Some(&trusted), ip("::ffff:10.9.9.9"), &mut h).0,
        Peer::Trusted
    );
    // A trusted proxy's own request (no list) is from the proxy; a list that names no
    // client is from no one known.
    let mut none = HeaderMap::new();
    let got = admit(Some(&trusted), ip("10.1.2.3"), &mut none);
    assert_eq!(got.1, Source::Peer(ip("10.1.2.3")));
    let mut bad = headers(&[("x-forwarded-for", b"unknown")]);
    assert_eq!(
        admit(Some(&trusted), ip("10.1.2.3"), &mut bad).1,
        Source::Unknown
    );
}

#[test]
fn the_client_is_the_last_address_no_trusted_proxy_has() {
    let trusted = nets(&["10.0.0.0/8", "192.0.2.7/32"]);
    let client = |lines: &[(&str, &[u8])]| client_named(&trusted, &headers(lines));
    let xff = |v: &'static [u8]| [("x-forwarded-for", v)];
    // The spoofed first entry is not believed: the first proxy appended the real client.
    assert_eq!(
        client(&xff(b"1.1.1.1, 203.0.113.9, 10.0.0.5")),
        Some(ip("203.0.113.9"))
    );
    // Over several lines, with ports and brackets as some proxies write them.
    assert_eq!(
        client(&[
            ("x-forwarded-for", b"[2001:db8::9]:5000"),
            ("x-forwarded-for", b"192.0.2.7:4000, 10.0.0.5")
        ]),
        Some(ip("2001:db8::9"))
    );
    // A client's own entry that is not text, on the line its proxy appended to (nginx's
    // $proxy_add_x_forwarded_for), is never reached.
    assert_eq!(
        client(&xff(b"\x80\xff, 203.0.113.9, 10.0.0.5")),
        Some(ip("203.0.113.9"))
    );
    // Every entry a trusted proxy: the first.
    assert_eq!(client(&xff(b"10.0.0.1, 10.0.0.2")), Some(ip("10.0.0.1")));
    // An entry that is no address where the client should be stops the walk.
    assert_eq!(client(&xff(b"203.0.113.9, unknown, 10.0.0.5")), None);
    assert_eq!(client(&[]), None);
}

#[test]
fn the_scheme_is_the_last_entry_a_trusted_proxy_wrote() {
    for (lines, want) in [
        (&[("x-forwarded-proto", &b"https"[..])][..], Some("https")),
        (&[("x-forwarded-proto", b"HTTP")], Some("http")),
        (&[("x-forwarded-proto", b"ftp")], None),
        (&[("x-forwarded-proto", b"")], None),
        // A client's forged `https` before what its proxy appended.
        (&[("x-forwarded-proto", b"https, http")], Some("http")),
        (
            &[
                ("x-forwarded-proto", b"https"),
                ("x-forwarded-proto", b"http"),
            ],
            Some("http"),
        ),
    ] {
        let h = headers(lines);
        let got = proto(Peer::Trusted, &h);
        assert_eq!(got.as_ref().map(|v| v.to_str().unwrap()), want, "{lines:?}");
        assert_eq!(proto(Peer::Untrusted, &h), None);
    }
}
