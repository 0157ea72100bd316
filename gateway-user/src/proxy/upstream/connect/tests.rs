use super::*;
use crate::signals::UserspaceOnly;

#[test]
fn every_socket_has_a_distinct_nonzero_cookie() {
    let (_a, ca) = socket_for("127.0.0.1:1".parse().unwrap()).unwrap();
    let (_b, cb) = socket_for("127.0.0.1:1".parse().unwrap()).unwrap();
    assert_ne!(ca, 0);
    assert_ne!(ca, cb);
}

#[tokio::test]
async fn refused_connect_is_typed_with_cookie() {
    // Bind then drop to find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ep: SocketAddr = ([127, 0, 0, 1], port).into();
    let err = connect(ep, Duration::from_secs(1), &UserspaceOnly::default())
        .await
        .err()
        .unwrap();
    match err {
        ProxyError::ConnectRefused {
            endpoint, cookie, ..
        } => {
            assert_eq!(endpoint, ep);
            assert_ne!(cookie, 0);
        }
        other => panic!("expected refused, got {other:?}"),
    }
}

/// The kernel's record of every connect: one that an ICMP error ended after its SYN.
struct IcmpEnded;

impl SignalSource for IcmpEnded {
    fn mode(&self) -> crate::signals::SignalMode {
        crate::signals::SignalMode::Kernel
    }
    fn connect_evidence(&self, _: u64) -> Option<crate::signals::ConnectEvidence> {
        Some(crate::signals::ConnectEvidence {
            outcome: gateway_common::Outcome::Unreachable,
            syn_retransmits: 0,
            syn_rtt: None,
            errno: Some(libc::EACCES as u32),
            elapsed: Duration::from_millis(1),
            so_error: None,
            refused_by_icmp: false,
        })
    }
    fn established_evidence(&self, _: u64) -> Option<crate::signals::EstablishedEvidence> {
        None
    }
}

/// EACCES is the endpoint's failure (unreachable) only when the kernel saw an ICMP error
/// end the connect after its SYN; without that record, and never for EPERM (a filter on
/// this host), it stays a local `connect_failed`.
#[test]
fn an_errno_the_table_does_not_name_is_unreachable_on_the_kernels_word_only() {
    let ep: SocketAddr = "[fd00::2]:8080".parse().unwrap();
    let fail = |errno, signals: &dyn SignalSource| {
        let e = std::io::Error::from_raw_os_error(errno);
        failed(ep, e, 1, Duration::from_millis(1), signals).kind()
    };
    use crate::proxy::error::ErrorKind;
    assert_eq!(
        fail(libc::EACCES, &IcmpEnded),
        ErrorKind::ConnectUnreachable
    );
    assert_eq!(
        fail(libc::ENOPROTOOPT, &IcmpEnded),
        ErrorKind::ConnectUnreachable
    );
    assert_eq!(fail(libc::EPERM, &IcmpEnded), ErrorKind::ConnectFailed);
    let none = UserspaceOnly::default();
    assert_eq!(fail(libc::EACCES, &none), ErrorKind::ConnectFailed);
}
