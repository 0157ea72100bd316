//! Clients for a gateway on loopback: hyper's (HTTP/1.1 or HTTP/2, request bodies of any
//! size, read to the end into a [`Got`]), raw bytes on a fresh connection, one message read
//! off a raw connection ([`read_message`], for tests that hold the socket themselves), and one
//! blocking request per connection ([`request_once`]) for synchronous tests, admin reads and
//! the readiness check: `Connection: close`, no client pool in the way.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body of `n` bytes produced in 64 KiB chunks, never held whole.
pub fn generated(n: u64) -> Body {
    Generated {
        left: n,
        chunk: Bytes::from(vec![b'x'; 64 * 1024]),
    }
    .boxed()
}

struct Generated {
    left: u64,
    chunk: Bytes,
}

impl hyper::body::Body for Generated {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let take = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= take as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

pub type HttpClient = Client<HttpConnector, Body>;

/// One HTTP/2 connection with prior knowledge to `addr` (hyper's client, no pool): its
/// sender, and the task driving it, which ends when the connection is closed.
pub async fn h2c_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Body>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    h2c_over(tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

/// [`h2c_connection`] over a connection already open.
pub async fn h2c_over(
    tcp: tokio::net::TcpStream,
) -> (
    hyper::client::conn::http2::SendRequest<Body>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let (sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake with the gateway");
    (sender, tokio::spawn(conn))
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read to the end.
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }
}

pub async fn send(c: &HttpClient, req: Request<Body>) -> Got {
    let resp = c.request(req).await.expect("response from the gateway");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(c: &HttpClient, addr: SocketAddr, path: &str) -> Got {
    get_host(c, addr, "test.local", path).await
}

pub async fn get_host(c: &HttpClient, addr: SocketAddr, host: &str, path: &str) -> Got {
    let req = Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(empty())
        .unwrap();
    send(c, req).await
}

/// Sends raw bytes on a new connection and returns everything read until the peer closes
/// (or `limit` passes).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// One response to [`request_once`].
#[derive(Debug)]
pub struct BlockingReply {
    pub status: u16,
    pub content_type: String,
    /// Decoded when the response was chunked.
    pub body: String,
}

/// `METHOD path` on a fresh blocking connection to `addr` with `Connection: close`, read to
/// the end within `timeout`; `Err` says what failed (connect, write, read, no HTTP status).
pub fn request_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<BlockingReply, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(BlockingReply {
        status,
        content_type,
        body,
    })
}

/// [`request_once`] with GET: the status and the body.
pub fn get_once(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    request_once(addr, "GET", path, timeout).map(|r| (r.status, r.body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Reads one HTTP/1 message off `s` (its head, and a `Content-Length` body), taking it from
/// the front of `buf`, which keeps what was read beyond it; the head, or `None` at EOF or on
/// a read error.
pub async fn read_message(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return Some(head);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A client that trickles its body: 10 bytes every 200 ms into `pipe` (a curl uploading from
/// its stdin), 25 times, or until the pipe breaks (curl was answered and went away). Under the
/// gateway's minimum rate of 500 bytes a second.
pub fn trickle(pipe: &mut impl std::io::Write) {
    for _ in 0..25 {
        if pipe
            .write_all(&[b'x'; 10])
            .and_then(|()| pipe.flush())
            .is_err()
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A `PUT` declaring 10 MB and 64 KiB of its body: an upload a gateway answers early.
pub fn upload_start() -> Vec<u8> {
    let mut b = b"PUT /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n".to_vec();
    b.extend_from_slice(&[b'x'; 65536]);
    b
}

/// Sends `start` (a request the gateway answers before it has read all of it, such as
/// [`upload_start`]) and keeps sending after the answer as a client that does not read while
/// it writes would: the answer's head read (returned), then 200 ms later ten writes of 16 KiB
/// 50 ms apart, each flushed. Panics if one fails (the gateway reset the connection: its
/// close found unread bytes) or if the stream then ends otherwise than cleanly within 5 s.
pub async fn keep_sending_after_an_early_answer<S>(s: &mut S, start: &[u8]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        time::{sleep, timeout},
    };
    s.write_all(start).await.unwrap();
    s.flush().await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("the answer");
        assert!(n > 0, "the connection ended before the answer: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    // The gateway has written its answer and closed its side by now. Closed at once, with
    // bytes unread, its kernel answers the first write below with a reset, and a later one
    // fails.
    sleep(Duration::from_millis(200)).await;
    for i in 0..10 {
        sleep(Duration::from_millis(50)).await;
        let wrote = async {
            s.write_all(&[b'x'; 16384]).await?;
            s.flush().await
        };
        if let Err(e) = wrote.await {
            panic!("write {i} after the answer failed ({e}): the gateway reset the connection");
        }
    }
    // The client stops sending: the rest of the answer, then the end of the stream.
    let mut rest = Vec::new();
    let end = timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the end of the stream within 5 s");
    assert!(end.is_ok(), "not a clean end: {end:?}");
    String::from_utf8_lossy(&head).into_owned()
}
