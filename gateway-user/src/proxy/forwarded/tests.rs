use super::*;

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn headers(lines: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in lines {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

const SPOOFED: &[(&str, &str)] = &[
    ("x-forwarded-for", "203.0.113.9"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "admin.example.com"),
    ("x-forwarded-port", "443"),
    ("x-real-ip", "203.0.113.9"),
    ("forwarded", "for=203.0.113.9;proto=https"),
    ("x-end-to-end", "kept"),
];

#[test]
fn without_trusted_proxies_nothing_is_removed() {
    let mut h = headers(SPOOFED);
    let got = admit(None, "198.51.100.1".parse().unwrap(), &mut h);
    assert_eq!(got, (Peer::Unlisted, None));
    assert_eq!(h.len(), SPOOFED.len());
    assert!(!keeps_proto(Peer::Unlisted, &h));
}

#[test]
fn an_untrusted_peer_loses_every_forwarding_header_and_nothing_else() {
    let trusted = nets(&["10.0.0.0/8"]);
    for list in [&trusted[..], &[]] {
        let mut h = headers(SPOOFED);
        let got = admit(Some(list), "198.51.100.1".parse().unwrap(), &mut h);
        assert_eq!(got, (Peer::Untrusted, None));
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }
}

#[test]
fn a_trusted_peer_keeps_them_and_names_the_client() {
    let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
    let mut h = headers(SPOOFED);
    let got = admit(Some(&trusted), "10.1.2.3".parse().unwrap(), &mut h);
    assert_eq!(got, (Peer::Trusted, Some("203.0.113.9".parse().unwrap())));
    assert_eq!(h.len(), SPOOFED.len());
    assert!(keeps_proto(Peer::Trusted, &h));
    // An IPv4 client on a dual-stack listener is seen as IPv4-mapped IPv6.
    let mapped = "::ffff:10.9.9.9".parse().unwrap();
    assert_eq!(admit(Some(&trusted), mapped, &mut h).0, Peer::Trusted);
}

#[test]
fn the_client_is_the_last_address_no_trusted_proxy_has() {
    let trusted = nets(&["10.0.0.0/8", "192.0.2.7/32"]);
    let client = |lines: &[(&str, &str)]| client_named(&trusted, &headers(lines));
    let xff = |v| [("x-forwarded-for", v)];
    // The spoofed first entry is not believed: the first proxy appended the real client.
    assert_eq!(
        client(&xff("1.1.1.1, 203.0.113.9, 10.0.0.5")),
        Some("203.0.113.9".parse().unwrap())
    );
    // Over several lines, with ports and brackets as some proxies write them.
    assert_eq!(
        client(&[
            ("x-forwarded-for", "[2001:db8::9]:5000"),
            ("x-forwarded-for", "192.0.2.7:4000, 10.0.0.5")
        ]),
        Some("2001:db8::9".parse().unwrap())
    );
    // Every entry a trusted proxy: the first.
    assert_eq!(
        client(&xff("10.0.0.1, 10.0.0.2")),
        Some("10.0.0.1".parse().unwrap())
    );
    // An entry that is no address stops the walk.
    assert_eq!(client(&xff("203.0.113.9, unknown, 10.0.0.5")), None);
    assert_eq!(client(&[]), None);
}

#[test]
fn only_a_scheme_is_kept_as_the_forwarded_proto() {
    for (value, kept) in [("https", true), ("HTTP", true), ("ftp", false), ("", false)] {
        let h = headers(&[("x-forwarded-proto", value)]);
        assert_eq!(keeps_proto(Peer::Trusted, &h), kept, "{value:?}");
        assert!(!keeps_proto(Peer::Untrusted, &h));
    }
}
