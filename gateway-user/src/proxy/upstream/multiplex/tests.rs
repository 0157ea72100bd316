use super::*;

#[test]
fn a_burst_waits_for_the_connection_being_made_until_it_is_full() {
    let mux = Arc::new(Multiplexed::new(
        "127.0.0.1:80".parse().unwrap(),
        1,
        3,
        Duration::from_secs(90),
    ));
    let first = mux.plan();
    assert!(matches!(first, Wait::Connect(_)));
    // Three streams fit on the connection being made, one for the request that makes it:
    // two requests wait for it.
    let w1 = mux.plan();
    let w2 = mux.plan();
    assert!(matches!(w1, Wait::ForConnect(_)));
    assert!(matches!(w2, Wait::ForConnect(_)));
    // The third opens a second connection.
    let second = mux.plan();
    assert!(matches!(second, Wait::Connect(_)));
    drop((first, w1, w2, second));
    let shard = mux.lock(0);
    assert_eq!((shard.connecting, shard.waiting), (0, 0));
}

/// A new connection over an in-memory pipe (nothing answers on it), registered with its
/// first stream taken.
async fn registered(mux: &Arc<Multiplexed>) -> UpstreamConn {
    let (io, peer) = tokio::io::duplex(1 << 16);
    std::mem::forget(peer);
    let (sender, conn) = http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let slot = Arc::new(tokio::sync::Semaphore::new(1))
        .try_acquire_owned()
        .unwrap();
    mux.register(
        sender,
        1,
        -1,
        slot,
        Duration::ZERO,
        (
            Arc::new(SendGate::default()),
            Arc::new(PeerSettings::unlimited()),
        ),
    )
}

#[tokio::test]
async fn a_new_connections_first_stream_is_queued_before_others_may_take_one() {
    let mux = Arc::new(Multiplexed::new(
        "127.0.0.1:80".parse().unwrap(),
        1,
        8,
        Duration::from_secs(90),
    ));
    let mut conn = registered(&mux).await;
    // Requests waiting for it see it only with its first request queued: the stream an
    // upstream that ends connections after N requests is sure to process.
    conn.hold_connecting(match mux.plan() {
        Wait::Connect(c) => c,
        Wait::ForConnect(_) => panic!("nothing was being made"),
    });
    let waiting = mux.plan();
    assert!(matches!(waiting, Wait::ForConnect(_)));
    assert!(
        mux.take().is_none(),
        "taken before its first request was queued"
    );
    let _response = conn.send(
        http::Request::get("http://up/")
            .body(RequestBody::empty())
            .unwrap(),
        false,
    );
    assert!(
        mux.take().is_some(),
        "listed once its first request was queued"
    );
    drop(waiting);
    assert_eq!(
        mux.lock(0).connecting,
        0,
        "the connection is no longer being made"
    );
    // A connection whose first request never went out is listed when it is dropped.
    let other = registered(&mux).await;
    let listed = mux.lock(0).conns.len();
    drop(other);
    assert_eq!(mux.lock(0).conns.len(), listed + 1);
}

#[tokio::test]
async fn a_closed_endpoints_connections_are_retired_and_a_new_one_carries_one_request() {
    let mux = Arc::new(Multiplexed::new(
        "127.0.0.1:80".parse().unwrap(),
        1,
        8,
        Duration::from_secs(90),
    ));
    // A listed connection with no stream in flight.
    drop(registered(&mux).await);
    assert_eq!(mux.lock(0).conns.len(), 1);
    mux.close();
    assert!(mux.lock(0).conns.is_empty(), "retired and unlisted");
    assert!(mux.take().is_none());
    // A connection made after the endpoint left (by a request that chose it before) carries
    // that request and no other.
    drop(registered(&mux).await);
    assert!(
        mux.take().is_none(),
        "a retired connection takes no new stream"
    );
}

/// `REFUSED_STREAM` sheds load: the connection keeps taking streams through refusals with
/// answers between them, and is retired by [`SHED_TO_RETIRE`] refusals in a row.
#[tokio::test]
async fn a_connection_is_retired_by_refusals_in_a_row_only() {
    let mux = Arc::new(Multiplexed::new(
        "127.0.0.1:80".parse().unwrap(),
        1,
        8,
        Duration::from_secs(90),
    ));
    let conn = registered(&mux).await;
    let h2 = conn.h2().unwrap().clone();
    for _ in 0..10 {
        for _ in 0..SHED_TO_RETIRE - 1 {
            h2.shed();
        }
        h2.answered();
    }
    assert!(h2.live(), "70 refusals, never 8 in a row");
    for _ in 0..SHED_TO_RETIRE {
        h2.shed();
    }
    assert!(!h2.live(), "8 in a row");
}
