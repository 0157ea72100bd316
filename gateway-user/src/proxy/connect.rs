//! Upstream TCP connects: on a socket the gateway creates itself, whose `SO_COOKIE` it reads
//! before `connect()`, bounded by the cluster's connect timeout.
//!
//! The cookie is the join key with the kernel observer's per-connect record (see
//! `signals`): the kernel assigns it when the socket is created (`sock_gen_cookie()` in
//! net/core/sock_diag.c), so reading it before `connect()` guarantees the record of this very
//! attempt can be found, including for a connect that never completes.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpStream, time::Instant};

use super::error::ProxyError;
use crate::signals::SignalSource;

/// A connected upstream socket and what the gateway knows about the connect.
pub(crate) struct Connected {
    pub stream: TcpStream,
    pub cookie: u64,
    pub elapsed: Duration,
}

/// Creates the socket and reads its cookie.
fn socket_for(addr: SocketAddr) -> io::Result<(Socket, u64)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let cookie = socket.cookie()?;
    Ok((socket, cookie))
}

/// Starts a connect to `endpoint` without a timer: the socket's cookie, and the future that
/// completes when the SYN-ACK (or an RST or ICMP error) arrives. Dropping the future closes the
/// socket, which the kernel records as `aborted`. Used for hedged connects.
pub(crate) fn start(
    endpoint: SocketAddr,
) -> Result<
    (
        u64,
        impl std::future::Future<Output = io::Result<TcpStream>>,
    ),
    ProxyError,
> {
    let (socket, cookie) = socket_for(endpoint).map_err(|source| ProxyError::ConnectFailed {
        endpoint,
        source,
        cookie: None,
    })?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    Ok((cookie, socket.connect(endpoint)))
}

/// The typed error of a connect that ended with `source` after `elapsed`.
pub(crate) fn failed(
    endpoint: SocketAddr,
    source: io::Error,
    cookie: u64,
    elapsed: Duration,
    signals: &dyn SignalSource,
) -> ProxyError {
    classify(endpoint, source, cookie, elapsed, signals)
}

/// Connects to `endpoint` within `timeout` (named `connect_timeout_ms` in the config).
pub(crate) async fn connect(
    endpoint: SocketAddr,
    timeout: Duration,
    signals: &dyn SignalSource,
) -> Result<Connected, ProxyError> {
    let (socket, cookie) = socket_for(endpoint).map_err(|source| ProxyError::ConnectFailed {
        endpoint,
        source,
        cookie: None,
    })?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let start = Instant::now();
    match tokio::time::timeout(timeout, socket.connect(endpoint)).await {
        Ok(Ok(stream)) => Ok(Connected {
            stream,
            cookie,
            elapsed: start.elapsed(),
        }),
        // The socket is dropped (closed) by now: the kernel records the connect as aborted.
        Err(_) => Err(ProxyError::ConnectTimeout {
            endpoint,
            timeout,
            cookie,
            evidence: signals.connect_evidence(cookie),
        }),
        Ok(Err(source)) => Err(classify(endpoint, source, cookie, start.elapsed(), signals)),
    }
}

/// Maps a failed `connect()` to its reason.
fn classify(
    endpoint: SocketAddr,
    source: io::Error,
    cookie: u64,
    elapsed: Duration,
    signals: &dyn SignalSource,
) -> ProxyError {
    let evidence = signals.connect_evidence(cookie);
    match source.raw_os_error() {
        Some(libc::ECONNREFUSED) => ProxyError::ConnectRefused {
            endpoint,
            elapsed,
            cookie,
            evidence,
        },
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EHOSTDOWN | libc::ENONET) => {
            ProxyError::ConnectUnreachable {
                endpoint,
                source,
                cookie,
                evidence,
            }
        }
        // The kernel's own SYN retries ran out before our timer (tcp_syn_retries).
        Some(libc::ETIMEDOUT) => ProxyError::ConnectTimeout {
            endpoint,
            timeout: elapsed,
            cookie,
            evidence,
        },
        _ => ProxyError::ConnectFailed {
            endpoint,
            source,
            cookie: Some(cookie),
        },
    }
}

#[cfg(test)]
mod tests {
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
}
