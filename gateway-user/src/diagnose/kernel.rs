//! Kernel signals for the probes: `diagnose`'s view of the observer stream
//! (`crate::observer::stream`), attached to `diagnose`'s own cgroup (see [`super::cgroup`]),
//! with the records of the probes by `SO_COOKIE`. Any step that fails (no privileges, no BTF,
//! no cgroup v2, a verifier rejection) turns kernel signals off with the reason, and `diagnose`
//! carries on with userspace timing.

use std::{path::Path, time::Duration};

use gateway_common::ConnStats;
use thiserror::Error;

use super::cgroup::{self, SelfCgroup, SelfCgroupError};
use crate::observer::{
    KernelObserver, ObserverError, ObserverOptions,
    preflight::{self, PreflightError},
    records::Connect,
    stream::{DEFAULT_JOIN_WINDOW, Drained, ObserverStream, StreamOptions},
};

/// How long to wait, after the last probe, for records still on their way.
pub const SETTLE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often [`KernelSession::settle`] drains while it waits.
const SETTLE_POLL: Duration = Duration::from_millis(10);
/// Kernel table sizes: a diagnose run touches a handful of destinations.
const MAX_DESTINATIONS: u32 = 256;
const MAX_CONNECTIONS: u32 = 4096;
/// Records kept by cookie: every attempt of the run is looked up at its end, however long the
/// run took (`--count` up to 1000 per address).
const MAX_RECORDS: usize = 1 << 20;

/// Why kernel signals are off.
#[derive(Debug, Error)]
pub enum KernelUnavailable {
    #[error("{0}")]
    Privileges(#[source] PreflightError),
    #[error("could not set up a cgroup to observe the probes from: {0}")]
    Cgroup(#[source] SelfCgroupError),
    #[error("could not attach the kernel observer: {0}")]
    // Boxed: the verifier's log makes it large, and it is the rare path.
    Observer(#[source] Box<ObserverError>),
    #[error("turned off with --no-kernel")]
    Disabled,
}

/// The attached observer, read as a stream, and the cgroup it watches.
pub struct KernelSession {
    // Fields drop in order: the observer detaches, then the process leaves the cgroup.
    stream: ObserverStream,
    /// `diagnose` only looks records up: what each drain completes is dropped.
    drained: Drained,
    cgroup: SelfCgroup,
}

impl KernelSession {
    /// Moves this process into a cgroup of its own and attaches the observer there.
    pub fn start() -> Result<KernelSession, KernelUnavailable> {
        preflight::check_privileges().map_err(KernelUnavailable::Privileges)?;
        let cgroup = cgroup::enter().map_err(KernelUnavailable::Cgroup)?;
        let observer = KernelObserver::attach(&ObserverOptions {
            cgroup: Some(cgroup.path().to_path_buf()),
            max_destinations: MAX_DESTINATIONS,
            max_connections: MAX_CONNECTIONS,
            // Its probes' records are all it reads.
            destination_table: false,
            ..ObserverOptions::default()
        })
        .map_err(|e| KernelUnavailable::Observer(Box::new(e)))?;
        let options = StreamOptions {
            join_window: DEFAULT_JOIN_WINDOW,
            remember_for: Duration::MAX,
            max_remembered: MAX_RECORDS,
        };
        Ok(KernelSession {
            stream: ObserverStream::new(observer, &options),
            drained: Drained::default(),
            cgroup,
        })
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    /// Moves every waiting ring-buffer record into the stream.
    pub fn pump(&mut self) {
        self.stream.drain(&mut self.drained);
        self.drained.clear();
    }

    /// Drains until every cookie in `cookies` has its record, or [`SETTLE_TIMEOUT`] passes.
    pub async fn settle(&mut self, cookies: &[u64]) {
        let missing = poll_until_none_missing(
            || {
                self.pump();
                cookies
                    .iter()
                    .filter(|c| **c != 0 && self.stream.get(**c).is_none())
                    .count()
            },
            SETTLE_TIMEOUT,
            SETTLE_POLL,
        )
        .await;
        if missing > 0 {
            tracing::debug!(missing, "probe attempts without a kernel record");
        }
    }

    /// The kernel's record of the attempt whose socket had `cookie`.
    pub fn record(&self, cookie: u64) -> Option<&Connect> {
        self.stream.get(cookie)
    }

    /// The kernel's established-connection record of `cookie` (written on a retransmit or
    /// RTO, and when the connection leaves ESTABLISHED).
    pub fn conn_stats(&self, cookie: u64) -> Option<ConnStats> {
        self.stream.conn_stats(cookie)
    }

    pub fn events_lost(&self) -> u64 {
        self.stream.events_lost()
    }
}

/// Calls `missing` (which drains and counts what is still missing) every `poll` until it
/// answers 0 or `timeout` has passed; returns its last answer.
async fn poll_until_none_missing(
    mut missing: impl FnMut() -> usize,
    timeout: Duration,
    poll: Duration,
) -> usize {
    let start = tokio::time::Instant::now();
    loop {
        let n = missing();
        if n == 0 || start.elapsed() >= timeout {
            return n;
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settling_stops_as_soon_as_every_record_is_there() {
        let start = tokio::time::Instant::now();
        let mut calls = 0;
        let left = poll_until_none_missing(
            || {
                calls += 1;
                3usize.saturating_sub(calls)
            },
            SETTLE_TIMEOUT,
            SETTLE_POLL,
        )
        .await;
        assert_eq!(left, 0);
        assert_eq!(calls, 3);
        assert_eq!(start.elapsed(), SETTLE_POLL * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn settling_gives_up_after_the_timeout() {
        let start = tokio::time::Instant::now();
        let left = poll_until_none_missing(|| 2, SETTLE_TIMEOUT, SETTLE_POLL).await;
        assert_eq!(left, 2);
        assert_eq!(start.elapsed(), SETTLE_TIMEOUT);
    }
}
