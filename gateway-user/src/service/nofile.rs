//! The file descriptor limit (`RLIMIT_NOFILE`). A proxied request holds two descriptors, its
//! client connection and its upstream one, and the soft limit a process is started with is
//! often 1,024: a shell's, a container's under containerd 2 (which no longer raises it), or a
//! unit's without `LimitNOFILE=`. At that limit the gateway serves about 500 connections at
//! once and answers the rest `503 overloaded`. The hard limit is usually far higher, and a
//! process may raise its own soft limit up to it without privilege, as Go's runtime does at
//! start: `gateway run` does so, and says so. When even the hard limit is below what the
//! config's limits allow open at once, it warns at start and on each reload.

use tracing::{info, warn};

use crate::config::Settings;

/// At start: the soft limit up to the hard one, said in the log, and the warning of
/// [`shortfall`] when even that is short.
pub fn raise_at_start(settings: &Settings, workers: usize) {
    match raise() {
        Ok(n) if n.now > n.before => info!(
            from = n.before,
            to = n.now,
            "file descriptors: raised the soft limit to the hard limit"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "file descriptors: cannot raise the soft limit"),
    }
    warn_shortfall(settings, workers);
}

/// The warning of [`shortfall`] for the limit now in force, if any (at start, and after a
/// reload).
pub fn warn_shortfall(settings: &Settings, workers: usize) {
    if let Some(w) = current().and_then(|l| shortfall(l, settings, workers)) {
        warn!("{w}");
    }
}

/// Descriptors for everything but proxied connections and the workers' own: the admin
/// listener's connections (at most 128), the observer's maps and ring buffer, the log files,
/// the main thread's runtime, DNS lookups.
pub const RESERVE: u64 = 256;

/// Each worker's own, per client listener address: its `SO_REUSEPORT` socket, the copy kept
/// for a binary upgrade, and its accept loop's spare descriptor.
const PER_WORKER_ADDRESS: u64 = 3;

/// Each worker's own besides: its runtime's epoll and wake-up descriptors, its parking lot's
/// epoll.
const PER_WORKER: u64 = 3;

/// The soft limit before and after [`raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nofile {
    pub before: u64,
    pub now: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (bounded by `fs.nr_open`, the most
/// Linux lets a process open).
pub fn raise() -> std::io::Result<Nofile> {
    let mut lim = limits()?;
    let before = lim.rlim_cur;
    let target = lim.rlim_max.min(nr_open().unwrap_or(lim.rlim_max));
    if target <= before {
        return Ok(Nofile {
            before,
            now: before,
        });
    }
    // The kernel refuses a hard limit above `fs.nr_open` (lowered since the limit was set),
    // even unchanged: the hard limit comes down to it too, which needs no privilege.
    lim.rlim_cur = target;
    lim.rlim_max = target;
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
/// `max_connections`; the client connections, `max_client_connections` when set, else at
/// least one behind each upstream connection; the workers' own descriptors; and
/// [`RESERVE`]. `None` when it suffices.
pub fn shortfall(limit: u64, settings: &Settings, workers: usize) -> Option<String> {
    let upstream: u64 = settings
        .clusters
        .values()
        .map(|c| c.limits.max_connections as u64)
        .sum();
    let (clients, said) = match settings.downstream.max_client_connections {
        Some(n) => (n as u64, format!("max_client_connections {n}")),
        None => (
            upstream,
            format!(
                "{upstream} client connections behind them (max_client_connections is unlimited)"
            ),
        ),
    };
    let addresses = settings.listen.len() + settings.https.as_ref().map_or(0, |h| h.listen.len());
    let own = workers as u64 * (PER_WORKER + PER_WORKER_ADDRESS * addresses as u64) + RESERVE;
    let needed = upstream + clients + own;
    if needed <= limit {
        return None;
    }
    Some(format!(
        "the file descriptor limit is {limit}, below what this config's limits allow open at \
         once: {needed} (the clusters' max_connections {upstream}, {said}, {own} for {workers} \
         worker(s), the listeners, admin and logs); past the limit a request is answered 503 \
         overloaded (Too many open files) and a new connection may be closed at once; raise \
         the hard limit (LimitNOFILE= in the unit, ulimit -Hn) or lower the limits"
    ))
}

/// The soft limit now (`process_max_fds` too).
pub fn current() -> Option<u64> {
    limits().ok().map(|l| l.rlim_cur)
}

/// The soft and hard `RLIMIT_NOFILE`.
fn limits() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
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
    fn the_limit_is_compared_with_every_cluster_the_clients_and_the_workers() {
        // Two clusters of the default 1,024 connections, clients unlimited (so at least one
        // behind each), 2 workers on one address (12) and the reserve (256).
        let s = settings("");
        let w = shortfall(4_363, &s, 2).expect("2,048 + 2,048 + 268 > 4,363");
        assert!(
            w.contains("4364 (the clusters' max_connections 2048, 2048 client connections behind them (max_client_connections is unlimited), 268 for 2 worker(s)"),
            "{w}"
        );
        assert_eq!(shortfall(4_364, &s, 2), None);
        let s = settings("[router.downstream]\nmax_client_connections = 1000\n");
        let w = shortfall(3_000, &s, 2).expect("2,048 + 1,000 + 268 > 3,000");
        assert!(
            w.contains("3316") && w.contains("max_client_connections 1000"),
            "{w}"
        );
        assert_eq!(shortfall(3_316, &s, 2), None);
        // 96 workers: their own descriptors count.
        assert!(shortfall(4_364, &settings(""), 96).is_some());
    }
}
