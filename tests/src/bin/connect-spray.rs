//! Blocking TCP connects in bulk, for the observer's capacity tests: to `--count` distinct
//! loopback destinations counting up from `--first` (port `--port`), or all to the one
//! destination with `--same`. Nothing listens there, so each connect is refused at once and
//! its port is free again. Prints the number of connects made.
//!
//! `connect-spray [--first 127.1.0.0] [--port 9] [--count N] [--same] [--cgroup DIR]
//! [--netns-optmem BYTES]`
//!
//! `--cgroup` moves the process into that cgroup v2 first (so an observer attached there sees
//! it). `--netns-optmem` then moves it into a new network namespace of its own and sets that
//! namespace's `net.core.optmem_max` (never the host's): the kernel charges each socket's
//! `sk_storage` against it, so a tiny value makes every storage allocation fail. The new
//! namespace's loopback is down, so connects fail with ENETUNREACH, after the cgroup connect
//! hooks have run.

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
    let mut optmem = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--first" => first = value().parse().expect("--first IPV4"),
            "--port" => port = value().parse().expect("--port N"),
            "--count" => count = value().parse().expect("--count N"),
            "--same" => same = true,
            "--cgroup" => cgroup = Some(value()),
            "--netns-optmem" => optmem = Some(value()),
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
    if let Some(bytes) = optmem {
        // SAFETY: unshare has no memory-safety preconditions.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        // /proc/sys/net is the calling task's network namespace: this is the new one's.
        std::fs::write("/proc/sys/net/core/optmem_max", bytes).expect("setting optmem_max");
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
