//! Blocking TCP connects in bulk, for the observer's capacity tests: to `--count` distinct
//! loopback destinations counting up from `--first` (port `--port`), or all to the one
//! destination with `--same`. Nothing listens there, so each connect is refused at once and
//! its port is free again. Prints the number of connects made.
//!
//! `connect-spray [--first 127.1.0.0] [--port 9] [--count N] [--same] [--cgroup DIR]
//! [--in-flight [--meanwhile M]]`
//!
//! `--cgroup` moves the process into that cgroup v2 first (so an observer attached there sees
//! it). `--in-flight` instead makes `--count` connects that are all unanswered at once, to
//! `--first`: it listens there (a port of its own, backlog 0), fills the listener's accept
//! queue with one connection it never accepts, so that the kernel drops every further SYN,
//! starts the connects without blocking, holds them in SYN_SENT for 300 ms and closes them.
//! `--meanwhile M` also makes M blocking connects to `--first`:`--port` while they are held
//! (refused, when nothing listens there).

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
};

fn main() {
    let mut first = Ipv4Addr::new(127, 1, 0, 0);
    let mut port = 9u16;
    let mut count = 1u32;
    let mut same = false;
    let mut cgroup = None;
    let mut in_flight = false;
    let mut meanwhile = 0u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--first" => first = value().parse().expect("--first IPV4"),
            "--port" => port = value().parse().expect("--port N"),
            "--count" => count = value().parse().expect("--count N"),
            "--same" => same = true,
            "--cgroup" => cgroup = Some(value()),
            "--in-flight" => in_flight = true,
            "--meanwhile" => meanwhile = value().parse().expect("--meanwhile N"),
            other => panic!("unknown argument {other}"),
        }
    }
    if let Some(dir) = cgroup {
        std::fs::write(
            format!("{dir}/cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap_or_else(|e| panic!("entering cgroup {dir}: {e}"));
    }
    if in_flight {
        let made = unanswered(first, count, SocketAddr::from((first, port)), meanwhile);
        let _ = writeln!(std::io::stdout(), "{made}");
        return;
    }
    let base = u32::from(first);
    let mut made = 0u32;
    for i in 0..count {
        let ip = if same {
            first
        } else {
            Ipv4Addr::from(base + i)
        };
        let _ = TcpStream::connect(SocketAddr::from((ip, port)));
        made += 1;
    }
    let _ = writeln!(std::io::stdout(), "{made}");
}

/// `count` connects to `ip` in SYN_SENT at the same time, and `meanwhile` connects to `other`
/// while they are; see `--in-flight`.
fn unanswered(ip: Ipv4Addr, count: u32, other: SocketAddr, meanwhile: u32) -> u32 {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    listener
        .bind(&SocketAddr::from((ip, 0)).into())
        .expect("bind");
    listener.listen(0).expect("listen");
    let at = listener
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("an inet address");
    // Backlog 0 holds one connection: the queue is full once it is there.
    let _queued = TcpStream::connect(at).expect("the connection that fills the queue");
    let mut held = Vec::new();
    for _ in 0..count {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.set_nonblocking(true).expect("nonblocking");
        match s.connect(&at.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => held.push(s),
            other => panic!("connect to a full listener: expected EINPROGRESS, got {other:?}"),
        }
    }
    for _ in 0..meanwhile {
        let _ = TcpStream::connect(other);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let made = held.len() as u32;
    drop(held);
    made
}
