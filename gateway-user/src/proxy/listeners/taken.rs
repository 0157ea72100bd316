//! Whether another socket already listens on a client address. The gateway's client sockets
//! set `SO_REUSEPORT` (one per worker), so a second `gateway run` with the same address (a
//! config tried out by hand on a host whose service runs, two units given one port) would bind
//! beside the first one, and the kernel would split new connections between the two processes,
//! each with its own config, without a word. A binary upgrade never binds anew (the sockets are
//! handed over, `service::handover`), so the gateway refuses to start instead, as a server
//! without `SO_REUSEPORT` would (`EADDRINUSE`), and names the process that holds the address
//! when it can see it.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// `Ok` when no socket listens on `addr` (or on a wildcard address of its port, or, for a
/// wildcard `addr`, on any address of its port): a bind without `SO_REUSEPORT` succeeds.
/// `SO_REUSEADDR` lets it succeed beside connections in `TIME_WAIT`, as after a restart.
pub(super) fn check(addr: SocketAddr) -> io::Result<()> {
    match super::socket(addr)?.bind(&addr.into()) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let what = holder(addr).map_or_else(
                || "the address is in use".to_owned(),
                |h| format!("another socket already listens there ({h})"),
            );
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{what}: a second process on the address would take a share of its connections. Stop that one first, or use another address; to replace a running gateway without a gap, send it SIGUSR2"
                ),
            ))
        }
        other => other,
    }
}

/// The process holding the listening socket on `addr`: `pid 123, nginx`. Best effort: `None`
/// when `/proc` does not show it (another user's process, for a caller without root).
fn holder(addr: SocketAddr) -> Option<String> {
    // An IPv4 address may be taken by a dual-stack IPv6 socket (`[::]:P`, or `::ffff:a.b.c.d`).
    let tables: &[&str] = if addr.is_ipv6() {
        &["/proc/net/tcp6"]
    } else {
        &["/proc/net/tcp", "/proc/net/tcp6"]
    };
    let inode = tables.iter().find_map(|t| {
        let text = std::fs::read_to_string(t).ok()?;
        text.lines().skip(1).find_map(|l| listening_inode(l, addr))
    })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        // Processes only (not `self`, which would name this one).
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == &*target));
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("pid {pid}, {}", comm.trim()));
        }
    }
    None
}

/// The inode of a `/proc/net/tcp{,6}` line when it is a listening socket that conflicts with
/// `addr`: the same port, and the same address or a wildcard on either side.
fn listening_inode(line: &str, addr: SocketAddr) -> Option<u64> {
    let f: Vec<&str> = line.split_whitespace().collect();
    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    if f.len() < 10 || f[3] != "0A" {
        return None;
    }
    let (ip, port) = f[1].split_once(':')?;
    if u16::from_str_radix(port, 16).ok()? != addr.port() {
        return None;
    }
    let ip = parse_ip(ip)?.to_canonical();
    let conflicts = ip == addr.ip() || ip.is_unspecified() || addr.ip().is_unspecified();
    conflicts.then(|| f[9].parse().ok()).flatten()
}

/// The kernel prints an address as 32-bit words in the host's byte order.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_on_the_address_is_found_and_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let e = check(addr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let me = format!("pid {}, ", std::process::id());
        assert!(e.to_string().contains(&me), "{e}");
        drop(l);
        check(addr).unwrap();
    }

    #[test]
    fn proc_net_tcp_lines_parse() {
        let v4 = "   0: 0100007F:A46F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1";
        let a: SocketAddr = "127.0.0.1:42095".parse().unwrap();
        assert_eq!(listening_inode(v4, a), Some(123456));
        let any: SocketAddr = "0.0.0.0:42095".parse().unwrap();
        assert_eq!(listening_inode(v4, any), Some(123456));
        let other: SocketAddr = "127.0.0.2:42095".parse().unwrap();
        assert_eq!(listening_inode(v4, other), None);
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(listening_inode(&established, a), None);
        // A dual-stack socket on `[::]`: an IPv4 address of its port is taken.
        let dual = v4.replace("0100007F:A46F", "00000000000000000000000000000000:A46F");
        assert_eq!(listening_inode(&dual, a), Some(123456));
        // The words of `::ffff:127.0.0.1` and of `::1` as a little-endian kernel prints them.
        #[cfg(target_endian = "little")]
        {
            let mapped = v4.replace("0100007F:A46F", "0000000000000000FFFF00000100007F:A46F");
            assert_eq!(listening_inode(&mapped, a), Some(123456));
        }
        #[cfg(target_endian = "little")]
        assert_eq!(
            parse_ip("00000000000000000000000001000000"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
    }
}
