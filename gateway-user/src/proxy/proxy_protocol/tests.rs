use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A v2 header: `command` (0x20 LOCAL, 0x21 PROXY), family and protocol (0x11 TCP over IPv4),
/// the addresses and the TLVs.
fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(command);
    h.push(family);
    let rest = (addresses.len() + tlvs.len()) as u16;
    h.extend_from_slice(&rest.to_be_bytes());
    h.extend_from_slice(addresses);
    h.extend_from_slice(tlvs);
    h
}

/// 192.0.2.7:5000 to 10.0.0.1:443.
const V4_ADDRESSES: [u8; 12] = [192, 0, 2, 7, 10, 0, 0, 1, 0x13, 0x88, 0x01, 0xbb];

fn whole(seen: &[u8]) -> Header {
    match parse(seen) {
        Ok(Parsed::Whole(h)) => h,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(seen)),
    }
}

#[test]
fn v1_names_the_client_and_only_its_own_bytes_are_taken() {
    let line = "PROXY TCP4 192.0.2.7 10.0.0.1 5000 443\r\n";
    let h = whole(format!("{line}GET / HTTP/1.1\r\n").as_bytes());
    assert_eq!(h.len, line.len());
    assert_eq!(h.client, Some(addr("192.0.2.7:5000")));
    assert_eq!(h.result, "v1");
    assert!(!h.tls);

    let h = whole(b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 443\r\n");
    assert_eq!(h.client, Some(addr("[2001:db8::7]:5000")));
    // An IPv4-mapped source is the IPv4 client, as allow_clients reads it.
    let h = whole(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.1 5000 443\r\n");
    assert_eq!(h.client, Some(addr("192.0.2.7:5000")));

    let h = whole(b"PROXY UNKNOWN\r\n");
    assert_eq!((h.client, h.result, h.len), (None, "local", 15));
}

#[test]
fn v2_names_the_client_says_whether_it_spoke_tls_and_local_names_none() {
    let plain = v2(0x21, 0x11, &V4_ADDRESSES, &[]);
    let mut seen = plain.clone();
    seen.extend_from_slice(b"\x16\x03\x01");
    let h = whole(&seen);
    assert_eq!(h.len, plain.len());
    assert_eq!(h.client, Some(addr("192.0.2.7:5000")));
    assert_eq!((h.result, h.tls), ("v2", false));

    // PP2_TYPE_SSL with PP2_CLIENT_SSL, as HAProxy's send-proxy-v2-ssl sends it, after a NOOP.
    let tlvs = [
        0x04,
        0,
        1,
        0,
        PP2_TYPE_SSL,
        0,
        5,
        PP2_CLIENT_SSL,
        0,
        0,
        0,
        0,
    ];
    let h = whole(&v2(0x21, 0x11, &V4_ADDRESSES, &tlvs));
    assert!(h.tls);
    let no_client_tls = [PP2_TYPE_SSL, 0, 5, 0, 0, 0, 0, 0];
    assert!(!whole(&v2(0x21, 0x11, &V4_ADDRESSES, &no_client_tls)).tls);

    let mut v6 = Vec::new();
    v6.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v6.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v6.extend_from_slice(&[0x13, 0x88, 0x01, 0xbb]);
    let h = whole(&v2(0x21, 0x21, &v6, &[]));
    assert_eq!(h.client, Some(addr("[2001:db8::7]:5000")));

    // LOCAL: the load balancer's own connection, whatever addresses it carries.
    let h = whole(&v2(0x20, 0x11, &V4_ADDRESSES, &[]));
    assert_eq!((h.client, h.result), (None, "local"));
    let h = whole(&v2(0x20, 0x00, &[], &[]));
    assert_eq!((h.client, h.result, h.len), (None, "local", 16));
}

#[test]
fn a_header_in_pieces_is_partial_and_anything_else_is_none() {
    let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 443\r\n";
    let v2 = v2(0x21, 0x11, &V4_ADDRESSES, &[]);
    for n in 1..v1.len() {
        assert_eq!(parse(&v1[..n]), Ok(Parsed::Partial), "{n} bytes of v1");
    }
    for n in 1..v2.len() {
        assert_eq!(parse(&v2[..n]), Ok(Parsed::Partial), "{n} bytes of v2");
    }
    let not: [&[u8]; 7] = [
        b"GET / HTTP/1.1\r\n",
        b"POST / HTTP/1.1\r\n",
        b"PUT / HTTP/1.1\r\n",
        b"PROPFIND / HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"\x16\x03\x01\x02\x00",
        b"\r\nGET / HTTP/1.1\r\n",
    ];
    for seen in not {
        assert_eq!(parse(seen), Ok(Parsed::NotAHeader), "{seen:?}");
    }
}

#[test]
fn a_malformed_or_oversized_header_is_refused() {
    let bad: [&[u8]; 5] = [
        b"PROXY TCP4 192.0.2 10.0.0.1 5000 443\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 443\r\n",
        b"PROXY TCP5 192.0.2.7 10.0.0.1 5000 443\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 443\n\n",
        b"PROXY UNKNOWN aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ];
    for seen in bad {
        assert_eq!(
            parse(seen),
            Err("malformed"),
            "{:?}",
            String::from_utf8_lossy(seen)
        );
    }
    // Version 3, and a command that is neither LOCAL nor PROXY.
    assert_eq!(parse(&v2(0x31, 0x11, &V4_ADDRESSES, &[])), Err("malformed"));
    assert_eq!(parse(&v2(0x22, 0x11, &V4_ADDRESSES, &[])), Err("malformed"));
    // Addresses shorter than the family needs.
    assert_eq!(
        parse(&v2(0x21, 0x11, &V4_ADDRESSES[..8], &[])),
        Err("malformed")
    );
    // A length past the largest header read is refused from its first 16 bytes.
    let mut huge = v2(0x21, 0x11, &V4_ADDRESSES, &[]);
    huge[14..16].copy_from_slice(&(MAX_HEADER as u16).to_be_bytes());
    assert_eq!(parse(&huge[..16]), Err("too_large"));
}

/// Over a real socket: a header sent in two pieces is read whole, and the bytes after it are
/// left for HTTP.
#[tokio::test]
async fn a_header_sent_in_pieces_is_taken_off_the_socket_and_nothing_more() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = l.local_addr().unwrap();
    let sender = tokio::spawn(async move {
        let mut c = TcpStream::connect(to).await.unwrap();
        c.set_nodelay(true).unwrap();
        c.write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 ")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(b"5000 443\r\nGET / HTTP/1.1\r\n")
            .await
            .unwrap();
        c
    });
    let (mut s, _) = l.accept().await.unwrap();
    let h = header(&mut s, &mut false).await.unwrap().unwrap();
    assert_eq!(h.client, Some(addr("192.0.2.7:5000")));
    let _c = sender.await.unwrap();
    let mut rest = [0u8; 16];
    s.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"GET / HTTP/1.1\r\n");
}

/// A peer that sends part of a header and shuts its side is done with at once, not at the
/// timeout.
#[tokio::test]
async fn a_header_cut_short_by_the_peer_ends_when_the_peer_closes() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = l.local_addr().unwrap();
    let sender = tokio::spawn(async move {
        let mut c = TcpStream::connect(to).await.unwrap();
        c.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.shutdown().await.unwrap();
        c
    });
    let (mut s, _) = l.accept().await.unwrap();
    let start = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(2), header(&mut s, &mut false)).await;
    assert_eq!(read, Ok(Err("closed")));
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    let _c = sender.await.unwrap();
}
