use super::*;

#[test]
fn accept_errors_of_one_connection_do_not_hold_the_others() {
    for e in [libc::ECONNABORTED, libc::EPROTO, libc::ENETUNREACH] {
        assert_eq!(AcceptFailure::of(e), AcceptFailure::Connection, "{e}");
    }
    assert_eq!(AcceptFailure::of(libc::EMFILE), AcceptFailure::OutOfFds);
    assert_eq!(AcceptFailure::of(libc::ENFILE), AcceptFailure::OutOfFds);
    for e in [libc::ENOBUFS, libc::ENOMEM, libc::EPERM, 0] {
        assert_eq!(AcceptFailure::of(e), AcceptFailure::Resource, "{e}");
    }
}

#[test]
fn the_bucket_bursts_one_second_then_refills_at_the_rate() {
    let mut registry = prometheus_client::registry::Registry::default();
    let m = GatewayMetrics::new(
        &mut registry,
        crate::metrics::LatencyBuckets::reaching(std::time::Duration::ZERO),
    );
    let a = Admission::new(&m);
    let g = ListenerGate::new("127.0.0.1:1".parse().unwrap(), &a);
    let t0 = Instant::now();
    let taken = (0..20).filter(|_| g.take_token(10, t0)).count();
    assert_eq!(taken, 10, "a burst of one second's worth");
    assert!(!g.take_token(10, t0 + Duration::from_millis(50)));
    assert!(g.take_token(10, t0 + Duration::from_millis(150)));
}

#[test]
fn the_answer_is_a_complete_503_that_closes() {
    let a = answer(Rejection::MaxConnections);
    assert!(a.starts_with("HTTP/1.1 503 "));
    assert!(a.contains("\r\nx-gateway-error: overloaded\r\n"));
    assert!(a.contains("\r\nconnection: close\r\n"));
    let (head, body) = a.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(&format!("content-length: {}", body.len())));
}
