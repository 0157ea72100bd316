//! Lingering close, as nginx (`lingering_close`) and Apache do it: a plain HTTP/1 connection
//! that the gateway closes while its client may still be sending is not closed at once.
//!
//! That happens when a request is answered before its body was all read: the upstream's `413`
//! or `401` before an upload, the gateway's own `413` past `max_request_body_bytes`; when hyper
//! answers a request it could not parse (`400`, `414`, `431`); and to a connection turned away
//! by admission (`503 overloaded`) before its request was read. A served connection lingers
//! whenever hyper ends it (a `Connection: close`, the drain) and its last request came with a
//! body or bytes wait unread; never once a `101` handed it to a tunnel.
//!
//! Closing a socket with unread bytes makes its kernel answer with a reset. A client still
//! writing then fails its next write (`curl: (55) Send failure: Broken pipe`) and may never
//! read the answer waiting for it: 1 upload in about 1,200 in `proxy_early_response`.
//!
//! So once the answer is written and the gateway's side is shut down (FIN), what the client
//! still sends is read and dropped until the client closes too, it is quiet for a while, a
//! time limit passes, or the caller stops it (the drain's force).
//!
//! An HTTPS connection lingers too, on its TCP socket under TLS (its `close_notify` is sent):
//! hyper's finished connection holds that socket and cannot give it back, so it is read with a
//! non-blocking `recv` every [`POLL_EVERY`] while the connection is kept.

use std::{
    future::Future,
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};

use super::{peek, recv_now};

/// The longest a served connection reads on after its close (nginx: `lingering_time`, 30 s).
pub(crate) const LINGER: Duration = Duration::from_secs(5);

/// The longest it waits for the client's next bytes (nginx: `lingering_timeout`, 5 s).
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// How often an HTTPS connection's socket is read while it lingers.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(20);

/// A served HTTP/1 connection that hyper ended: lingers when there is a reason (its last
/// request came with a body, `had_body`, or the client sent bytes that were not read), for
/// up to [`LINGER`], quiet for at most [`QUIET`], until `stop`.
pub(crate) async fn after_response(
    stream: &TcpStream,
    had_body: bool,
    stop: impl Future<Output = ()>,
) {
    if shut_down_to_linger(stream.as_raw_fd(), had_body) {
        read_and_drop(stream, LINGER, QUIET, stop).await;
    }
}

/// [`after_response`] for the socket `fd` under an HTTPS connection that hyper ended and
/// still holds (the caller keeps it open until this returns): read every [`POLL_EVERY`].
pub(crate) async fn after_tls_response(fd: RawFd, had_body: bool, stop: impl Future<Output = ()>) {
    if !shut_down_to_linger(fd, had_body) {
        return;
    }
    let start = Instant::now();
    let mut heard = start;
    let mut buf = vec![0u8; 4096];
    let reading = async {
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            // What arrived since, a bounded number of reads a round.
            for _ in 0..64 {
                match recv_now(fd, &mut buf, 0) {
                    Ok(0) => return,
                    Ok(_) => heard = Instant::now(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
            let now = Instant::now();
            if now >= heard + QUIET || now >= start + LINGER {
                return;
            }
        }
    };
    tokio::select! {
        () = reading => {}
        () = stop => {}
    }
}

/// Whether socket `fd` lingers (see [`after_response`]); shut down for writing if so.
fn shut_down_to_linger(fd: RawFd, had_body: bool) -> bool {
    if !had_body && !peek(fd, &mut [0u8; 1]).is_ok_and(|n| n > 0) {
        return false;
    }
    // hyper shut the socket down when it ended the connection, unless that shutdown was
    // swallowed for parking (`Parkable`): the client must see the end of the stream to stop.
    // SAFETY: shutdown(2) of a socket the caller holds open.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    true
}

/// Reads what the client sends and drops it, until it closes, an error, `limit` from now,
/// `quiet` without a byte, or `stop`.
pub(crate) async fn read_and_drop(
    stream: &TcpStream,
    limit: Duration,
    quiet: Duration,
    stop: impl Future<Output = ()>,
) {
    let end = Instant::now() + limit;
    let mut heard = Instant::now();
    // On the heap, and small: a served connection's task stays small when it never lingers,
    // and up to `admission::MAX_LINGERING` rejected connections linger at once.
    let mut buf = vec![0u8; 4096];
    let reading = async {
        loop {
            // A wake-up that finds nothing does not restart the quiet time.
            match tokio::time::timeout_at((heard + quiet).min(end), stream.readable()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            match stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => heard = Instant::now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        () = reading => {}
        () = stop => {}
    }
}
