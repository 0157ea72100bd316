use http::StatusCode;

use super::*;

#[test]
fn evidence_header_states_what_the_kernel_saw() {
    let e = ProxyError::ConnectTimeout {
        endpoint: "10.0.0.5:8080".parse().unwrap(),
        timeout: Duration::from_millis(250),
        cookie: 1,
        evidence: Some(ConnectEvidence {
            outcome: gateway_common::Outcome::Aborted,
            syn_retransmits: 1,
            syn_rtt: None,
            errno: None,
            elapsed: Duration::from_millis(250),
            so_error: None,
            refused_by_icmp: false,
        }),
    };
    assert_eq!(
        e.evidence_header().as_deref(),
        Some("syns=2 synack=0 rst=0 icmp=0 errno=- waited_ms=250 deadline_ms=250")
    );
    let e = ProxyError::UpstreamHostDied {
        endpoint: "10.0.0.5:8080".parse().unwrap(),
        after: Duration::from_millis(600),
        cookie: 1,
        evidence: EstablishedEvidence {
            data_retransmits: 3,
            rtos: 3,
            srtt: None,
            bytes_acked: 0,
            unacked_bytes: 78,
        },
        delivery: Delivery::NotReceived,
    };
    assert_eq!(
        e.evidence_header().as_deref(),
        Some("request_acked=no bytes_acked=0 unacked=78 rtos=3 retransmits=3")
    );
    assert!(
        e.to_string()
            .contains("none of the request reached the upstream"),
        "{e}"
    );
    // A keep-alive connection: its counts are its whole life's, and nothing is claimed of
    // this request's bytes without a count taken before it (an audit read `partial` and "the
    // kernel retransmitted the request 14 times" for a request none of whose bytes arrived).
    let reused = ProxyError::UpstreamHostDied {
        endpoint: "10.0.0.5:8080".parse().unwrap(),
        after: Duration::from_millis(600),
        cookie: 1,
        evidence: EstablishedEvidence {
            data_retransmits: 14,
            rtos: 1,
            srtt: None,
            bytes_acked: 22230,
            unacked_bytes: 195,
        },
        delivery: Delivery::Unknown,
    };
    assert_eq!(
        reused.evidence_header().as_deref(),
        Some("request_acked=unknown bytes_acked=22230 unacked=195 rtos=1 retransmits=14")
    );
    assert!(
        reused
            .to_string()
            .contains("the kernel retransmitted 14 time(s) on its connection (1 RTOs)"),
        "{reused}"
    );
    let no_kernel = ProxyError::ConnectTimeout {
        endpoint: "10.0.0.5:8080".parse().unwrap(),
        timeout: Duration::from_millis(250),
        cookie: 1,
        evidence: None,
    };
    assert_eq!(
        no_kernel.evidence_header(),
        None,
        "no evidence is claimed without the kernel"
    );
}

#[test]
fn a_tls_handshake_timeout_says_what_the_kernel_saw_of_the_tcp_connection() {
    let tcp = TcpUnderneath {
        connect: Duration::from_micros(900),
        kernel_rtt: Some(Duration::from_micros(400)),
        server_bytes: Some(0),
    };
    let stalled = ProxyError::TlsHandshakeTimeout {
        endpoint: "10.0.0.5:443".parse().unwrap(),
        timeout: Duration::from_millis(5000),
        cookie: 1,
        tcp: Box::new(tcp),
        evidence: Some(Box::new(EstablishedEvidence {
            data_retransmits: 0,
            rtos: 0,
            srtt: None,
            bytes_acked: 517,
            unacked_bytes: 0,
        })),
    };
    assert_eq!(
        stalled.to_string(),
        "TLS handshake with 10.0.0.5:443 got no ServerHello within 5000 ms; TCP established in 0.4 ms (kernel); kernel: the upstream ACKed 517 byte(s) of ours, 0 retransmits, 0 RTOs (the network is fine: the TLS server is at fault)"
    );
    assert_eq!(
        stalled.evidence_header().as_deref(),
        Some(
            "tcp=established connect_us=400 server_bytes=0 client_bytes_acked=517 unacked=0 rtos=0 retransmits=0"
        )
    );
    assert_eq!(stalled.kind().status(), StatusCode::GATEWAY_TIMEOUT);
    let died = ProxyError::TlsHandshakeTimeout {
        evidence: Some(Box::new(EstablishedEvidence {
            data_retransmits: 3,
            rtos: 3,
            srtt: None,
            bytes_acked: 0,
            unacked_bytes: 517,
        })),
        endpoint: "10.0.0.5:443".parse().unwrap(),
        timeout: Duration::from_millis(5000),
        cookie: 1,
        tcp: Box::new(tcp),
    };
    assert!(
        died.to_string()
            .ends_with("; 3 RTOs on the connection, 517 bytes unACKed (host or path died)"),
        "{died}"
    );
    let bad = ProxyError::TlsError {
        endpoint: "10.0.0.5:443".parse().unwrap(),
        failure: TlsFailure::UnknownCa,
        detail: "invalid peer certificate: UnknownIssuer".into(),
        cookie: 1,
        tcp: Box::new(TcpUnderneath {
            kernel_rtt: None,
            ..tcp
        }),
        evidence: None,
    };
    assert_eq!(
        bad.to_string(),
        "TLS handshake with 10.0.0.5:443 failed (unknown_ca): invalid peer certificate: UnknownIssuer; TCP established in 0.9 ms"
    );
    assert_eq!(bad.kind().status(), StatusCode::BAD_GATEWAY);
    assert_eq!(bad.evidence_header(), None);
}

#[test]
fn the_gateway_out_of_descriptors_is_its_own_overload_not_a_bad_gateway() {
    let failed = |errno| ProxyError::ConnectFailed {
        endpoint: "10.0.0.5:80".parse().unwrap(),
        source: io::Error::from_raw_os_error(errno),
        cookie: None,
    };
    for errno in [libc::EMFILE, libc::ENFILE] {
        let e = failed(errno);
        assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");
        assert_eq!(e.kind().status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(failed(libc::EPERM).kind(), ErrorKind::ConnectFailed);
}
