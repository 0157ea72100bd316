//! The PROXY protocol (HAProxy's `proxy-protocol.txt`: v1 text, v2 binary) on client
//! connections, `[router.proxy_protocol]`. A load balancer that forwards TCP (AWS NLB, HAProxy
//! `send-proxy`, ...) opens each connection with a header naming the client it came from; the
//! gateway then sees only the load balancer's address. With the header read, the client it
//! names is the connection's client everywhere a client is: the access log, `X-Forwarded-For`,
//! `[router.forwarded]`, `allow_clients`, `rate_limit` and `hash_on = "client"`.
//!
//! The header is read before anything else (before TLS) by peeking: only its own bytes are
//! taken off the socket, so what follows is served as any connection's. A header comes whole
//! in one segment from every load balancer known; one that arrives in pieces is peeked again
//! after a pause (a peek returns at once while any byte waits, so there is no waiting on
//! readiness for more), until `timeout_ms`.
//!
//! A header is expected only from the listed peers (`from`, default every peer): any other
//! peer is served as it comes, so no client can name another. A connection that must have one
//! and does not (`missing`), whose header is malformed or too large, or that sends none within
//! the timeout is closed, never served: its client would be misnamed. A header that names no
//! client (v2 `LOCAL`, v1 `UNKNOWN`: a load balancer's own health check) leaves the peer as
//! the client. With `required = false`, a connection without a header, or whose client sent
//! nothing within the timeout (a browser's preconnect), is served as it comes. Each outcome is
//! counted in `gateway_client_proxy_protocol_total{result}`; each refusal of a peer that sent
//! something is also logged, at most every 10 s with the count left out (one that sent nothing,
//! such as a TCP health check, is only counted).

use std::{
    net::{IpAddr, SocketAddr},
    sync::LazyLock,
    time::Duration,
};

use ppp::{v1, v2};
use tokio::{
    io::{AsyncReadExt, Interest},
    net::TcpStream,
};
use tracing::warn;

use super::{log_every::LogEvery, shared::Shared};
use crate::{config::ProxyProtocol, metrics::ResultLabels};

/// v2's signature, the first 12 bytes of its header.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// How v1's header starts.
const V1_PREFIX: &[u8] = b"PROXY ";
/// v1's longest header, its CRLF included.
const V1_MAX: usize = 107;
/// v2's fixed part: the signature, version and command, family and protocol, and the length of
/// what follows (big-endian, in its last two bytes).
const V2_FIXED: usize = 16;
/// The largest header read. v1's is at most 107 bytes; v2's addresses take up to 216, and the
/// TLVs a load balancer adds (AWS's VPC endpoint ID, HAProxy's TLS details) a few hundred more.
const MAX_HEADER: usize = 4096;
/// v2's TLV saying how the client reached the load balancer (`PP2_TYPE_SSL`), and its flag
/// that it spoke TLS (`PP2_CLIENT_SSL`).
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_CLIENT_SSL: u8 = 0x01;
/// The pauses between peeks at a header that came in pieces: from 1 ms, doubling, up to 50 ms.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(50);

/// Refusals are logged at most this often.
static LOG: LazyLock<LogEvery> = LazyLock::new(|| LogEvery::new(Duration::from_secs(10)));

/// Where a connection comes from, by its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Origin {
    /// The client the header names, else the peer.
    pub client: SocketAddr,
    /// A v2 header said the client spoke TLS to the load balancer (which terminated it).
    pub tls: bool,
}

/// What a header said, or that there was none.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    /// Its length: the bytes to take off the socket.
    len: usize,
    /// The client it names; `None` for `LOCAL` and `UNKNOWN`.
    client: Option<SocketAddr>,
    tls: bool,
    /// The `result` label.
    result: &'static str,
}

/// Reads the header of a connection from `peer` when `cfg` expects one from it. `None`: the
/// connection is to be closed (counted and logged).
pub(super) async fn read(
    stream: &mut TcpStream,
    peer: SocketAddr,
    cfg: &ProxyProtocol,
    shared: &Shared,
) -> Option<Origin> {
    let direct = Origin {
        client: peer,
        tls: false,
    };
    let count = |result| {
        let labels = ResultLabels { result };
        shared
            .telemetry
            .metrics
            .client_proxy_protocol
            .get_or_create(&labels)
            .inc();
    };
    // Whether any byte came: a peer that connects and closes, or sends nothing, is no sign of
    // a misconfigured load balancer (a TCP health check, a browser's preconnect).
    let mut seen = false;
    let outcome = match tokio::time::timeout(cfg.timeout, header(stream, &mut seen)).await {
        Ok(Ok(Some(h))) => Ok(h),
        Ok(Ok(None)) => Err("missing"),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("timeout"),
    };
    // Not required: a connection without a header, or whose client has sent nothing within
    // the timeout, is served as it comes; HTTP's own timeouts take it from there.
    if !cfg.required
        && matches!(
            (outcome.as_ref(), seen),
            (Err(&"missing"), _) | (Err(&"timeout"), false)
        )
    {
        count("absent");
        return Some(direct);
    }
    match outcome {
        Ok(h) => {
            count(h.result);
            Some(
                h.client
                    .map_or(direct, |client| Origin { client, tls: h.tls }),
            )
        }
        Err(reason) => {
            count(reason);
            if seen && let Some(left_out) = LOG.due() {
                warn!(
                    client = %peer,
                    reason,
                    timeout_ms = cfg.timeout.as_millis() as u64,
                    left_out,
                    "closed a client connection: no valid PROXY protocol header; is the load balancer's PROXY protocol on? ([router.proxy_protocol])"
                );
            }
            None
        }
    }
}

/// Peeks until the header is whole, then takes it off the socket. `None`: the connection does
/// not start with one. The error is the `result` label. `seen`: a byte came.
async fn header(stream: &mut TcpStream, seen: &mut bool) -> Result<Option<Header>, &'static str> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut pause = FIRST_PAUSE;
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| "io")?;
        if n == 0 {
            return Err("closed");
        }
        *seen = true;
        match parse(&buf[..n])? {
            Parsed::Whole(h) => {
                stream
                    .read_exact(&mut buf[..h.len])
                    .await
                    .map_err(|_| "io")?;
                return Ok(Some(h));
            }
            Parsed::NotAHeader => return Ok(None),
            // Never the whole buffer: `parse` refuses a longer header from its framing.
            Parsed::Partial => {
                // The peer shut its side (EPOLLRDHUP, seen even with bytes unread): the rest of
                // the header never comes.
                let ready = stream.ready(Interest::READABLE).await.map_err(|_| "io")?;
                if ready.is_read_closed() {
                    return Err("closed");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Whole(Header),
    /// The bytes so far could still become a header.
    Partial,
    NotAHeader,
}

/// What the first bytes of a connection are. Whether a header is whole is read off its
/// framing here (v2's length, v1's line end), and only a whole one goes to the parser.
fn parse(seen: &[u8]) -> Result<Parsed, &'static str> {
    let could_be = |sig: &[u8]| {
        let k = seen.len().min(sig.len());
        seen[..k] == sig[..k]
    };
    if could_be(V2_SIGNATURE) {
        if seen.len() < V2_FIXED {
            return Ok(Parsed::Partial);
        }
        let len = V2_FIXED + usize::from(u16::from_be_bytes([seen[14], seen[15]]));
        if len > MAX_HEADER {
            return Err("too_large");
        }
        if seen.len() < len {
            return Ok(Parsed::Partial);
        }
        return match v2::Header::try_from(&seen[..len]) {
            Ok(h) => Ok(Parsed::Whole(from_v2(&h))),
            Err(_) => Err("malformed"),
        };
    }
    if !could_be(V1_PREFIX) {
        return Ok(Parsed::NotAHeader);
    }
    // v1 is one line ending in CRLF, of at most 107 bytes.
    match seen.iter().position(|&b| b == b'\n') {
        Some(end) if end < V1_MAX && seen[end - 1] == b'\r' => {
            match v1::Header::try_from(&seen[..=end]) {
                Ok(h) => Ok(Parsed::Whole(from_v1(&h))),
                Err(_) => Err("malformed"),
            }
        }
        Some(_) => Err("malformed"),
        None if seen.len() >= V1_MAX => Err("malformed"),
        None => Ok(Parsed::Partial),
    }
}

fn from_v1(h: &v1::Header<'_>) -> Header {
    let client = match h.addresses {
        v1::Addresses::Tcp4(a) => Some(client(a.source_address.into(), a.source_port)),
        v1::Addresses::Tcp6(a) => Some(client(a.source_address.into(), a.source_port)),
        v1::Addresses::Unknown => None,
    };
    Header {
        len: h.header.len(),
        client,
        tls: false,
        result: if client.is_some() { "v1" } else { "local" },
    }
}

fn from_v2(h: &v2::Header<'_>) -> Header {
    let client = match (h.command, h.addresses) {
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
            Some(client(a.source_address.into(), a.source_port))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
            Some(client(a.source_address.into(), a.source_port))
        }
        // LOCAL (the load balancer's own connection), or a family with no IP address.
        _ => None,
    };
    let tls = h.tlvs().flatten().any(|t| {
        t.kind == PP2_TYPE_SSL && t.value.first().is_some_and(|f| f & PP2_CLIENT_SSL != 0)
    });
    Header {
        len: h.len(),
        client,
        tls: client.is_some() && tls,
        result: if client.is_some() { "v2" } else { "local" },
    }
}

/// An IPv4-mapped IPv6 source is the IPv4 client it maps, as `allow_clients` and
/// `[router.forwarded]` read it.
fn client(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_canonical(), port)
}

#[cfg(test)]
mod tests;
