//! A TCP client for the observer's tests, run inside the lab's client namespace and cgroup.
//! It connects the way real programs do and prints one JSON line per attempt with the
//! socket's `SO_COOKIE` (read before `connect()`), so a test can find the kernel's record of
//! exactly that attempt and compare what the application saw with what the observer saw.
//!
//! `connect-probe STYLE ADDR [--timeout-ms N] [--count N] [--keep]`
//!
//! | STYLE | how it connects |
//! |---|---|
//! | `go` | non-blocking connect, poll for POLLOUT, `getsockopt(SO_ERROR)` (Go's net package) |
//! | `tokio` | `tokio::net::TcpSocket::connect` (mio; reads SO_ERROR through `take_error`) |
//! | `blocking` | a plain blocking `connect()`; never reads SO_ERROR |
//! | `reconnect` | `connect()` to `--first ADDR` (refused), then again on the same socket to ADDR, arranged so that the observer's table (`--slots N`, default 4) keeps only the first connect's record (`reconnect_style`) |
//!
//! With `--timeout-ms`, `go` and `tokio` give up and close the socket (a userspace connect
//! timeout); `--keep` keeps every connected socket open until the process exits (to exhaust
//! ephemeral ports). `--send N` writes N bytes on each connected socket after `--pause-ms`,
//! then keeps it open `--hold-ms` before closing (the line is printed before the pause, so a
//! test can inject a fault on the established connection); with `--abort` that close is an
//! abort (`SO_LINGER` 0: a RST, ESTABLISHED → CLOSE).

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

fn cookie(fd: RawFd) -> u64 {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v/len are valid out-parameters of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if rc != 0 { 0 } else { v }
}

fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => gateway_common::errno::name(n as u32)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("E{n}")),
        None if e.kind() == io::ErrorKind::TimedOut => "userspace_timeout".to_owned(),
        None => e.to_string(),
    }
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
}

/// Go's pattern: EINPROGRESS, poll, then SO_ERROR.
fn go_style(addr: SocketAddr, timeout: Option<Duration>) -> (u64, Result<Socket, io::Error>) {
    let sock = match new_socket(addr) {
        Ok(s) => s,
        Err(e) => return (0, Err(e)),
    };
    let c = cookie(sock.as_raw_fd());
    if let Err(e) = sock.set_nonblocking(true) {
        return (c, Err(e));
    }
    match sock.connect(&addr.into()) {
        Ok(()) => return (c, Ok(sock)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return (c, Err(e)),
    }
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.map(|t| t.as_millis() as i32).unwrap_or(-1);
    // SAFETY: pfd is a valid pollfd array of length 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n == 0 {
        // The userspace deadline passed: close while still in SYN_SENT.
        drop(sock);
        return (
            c,
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "userspace connect timeout",
            )),
        );
    }
    match sock.take_error() {
        Ok(None) => (c, Ok(sock)),
        Ok(Some(e)) => (c, Err(e)),
        Err(e) => (c, Err(e)),
    }
}

fn tokio_style(addr: SocketAddr, timeout: Option<Duration>) -> (u64, Result<Socket, io::Error>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let sock = match if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        } {
            Ok(s) => s,
            Err(e) => return (0, Err(e)),
        };
        let c = cookie(sock.as_raw_fd());
        let fut = sock.connect(addr);
        let res = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "userspace connect timeout",
                )),
            },
            None => fut.await,
        };
        (c, res.and_then(|s| s.into_std()).map(Socket::from))
    })
}

fn blocking_style(addr: SocketAddr) -> (u64, Result<Socket, io::Error>) {
    let sock = match new_socket(addr) {
        Ok(s) => s,
        Err(e) => return (0, Err(e)),
    };
    let c = cookie(sock.as_raw_fd());
    let r = sock.connect(&addr.into());
    (c, r.map(|()| sock))
}

/// A socket whose cookie's low bits (`mask`) are `low`: sockets are made until one has them
/// (cookies count up, so within a few); the others are closed unconnected, which leaves no
/// record in the observer's table.
fn socket_in_slot(mask: u64, low: u64) -> Socket {
    loop {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        if cookie(s.as_raw_fd()) & mask == low {
            return s;
        }
    }
}

/// One socket that connects twice, arranged so that the observer's table (of `slots` records,
/// four candidates each) keeps its first, failed connect behind its second: a connect held in
/// SYN_SENT (to a full listener of our own) occupies the socket's first candidate while it
/// connects to `first` (refused), so that record goes to a later candidate; the held connect
/// is closed, the socket connects to `addr` (its record in the first candidate, now free), and
/// one more connect whose cookie shares those low bits takes that slot. What is left of the
/// socket in the table is its failed first connect.
fn reconnect_style(addr: SocketAddr, first: SocketAddr, slots: u64) -> (u64, io::Result<Socket>) {
    let mask = slots - 1;
    let sock = new_socket(addr).expect("socket");
    let c = cookie(sock.as_raw_fd());
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    listener.listen(0).expect("listen");
    let full = listener.local_addr().expect("local_addr");
    // Backlog 0 holds one connection: every SYN after it is dropped.
    let _queued = std::net::TcpStream::connect(full.as_socket().expect("inet")).expect("filler");
    let held = socket_in_slot(mask, c & mask);
    held.set_nonblocking(true).expect("nonblocking");
    match held.connect(&full) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        other => panic!("connect to a full listener: expected EINPROGRESS, got {other:?}"),
    }
    match sock.connect(&first.into()) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        other => panic!("the first connect: expected ECONNREFUSED, got {other:?}"),
    }
    drop(held);
    if let Err(e) = sock.connect(&addr.into()) {
        return (c, Err(e));
    }
    let _ = socket_in_slot(mask, c & mask).connect(&first.into());
    (c, Ok(sock))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: connect-probe go|tokio|blocking|reconnect ADDR [--first ADDR] [--slots N] [--timeout-ms N] [--count N] [--keep] [--send N [--pause-ms N] [--hold-ms N] [--abort]]";
    let (Some(style), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|e| {
        eprintln!("bad address {addr}: {e}");
        std::process::exit(2)
    });
    let mut timeout = None;
    let mut first = None;
    let mut slots = 4u64;
    let mut count = 1usize;
    let (mut keep, mut abort) = (false, false);
    let (mut send, mut pause, mut hold) = (0usize, 0u64, 0u64);
    let mut it = args[2..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--timeout-ms" => {
                timeout = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
            }
            "--count" => count = it.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--keep" => keep = true,
            "--first" => first = it.next().and_then(|v| v.parse::<SocketAddr>().ok()),
            "--slots" => slots = it.next().and_then(|v| v.parse().ok()).unwrap_or(4),
            "--abort" => abort = true,
            "--send" => send = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--pause-ms" => pause = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--hold-ms" => hold = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            other => {
                eprintln!("unknown argument {other}; {usage}");
                std::process::exit(2);
            }
        }
    }
    let mut kept = Vec::new();
    for _ in 0..count {
        let start = Instant::now();
        let (c, res) = match style.as_str() {
            "go" => go_style(addr, timeout),
            "tokio" => tokio_style(addr, timeout),
            "blocking" => blocking_style(addr),
            "reconnect" => {
                reconnect_style(addr, first.expect("reconnect needs --first ADDR"), slots)
            }
            other => {
                eprintln!("unknown style {other}; {usage}");
                std::process::exit(2);
            }
        };
        let elapsed_us = start.elapsed().as_micros() as u64;
        let result = match &res {
            Ok(_) => "ok".to_owned(),
            Err(e) => errno_text(e),
        };
        println!(
            "{}",
            serde_json::json!({ "pid": std::process::id(), "cookie": c, "result": result, "elapsed_us": elapsed_us })
        );
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        if let (Ok(s), true) = (&res, send > 0) {
            std::thread::sleep(Duration::from_millis(pause));
            let _ = s.set_nonblocking(false);
            let _ = (&*s).write_all(&vec![b'x'; send]);
            std::thread::sleep(Duration::from_millis(hold));
            if abort {
                let _ = s.set_linger(Some(Duration::ZERO));
            }
        }
        if let (Ok(s), true) = (res, keep) {
            kept.push(s);
        }
    }
    drop(kept);
}
