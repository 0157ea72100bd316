//! The file descriptor limit (`RLIMIT_NOFILE`). A proxied request holds two descriptors, its
//! client connection and its upstream one, and the soft limit a process is started with is
//! often 1,024: a shell's, a container's under containerd 2 (which no longer raises it), or a
//! unit's without `LimitNOFILE=`. At that limit the gateway serves about 500 connections at
//! once and answers the rest `503 fd_exhausted`. The hard limit is usually far higher, and a
//! process may raise its own soft limit up to it without privilege, as Go's runtime does at
//! start: `gateway run` does so, and says so. When even the hard limit is below what the
//! config's limits allow open at once, it warns at start and on each reload.

use crate::config::Settings;

/// Descriptors kept for everything but proxied connections: listeners (one per worker and
/// address), the admin listener and its connections (at most 128), the observer's maps and
/// ring buffer, the log and access log files, the runtimes' epoll and event descriptors.
pub const RESERVE: u64 = 256;

/// The soft limit before and after [`raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nofile {
    pub before: u64,
    pub now: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (bounded by `fs.nr_open`, the most
/// Linux lets a process open).
pub fn raise() -> std::io::Result<Nofile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let target = lim.rlim_max.min(nr_open().unwrap_or(lim.rlim_max));
    if target <= before {
        return Ok(Nofile {
            before,
            now: before,
        });
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit reads `lim`; a soft limit up to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Nofile {
        before,
        now: target,
    })
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The warning when `limit` is below what `settings` allow open at once: every cluster's
/// `max_connections`, `max_client_connections` when set, and [`RESERVE`]. `None` when it
/// suffices (or, client connections being unlimited, when the rest fits).
pub fn shortfall(limit: u64, settings: &Settings) -> Option<String> {
    let upstream: u64 = settings
        .clusters
        .values()
        .map(|c| c.limits.max_connections as u64)
        .sum();
    let clients = settings.downstream.max_client_connections.map(|n| n as u64);
    let needed = upstream + clients.unwrap_or(0) + RESERVE;
    if needed <= limit {
        return None;
    }
    let clients = match clients {
        Some(n) => format!("max_client_connections {n}"),
        None => "client connections, unlimited (max_client_connections)".to_string(),
    };
    Some(format!(
        "the file descriptor limit is {limit}, below what this config's limits allow open at \
         once: {needed} (the clusters' max_connections {upstream}, {clients}, {RESERVE} for \
         listeners, admin and logs); past the limit new connections are answered 503 \
         fd_exhausted; raise the hard limit (LimitNOFILE= in the unit, ulimit -Hn)"
    ))
}

/// The soft limit now.
pub fn current() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Settings {
        let text = format!(
            "[router]\nlisten = [\"127.0.0.1:0\"]\n[router.upstream]\nendpoints = \
             [\"127.0.0.1:1\"]\n[clusters.b]\nendpoints = [\"127.0.0.1:2\"]\n{extra}"
        );
        crate::config::load_str(&text, std::path::Path::new("gw.toml"))
            .expect("valid")
            .settings
    }

    #[test]
    fn the_limit_is_compared_with_every_cluster_and_the_clients() {
        // Two clusters of the default 1,024 connections, clients unlimited.
        let s = settings("");
        let w = shortfall(2_000, &s).expect("2,048 + 256 > 2,000");
        assert!(
            w.contains("2304 (the clusters' max_connections 2048, client connections, unlimited"),
            "{w}"
        );
        assert_eq!(shortfall(2_304, &s), None);
        let s = settings("[router.downstream]\nmax_client_connections = 1000\n");
        let w = shortfall(3_000, &s).expect("2,048 + 1,000 + 256 > 3,000");
        assert!(
            w.contains("3304") && w.contains("max_client_connections 1000"),
            "{w}"
        );
        assert_eq!(shortfall(3_304, &s), None);
    }
}
