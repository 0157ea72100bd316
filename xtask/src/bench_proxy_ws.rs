//! The WebSocket echo row of `cargo xtask bench proxy`: messages per second through each
//! proxy to one WebSocket echo upstream, the gateway against nginx (`proxy_http_version 1.1`
//! with `Upgrade`/`Connection` passed on) and HAProxy (`timeout tunnel`), repetitions
//! interleaved as in the other rows; medians of messages per second and of each proxy's CPU
//! time per message, and the ratios.
//!
//! The echo upstream and the load generator are here because nothing installable is faster
//! than the proxies (the Python `websockets` of the tests is not). The upgrade is hyper's on
//! both sides (server `with_upgrades`, client `http1::handshake`); after the 101 the bytes are
//! RFC 6455 frames, which are small enough to write here. Each client connection checks the
//! upstream's `Sec-WebSocket-Accept`, then keeps [`WINDOW`] masked 128-byte text messages in
//! flight: one more is sent for each echo received, and each echo is compared with what was
//! sent. A run opens its connections anew, so the upgrade is part of what is measured (a small
//! part: each connection carries thousands of messages).

use std::{
    convert::Infallible,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

use crate::bench_peers::Trio;

/// Client connections per run.
const CONNECTIONS: usize = 32;
/// Messages in flight per connection.
const WINDOW: usize = 8;
/// Bytes of each message.
const MESSAGE: usize = 128;
/// The key of RFC 6455's example handshake; any 16 bytes in base64 would do.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 section 4.2.2).
fn accept_key(key: &[u8]) -> String {
    let mut input = key.to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// One frame as read: its opcode and unmasked payload.
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    if len > 1 << 20 {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Frame { opcode, payload })
}

/// A final frame; masked (as a client must) when `mask` is given.
fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Echoes every data frame back, answers pings, and returns a close.
async fn echo(io: impl AsyncRead + AsyncWrite + Unpin) -> std::io::Result<()> {
    let (r, mut w) = tokio::io::split(io);
    let mut r = BufReader::with_capacity(64 * 1024, r);
    loop {
        let f = read_frame(&mut r).await?;
        match f.opcode {
            0x8 => return w.write_all(&frame(0x8, &f.payload, None)).await,
            0x9 => w.write_all(&frame(0xA, &f.payload, None)).await?,
            0xA => {}
            op => w.write_all(&frame(op, &f.payload, None)).await?,
        }
    }
}

/// The upstream's answer to an upgrade: 101 with the accept key, then [`echo`] on the
/// upgraded connection; 400 without a key.
async fn upgrade(
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        let mut bad = Response::new(Empty::new());
        *bad.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(bad);
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on.await {
            let _ = echo(TokioIo::new(upgraded)).await;
        }
    });
    let resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(key.as_bytes()))
        .body(Empty::new())
        .expect("a valid response");
    Ok(resp)
}

/// The echo upstream on a runtime of its own thread; its port.
fn start_echo_server() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener).expect("a tokio listener");
            while let Ok((conn, _)) = listener.accept().await {
                let _ = conn.set_nodelay(true);
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), service_fn(upgrade))
                        .with_upgrades(),
                );
            }
        });
    });
    Ok(port)
}

/// One client connection until `stop`: hyper's upgrade, then [`WINDOW`] messages in flight.
/// Returns the echoes received, each checked against what was sent.
async fn client(port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connecting")?;
    tcp.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .uri("/echo")
        .header(header::HOST, format!("127.0.0.1:{port}"))
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_KEY, KEY)
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .body(Empty::<Bytes>::new())?;
    let resp = send
        .send_request(req)
        .await
        .context("sending the upgrade")?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        bail!("the upgrade was answered {}", resp.status());
    }
    let expected = accept_key(KEY.as_bytes());
    if resp
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        bail!("wrong sec-websocket-accept in {:?}", resp.headers());
    }
    let io = TokioIo::new(hyper::upgrade::on(resp).await?);
    let (r, mut w) = tokio::io::split(io);
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let message = vec![b'x'; MESSAGE];
    let out = frame(0x1, &message, Some([0x37, 0xfa, 0x21, 0x3d]));
    for _ in 0..WINDOW {
        w.write_all(&out).await?;
    }
    let (mut received, mut in_flight) = (0u64, WINDOW);
    while in_flight > 0 {
        let f = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut r))
            .await
            .context("no echo within 10 s")?
            .context("reading an echo")?;
        if f.opcode != 0x1 || f.payload != message {
            bail!("the echo differs from the message (opcode {})", f.opcode);
        }
        received += 1;
        in_flight -= 1;
        if !stop.load(Ordering::Relaxed) {
            w.write_all(&out).await?;
            in_flight += 1;
        }
    }
    w.write_all(&frame(0x8, &1000u16.to_be_bytes(), Some([1, 2, 3, 4])))
        .await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), read_frame(&mut r)).await;
    Ok(received)
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct WsSample {
    msgs_per_s: f64,
    cpu_us_per_msg: f64,
}

/// [`CONNECTIONS`] clients against `port` for `secs` on `rt`; the CPU time of `pids`
/// meanwhile.
fn run_load(
    rt: &tokio::runtime::Runtime,
    port: u16,
    secs: u64,
    pids: &[u32],
) -> anyhow::Result<WsSample> {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = crate::bench::cpu_ticks(pids);
    let start = Instant::now();
    let total = rt.block_on(async {
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|_| tokio::spawn(client(port, stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for c in clients {
            total += c.await.context("a client task panicked")??;
        }
        anyhow::Ok(total)
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = crate::bench::cpu_ticks(pids).saturating_sub(cpu0) as f64
        / crate::bench::ticks_per_second();
    Ok(WsSample {
        msgs_per_s: total as f64 / elapsed,
        cpu_us_per_msg: cpu * 1e6 / total.max(1) as f64,
    })
}

fn nginx_conf(dir: &Path, port: u16, up: u16) -> String {
    format!(
        "worker_processes auto;\ndaemon off;\npid {d}/ws-nginx.pid;\nerror_log {d}/ws-nginx.err warn;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  \
         upstream backend {{ server 127.0.0.1:{up}; }}\n  \
         server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    \
         location / {{ proxy_pass http://backend; proxy_http_version 1.1; \
         proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; \
         proxy_read_timeout 300s; }}\n  }}\n}}\n",
        d = dir.display()
    )
}

fn haproxy_conf(port: u16, up: u16, cores: usize) -> String {
    format!(
        "global\n  nbthread {cores}\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 5s\n  \
         timeout client 30s\n  timeout server 30s\n  timeout tunnel 300s\nfrontend fe\n  \
         bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  server u0 127.0.0.1:{up}\n"
    )
}

fn gateway_conf(port: u16, up: u16) -> String {
    format!(
        "[router]\nlisten = [\"127.0.0.1:{port}\"]\ndrain_delay_ms = 0\n\n[router.upstream]\n\
         endpoints = [\"127.0.0.1:{up}\"]\n\n[admin]\nenabled = false\n\n\
         [access_log]\noutput = \"off\"\n"
    )
}

/// The row: starts the echo upstream and the three proxies, measures, prints the table.
pub(crate) fn run(
    gateway: &Path,
    dir: &Path,
    reps: usize,
    secs: u64,
    warmup: u64,
) -> anyhow::Result<()> {
    use crate::bench::{cores, free_port, median};
    let up = start_echo_server()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ports = [free_port()?, free_port()?, free_port()?];
    let confs = [
        gateway_conf(ports[0], up),
        nginx_conf(dir, ports[1], up),
        haproxy_conf(ports[2], up, cores()),
    ];
    let mut trio = Trio::start("ws", gateway, dir, confs, ports)?;
    let pids = trio.pids();
    println!();
    println!(
        "WebSocket echo: {CONNECTIONS} connections, {WINDOW} messages of {MESSAGE} bytes in flight each, {secs}s per run, one echo upstream; {reps} interleaved repetitions"
    );
    let samples = crate::bench::rotate(
        &Trio::NAMES,
        (reps, secs, warmup),
        &mut || trio.check_alive(),
        &mut |i, secs| run_load(&rt, ports[i], secs, &pids[i]),
        &|s: &WsSample| {
            format!(
                "{:>10.0} msg/s  cpu {:>6.2} us/msg",
                s.msgs_per_s, s.cpu_us_per_msg
            )
        },
    )?;
    let med = |i: usize, f: fn(&WsSample) -> f64| median(samples[i].iter().map(f).collect());
    println!();
    println!("{:<10} {:>12} {:>12}", "ws proxy", "msg/s", "CPU us/msg");
    for (i, name) in Trio::NAMES.iter().enumerate() {
        println!(
            "{:<10} {:>12.0} {:>12.2}",
            name,
            med(i, |s| s.msgs_per_s),
            med(i, |s| s.cpu_us_per_msg)
        );
    }
    println!();
    for (j, other) in [(1, "nginx"), (2, "haproxy")] {
        println!(
            "ws: gateway/{other:<8} msg/s {:.3}  CPU/msg {:.3}",
            med(0, |s| s.msgs_per_s) / med(j, |s| s.msgs_per_s),
            med(0, |s| s.cpu_us_per_msg) / med(j, |s| s.cpu_us_per_msg),
        );
    }
    drop(trio);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        assert_eq!(accept_key(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[tokio::test]
    async fn frames_read_back_as_written() {
        for len in [0, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([9, 8, 7, 6])] {
                let bytes = frame(0x2, &payload, mask);
                let f = read_frame(&mut bytes.as_slice()).await.unwrap();
                assert_eq!((f.opcode, f.payload.len()), (0x2, len));
                assert_eq!(f.payload, payload);
            }
        }
    }

    #[tokio::test]
    async fn the_echo_server_and_client_talk_directly() {
        let up = start_echo_server().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let c = tokio::spawn(client(up, stop.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let n = c.await.unwrap().unwrap();
        assert!(n >= WINDOW as u64, "{n} echoes");
    }
}
