//! One probe attempt, as the probing process itself sees it: a non-blocking `connect()` whose
//! `SO_COOKIE` is read first (the join key with the kernel's record of the same attempt),
//! bounded by a deadline, and on an established connection an optional `GET` whose request
//! ACK (`TCP_INFO` `tcpi_bytes_acked`, polled) and first response byte are timed.
//!
//! The `GET` is written a line at a time, each line once the bytes before it were ACKed. The
//! first ACK says that the upstream's kernel holds the connection (in its accept queue or
//! accepted); the lines after it are round trips over a connection that no accept queue can
//! drop packets of any more, while a lossy path still does. Their retransmits, counted apart
//! from those before (`retransmits_after_accept`), tell an overloaded listener from a lossy
//! path (`classify::handshakes`). HTTP servers read a request however it is segmented.
//!
//! Attempts at one address start [`Schedule::interval`] apart and overlap, like `ping`: five
//! probes of a blackholed address take one deadline, not five.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, unix::AsyncFd},
    net::TcpStream,
};

use super::{
    measure::{HttpExchange, HttpOutcome, Source},
    tcpinfo::{self, TcpInfo},
};
use crate::observer::records::errno_name;

/// How often `TCP_INFO` is polled for the request's ACK during the first
/// [`ACK_POLL_FAST_FOR`] after writing, and after that.
const ACK_POLL_FAST: Duration = Duration::from_millis(1);
const ACK_POLL_FAST_FOR: Duration = Duration::from_millis(20);
const ACK_POLL_SLOW: Duration = Duration::from_millis(10);
/// Bytes of the response read before the exchange counts as answered (the status line).
const STATUS_LINE_MAX: usize = 256;

/// How to run the attempts at one address.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub count: u32,
    /// Between the starts of consecutive attempts.
    pub interval: Duration,
    /// Connect deadline of each attempt.
    pub deadline: Duration,
    pub http: Option<Arc<HttpPlan>>,
}

/// The request sent on each established connection.
#[derive(Clone, Debug)]
pub struct HttpPlan {
    pub request: Vec<u8>,
    /// How long to wait for the first response byte.
    pub response_timeout: Duration,
}

impl HttpPlan {
    /// `GET path HTTP/1.1` with `Host`, `Connection: close`.
    pub fn get(host: &str, path: &str, response_timeout: Duration) -> HttpPlan {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gateway-diagnose/{}\r\nAccept: \
             */*\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        HttpPlan {
            request: request.into_bytes(),
            response_timeout,
        }
    }
}

/// How `connect()` ended, as the prober saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectResult {
    Established,
    /// An errno from `connect()` or `SO_ERROR`.
    Failed(i32),
    /// The deadline passed; the socket was closed still connecting.
    DeadlineHit,
    /// The socket could not even be set up (e.g. EMFILE).
    Local(String),
}

/// What the prober itself saw of one attempt.
#[derive(Clone, Debug)]
pub struct Observed {
    pub cookie: u64,
    pub result: ConnectResult,
    /// `connect()` to its result.
    pub elapsed: Duration,
    /// SYN retransmits counted by `TCP_INFO` at the result (established, or deadline hit).
    pub syn_retransmits: Option<u32>,
    pub http: Option<HttpExchange>,
}

impl Observed {
    fn local(cookie: u64, err: std::io::Error) -> Observed {
        Observed {
            cookie,
            result: ConnectResult::Local(err.to_string()),
            elapsed: Duration::ZERO,
            syn_retransmits: None,
            http: None,
        }
    }
}

/// The errno name of an I/O error, e.g. `ECONNRESET`.
pub fn io_errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_name(n as u32),
        None => e.kind().to_string(),
    }
}

/// One attempt: connect within `deadline`, then the optional HTTP exchange.
pub async fn attempt(addr: SocketAddr, deadline: Duration, http: Option<&HttpPlan>) -> Observed {
    let socket = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return Observed::local(0, e),
    };
    let cookie = socket.cookie().unwrap_or(0);
    if let Err(e) = socket.set_nonblocking(true) {
        return Observed::local(cookie, e);
    }
    let start = Instant::now();
    let connected = socket.connect(&addr.into());
    // SAFETY: a socket2::Socket owns its fd, keeps it open until dropped, and always returns
    // the same one from as_raw_fd().
    let socket = match unsafe { AsyncFd::register(socket) } {
        Ok(fd) => fd,
        Err(e) => return Observed::local(cookie, e.into()),
    };
    let result = match connected {
        Ok(()) => ConnectResult::Established,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let left = deadline.saturating_sub(start.elapsed());
            wait_connected(&socket, left).await
        }
        Err(e) => ConnectResult::Failed(e.raw_os_error().unwrap_or(0)),
    };
    let elapsed = start.elapsed();
    let info = tcpinfo::read(socket.get_ref().as_raw_fd());
    let syn_retransmits = match result {
        ConnectResult::Established | ConnectResult::DeadlineHit => info.map(|i| i.total_retrans),
        _ => None,
    };
    let http = match (&result, http) {
        (ConnectResult::Established, Some(plan)) => Some(exchange(socket, info, plan).await),
        // Dropping the socket here closes it: in SYN_SENT that is the "aborted" outcome.
        _ => None,
    };
    Observed {
        cookie,
        result,
        elapsed,
        syn_retransmits,
        http,
    }
}

async fn wait_connected(socket: &AsyncFd<Socket>, deadline: Duration) -> ConnectResult {
    let wait = async {
        loop {
            let mut ready = match socket.writable().await {
                Ok(r) => r,
                Err(e) => return ConnectResult::Local(e.to_string()),
            };
            match socket.get_ref().take_error() {
                Ok(Some(e)) | Err(e) => {
                    return ConnectResult::Failed(e.raw_os_error().unwrap_or(0));
                }
                Ok(None) => {}
            }
            match socket.get_ref().peer_addr() {
                Ok(_) => return ConnectResult::Established,
                // Woken without a result (spurious): wait again.
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => ready.clear_ready(),
                Err(e) => return ConnectResult::Failed(e.raw_os_error().unwrap_or(0)),
            }
        }
    };
    tokio::time::timeout(deadline, wait)
        .await
        .unwrap_or(ConnectResult::DeadlineHit)
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Sends the request and waits for the first response byte, timing the request's ACK.
async fn exchange(
    socket: AsyncFd<Socket>,
    at_connect: Option<TcpInfo>,
    plan: &HttpPlan,
) -> HttpExchange {
    let request_bytes = plan.request.len() as u64;
    let mut out = not_yet(request_bytes);
    let std_stream: std::net::TcpStream = socket.into_inner().into();
    let fd: RawFd = std_stream.as_raw_fd();
    let mut stream = match TcpStream::from_std(std_stream) {
        Ok(s) => s,
        Err(e) => {
            out.error = Some(io_errno(&e));
            return out;
        }
    };
    let base = tcpinfo::read(fd).or(at_connect);
    let acked_now = |info: Option<TcpInfo>| -> Option<bool> {
        let (now, before) = (info?.bytes_acked?, base?.bytes_acked?);
        Some(now.saturating_sub(before) >= request_bytes)
    };
    let _ = stream.set_nodelay(true);
    let written = Instant::now();
    let base_acked = base.and_then(|b| b.bytes_acked);
    let at_accept = match send_in_rounds(&mut stream, fd, base_acked, plan, written, &mut out).await
    {
        Ok(a) => a,
        Err(e) => {
            out.error = Some(io_errno(&e));
            finish(&mut out, fd, base, at_connect, None, acked_now);
            return out;
        }
    };
    out.retransmits_before_accept = at_accept
        .zip(at_connect.or(base))
        .map(|(a, c)| a.total_retrans.saturating_sub(c.total_retrans));
    let response_deadline = written + plan.response_timeout;
    let head = read_status_line(
        &mut stream,
        fd,
        written,
        response_deadline,
        &acked_now,
        &mut out,
    )
    .await;
    out.status = parse_status(&head);
    finish(&mut out, fd, base, at_connect, at_accept, acked_now);
    out
}

/// An exchange that has not happened yet: failed until it does.
fn not_yet(request_bytes: u64) -> HttpExchange {
    HttpExchange {
        outcome: HttpOutcome::Failed,
        error: None,
        request_bytes,
        request_acked: None,
        ack_us: None,
        first_byte_us: None,
        status: None,
        data_retransmits: None,
        rtos: None,
        source: Source::Userspace,
        accept_us: None,
        rounds_after_accept: 0,
        retransmits_before_accept: None,
        retransmits_after_accept: None,
    }
}

/// Reads until the status line is in (or the connection ends, or `response_deadline`),
/// meanwhile timing the request's ACK (`acked_now` on `TCP_INFO`): polled fast at first, then
/// slower, not at all once ACKed. Returns what was read.
async fn read_status_line(
    stream: &mut TcpStream,
    fd: RawFd,
    written: Instant,
    response_deadline: Instant,
    acked_now: &impl Fn(Option<TcpInfo>) -> Option<bool>,
    out: &mut HttpExchange,
) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        if out.ack_us.is_none() && acked_now(tcpinfo::read(fd)) == Some(true) {
            out.ack_us = Some(us(written.elapsed()));
        }
        let now = Instant::now();
        if now >= response_deadline {
            out.outcome = HttpOutcome::Timeout;
            break;
        }
        let nap = if out.ack_us.is_some() {
            response_deadline - now
        } else if written.elapsed() < ACK_POLL_FAST_FOR {
            ACK_POLL_FAST
        } else {
            ACK_POLL_SLOW
        };
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) => {
                    out.outcome = if head.is_empty() { HttpOutcome::Closed } else { HttpOutcome::Response };
                    break;
                }
                Ok(n) => {
                    out.first_byte_us.get_or_insert_with(|| us(written.elapsed()));
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(2).any(|w| w == b"\r\n") || head.len() >= STATUS_LINE_MAX {
                        out.outcome = HttpOutcome::Response;
                        break;
                    }
                }
                Err(e) => {
                    out.error = Some(io_errno(&e));
                    out.outcome = if head.is_empty() { HttpOutcome::Failed } else { HttpOutcome::Response };
                    break;
                }
            },
            _ = tokio::time::sleep(nap.min(response_deadline.saturating_duration_since(now))) => {}
        }
    }
    head
}

/// Writes the request a line at a time, each once everything before it was ACKed (see the
/// module doc), until `plan.response_timeout` after `written`. Returns `TCP_INFO` as it was
/// when the first line was ACKed, if it was; counts the later lines in
/// `out.rounds_after_accept`.
async fn send_in_rounds(
    stream: &mut TcpStream,
    fd: RawFd,
    base_acked: Option<u64>,
    plan: &HttpPlan,
    written: Instant,
    out: &mut HttpExchange,
) -> std::io::Result<Option<TcpInfo>> {
    let deadline = written + plan.response_timeout;
    let mut sent = 0u64;
    let mut at_accept = None;
    let mut waiting = true;
    for (k, line) in lines(&plan.request).enumerate() {
        stream.write_all(line).await?;
        sent += line.len() as u64;
        if !waiting {
            continue;
        }
        let Some(info) = wait_acked(fd, base_acked, sent, deadline).await else {
            // Not ACKed in time, or unknown: write the rest at once.
            waiting = false;
            continue;
        };
        if k == 0 {
            out.accept_us = Some(us(written.elapsed()));
            at_accept = Some(info);
        } else {
            out.rounds_after_accept += 1;
        }
    }
    Ok(at_accept)
}

/// The request's lines, each with its CRLF.
fn lines(request: &[u8]) -> impl Iterator<Item = &[u8]> {
    request.split_inclusive(|&b| b == b'\n')
}

/// Polls `TCP_INFO` until `sent` bytes past `base_acked` are ACKed (then returns that read),
/// or `deadline`.
async fn wait_acked(
    fd: RawFd,
    base_acked: Option<u64>,
    sent: u64,
    deadline: Instant,
) -> Option<TcpInfo> {
    let base = base_acked?;
    let start = Instant::now();
    loop {
        let info = tcpinfo::read(fd)?;
        if info.bytes_acked?.saturating_sub(base) >= sent {
            return Some(info);
        }
        if Instant::now() >= deadline {
            return None;
        }
        let nap = if start.elapsed() < ACK_POLL_FAST_FOR {
            ACK_POLL_FAST
        } else {
            ACK_POLL_SLOW
        };
        tokio::time::sleep(nap).await;
    }
}

/// The last `TCP_INFO` read: whether the request was ACKed, data retransmits and RTOs since
/// the connection was established, and those since the first request line was ACKed.
fn finish(
    out: &mut HttpExchange,
    fd: RawFd,
    base: Option<TcpInfo>,
    at_connect: Option<TcpInfo>,
    at_accept: Option<TcpInfo>,
    acked_now: impl Fn(Option<TcpInfo>) -> Option<bool>,
) {
    let end = tcpinfo::read(fd);
    out.request_acked = if out.ack_us.is_some() {
        Some(true)
    } else {
        acked_now(end)
    };
    if let (Some(end), Some(accepted)) = (end, at_accept) {
        out.retransmits_after_accept =
            Some(end.total_retrans.saturating_sub(accepted.total_retrans));
    }
    if let (Some(end), Some(start)) = (end, at_connect.or(base)) {
        out.data_retransmits = Some(end.total_retrans.saturating_sub(start.total_retrans));
        out.rtos = end
            .total_rto
            .zip(start.total_rto)
            .map(|(e, s)| u32::from(e.saturating_sub(s)));
    }
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nx: y"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn loopback_attempts_userspace_view() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let ok = rt.block_on(attempt(open, Duration::from_secs(1), None));
        assert_eq!(ok.result, ConnectResult::Established);
        assert_ne!(ok.cookie, 0, "SO_COOKIE is readable without privileges");
        assert_eq!(ok.syn_retransmits, Some(0));
        drop(listener);
        let closed = rt.block_on(attempt(open, Duration::from_secs(1), None));
        assert_eq!(closed.result, ConnectResult::Failed(libc::ECONNREFUSED));
    }

    #[test]
    fn an_http_exchange_is_timed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        });
        let plan = HttpPlan::get("x", "/", Duration::from_secs(2));
        let r = rt.block_on(attempt(addr, Duration::from_secs(1), Some(&plan)));
        server.join().unwrap();
        let h = r.http.expect("an exchange");
        assert_eq!(h.outcome, HttpOutcome::Response, "{h:?}");
        assert_eq!(h.status, Some(204));
        assert_eq!(h.request_acked, Some(true), "{h:?}");
        assert!(h.ack_us.unwrap() < 50_000, "{h:?}");
        assert!(h.first_byte_us.unwrap() >= 50_000, "{h:?}");
        assert_eq!(h.data_retransmits, Some(0));
        // Six request lines: the first ACK, then five round trips over the connection.
        assert!(h.accept_us.is_some(), "{h:?}");
        assert_eq!(h.rounds_after_accept, 5, "{h:?}");
        assert_eq!(h.retransmits_after_accept, Some(0));
        assert_eq!(h.lost_after_accept(), Some(false));
    }
}
