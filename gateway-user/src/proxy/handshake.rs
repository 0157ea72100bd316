//! The HTTPS listener's side of a connection before HTTP: the TLS handshake, bounded by
//! `[router.downstream] tls_handshake_timeout_ms`, with the certificate picked by SNI
//! (`tls::SniResolver`) from the config generation current when the connection arrived, so
//! a SIGHUP's new certificates serve new connections at once while established ones keep
//! theirs.
//!
//! A failure never reaches the worker: it ends this one connection and is counted by reason
//! (`gateway_tls_handshake_errors_total{side="downstream"}`). The first byte is peeked before
//! rustls sees anything: a TLS connection starts with a handshake record (0x16); an HTTP
//! request on the HTTPS port (`plain_http`) is answered `400` with a sentence saying so,
//! like nginx does, and anything else (`not_tls`) is closed.

use std::{net::SocketAddr, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};
use tracing::debug;

use super::{io::StallGuard, shared::Shared, telemetry::Side};
use crate::tls::{self, ServerTls, failure::downstream_reason};

/// A TLS record of type handshake (RFC 8446 section 5.1): how every TLS connection starts.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The body of the answer to an HTTP request sent to the HTTPS port.
const PLAIN_HTTP_BODY: &str =
    "400 Bad Request: this port speaks HTTPS; use https:// for this URL\n";

/// The client's TLS stream once its handshake is done, or `None` (counted and logged).
pub(super) async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<TlsStream<StallGuard<TcpStream>>> {
    let start = Instant::now();
    let (tls, timeout, write_timeout) = {
        let rt = shared.runtime.load();
        let ds = &rt.settings.downstream;
        let tls = rt.settings.https.as_ref().map(|h| h.tls.clone());
        (tls, ds.tls_handshake_timeout, ds.write_timeout)
    };
    let meter = &shared.telemetry.tls;
    // HTTPS turned off by a reload: the listener stays until a restart, but serves nothing.
    let Some(tls) = tls else {
        meter.failed(Side::Downstream, "https_off");
        return None;
    };
    let io = StallGuard::new(stream, write_timeout);
    match tokio::time::timeout(timeout, handshake(io, &tls)).await {
        Ok(Ok(s)) => {
            let version = tls::version_label(s.get_ref().1.protocol_version());
            meter.ok(Side::Downstream, version, start.elapsed());
            Some(s)
        }
        Ok(Err(reason)) => {
            debug!(client = %peer, reason, "TLS handshake failed");
            meter.failed(Side::Downstream, reason);
            None
        }
        Err(_) => {
            debug!(client = %peer, timeout_ms = timeout.as_millis() as u64, "TLS handshake timed out");
            meter.failed(Side::Downstream, "timeout");
            None
        }
    }
}

/// The handshake itself; the reason label when it fails.
async fn handshake(
    mut io: StallGuard<TcpStream>,
    tls: &ServerTls,
) -> Result<TlsStream<StallGuard<TcpStream>>, &'static str> {
    let mut first = [0u8; 1];
    match io.get_ref().peek(&mut first).await {
        Ok(0) => return Err("client_closed"),
        Ok(_) => {}
        Err(_) => return Err("io"),
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if first[0].is_ascii_uppercase() {
            answer_plain_http(&mut io).await;
            return Err("plain_http");
        }
        return Err("not_tls");
    }
    let acceptor = rustls::server::Acceptor::default();
    let start = LazyConfigAcceptor::new(acceptor, io)
        .await
        .map_err(|e| downstream_reason(&e))?;
    let known = tls
        .resolver
        .lookup(start.client_hello().server_name())
        .is_some();
    start.into_stream(tls.config.clone()).await.map_err(|e| {
        if known {
            downstream_reason(&e)
        } else {
            "unknown_sni"
        }
    })
}

/// Reads what the client sent (so that closing does not reset the answer away), answers 400,
/// and closes.
async fn answer_plain_http(io: &mut StallGuard<TcpStream>) {
    let mut buf = [0u8; 4096];
    let _ = io.get_ref().try_read(&mut buf);
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         x-gateway-error: plain_http_on_https_port\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{PLAIN_HTTP_BODY}",
        PLAIN_HTTP_BODY.len()
    );
    let _ = io.write_all(answer.as_bytes()).await;
    let _ = io.shutdown().await;
    // Give the client a moment to read the answer before the socket closes.
    let _ = tokio::time::timeout(Duration::from_millis(100), io.get_ref().readable()).await;
}
