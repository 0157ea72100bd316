//! Kernel signals for the probes: the eBPF observer attached to `diagnose`'s own cgroup (see
//! [`super::cgroup`]), and the records it produced, by `SO_COOKIE`. Any step that fails (no
//! privileges, no BTF, no cgroup v2, a verifier rejection) turns kernel signals off with the
//! reason, and `diagnose` carries on with userspace timing.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use gateway_common::ConnStats;
use thiserror::Error;

use super::cgroup::{self, SelfCgroup, SelfCgroupError};
use crate::observer::{
    KernelObserver, ObserverError, ObserverOptions,
    preflight::{self, PreflightError},
    records::{Clock, ConnectRecord, Decoded, decode},
};

/// How often the ring buffer is drained while probes run.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(25);
/// How long to wait, after the last probe, for records still on their way.
pub const SETTLE_TIMEOUT: Duration = Duration::from_millis(500);
/// Kernel table sizes: a diagnose run touches a handful of destinations.
const MAX_DESTINATIONS: u32 = 256;
const MAX_CONNECTIONS: u32 = 4096;

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

/// The attached observer and what it has reported so far.
pub struct KernelSession {
    // Fields drop in order: the observer detaches, then the process leaves the cgroup.
    observer: KernelObserver,
    clock: Clock,
    records: HashMap<u64, ConnectRecord>,
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
            ..ObserverOptions::default()
        })
        .map_err(|e| KernelUnavailable::Observer(Box::new(e)))?;
        Ok(KernelSession {
            observer,
            clock: Clock::now(),
            records: HashMap::new(),
            cgroup,
        })
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    /// Moves every waiting ring-buffer record into the table.
    pub fn pump(&mut self) {
        let mut events = Vec::new();
        self.observer.drain(&mut events);
        for ev in &events {
            match decode(ev, &self.clock) {
                Some(Decoded::Outcome(rec)) => {
                    self.records.insert(rec.cookie, rec);
                }
                Some(Decoded::SoError(read)) => {
                    if let Some(rec) = self.records.get_mut(&read.cookie) {
                        rec.so_error = Some(crate::observer::records::errno_name(read.value));
                    }
                }
                None => {}
            }
        }
    }

    /// Drains until every cookie in `cookies` has its record, or [`SETTLE_TIMEOUT`] passes.
    pub async fn settle(&mut self, cookies: &[u64]) {
        let start = Instant::now();
        loop {
            self.pump();
            let missing = cookies
                .iter()
                .filter(|c| **c != 0 && !self.records.contains_key(c))
                .count();
            if missing == 0 || start.elapsed() >= SETTLE_TIMEOUT {
                if missing > 0 {
                    tracing::debug!(missing, "probe attempts without a kernel record");
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The kernel's record of the attempt whose socket had `cookie`.
    pub fn record(&self, cookie: u64) -> Option<&ConnectRecord> {
        self.records.get(&cookie)
    }

    /// The kernel's established-connection record of `cookie` (written on a retransmit or
    /// RTO, and when the connection leaves ESTABLISHED).
    pub fn conn_stats(&self, cookie: u64) -> Option<ConnStats> {
        self.observer.conn_stats(cookie)
    }

    pub fn events_lost(&self) -> u64 {
        self.observer.events_lost()
    }
}
