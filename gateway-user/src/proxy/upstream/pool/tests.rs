use super::*;

#[test]
fn an_http2_request_takes_scheme_and_authority_from_host() {
    let mut req = Request::builder()
        .uri("/a/b?c=1")
        .header(HOST, "api.example.com:8080")
        .body(RequestBody::empty())
        .unwrap();
    to_h2(&mut req, false);
    assert_eq!(req.uri().to_string(), "http://api.example.com:8080/a/b?c=1");
    assert!(req.headers().get(HOST).is_none());
    assert_eq!(req.version(), Version::HTTP_2);
    let mut req = Request::builder()
        .uri("/x")
        .header(HOST, "a.b")
        .body(RequestBody::empty())
        .unwrap();
    to_h2(&mut req, true);
    assert_eq!(req.uri().to_string(), "https://a.b/x");
}

/// An HTTP/1.1 connection over an in-memory pipe (nothing answers on it), holding one of
/// `slots`.
async fn conn(slots: &std::sync::Arc<tokio::sync::Semaphore>) -> UpstreamConn {
    let (io, peer) = tokio::io::duplex(1 << 16);
    std::mem::forget(peer);
    let (sender, conn) = http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let slot = slots.clone().try_acquire_owned().unwrap();
    UpstreamConn::new(sender, 1, -1, Duration::ZERO, slot)
}

#[tokio::test]
async fn a_closed_pool_gives_back_its_idle_connections_slots_and_takes_no_more() {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(2));
    let pool = IdlePool::new(1, 8, Duration::from_secs(90));
    pool.put(conn(&slots).await);
    assert_eq!(
        slots.available_permits(),
        1,
        "the idle connection holds its slot"
    );
    pool.close();
    assert_eq!(slots.available_permits(), 2, "closed: its slot is free");
    // A request that was in flight when the endpoint left its cluster returns its
    // connection: closed, not kept where nothing would take or sweep it.
    pool.put(conn(&slots).await);
    assert_eq!(slots.available_permits(), 2);
    assert!(pool.take(Instant::now()).is_none());
}
