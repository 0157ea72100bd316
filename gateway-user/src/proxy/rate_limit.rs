//! A route's `rate_limit`: requests over `requests_per_second`, beyond a `burst` taken at once,
//! are answered `429` with `Retry-After` and never reach the upstream. One bucket per client
//! (`by = "client"`: the peer, or the client a trusted proxy names) or one for the whole route
//! (`by = "route"`), shared by every worker.
//!
//! Each bucket is GCRA's one number, the theoretical arrival time (TAT) of the next request
//! at the steady rate: a request at `now` passes when `TAT - now` is within the burst's
//! allowance, and moves the TAT on by one interval. A TAT in the past is the same as a bucket
//! never used, so the per-client table keeps only clients that are ahead of the rate, and
//! forgets the others when it needs room. It holds at most `max_clients`; when every entry is
//! in use (a flood from that many addresses), a new client passes uncounted (fail-open: the
//! limit protects the upstream from a few clients, and must not turn away everyone new) and
//! is counted in `gateway_rate_limit_untracked_total`.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::log_every::LogEvery;
use crate::config::{RateLimit, RateLimitBy};

/// Shards of the per-client table: workers on different clients rarely wait on each other.
const SHARDS: usize = 16;

/// What the limiter says of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    /// Over the limit: a request could pass after this long.
    Limited(Duration),
    /// Passed without a bucket: the table of clients was full.
    Untracked,
}

pub(crate) struct Limiter {
    pub spec: RateLimit,
    /// The interval between requests at the steady rate, and the allowance of the burst
    /// (`burst - 1` intervals), in nanoseconds.
    interval: u64,
    allowance: u64,
    start: Instant,
    route: Mutex<u64>,
    clients: Box<[Mutex<HashMap<IpAddr, u64>>]>,
    hasher: RandomState,
    /// The warning that the table is full, at most every 10 s.
    pub full_log: LogEvery,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("spec", &self.spec).finish()
    }
}

impl Limiter {
    pub fn new(spec: RateLimit) -> Limiter {
        let interval = (1e9 / spec.requests_per_second).round().max(1.0) as u64;
        let shards = match spec.by {
            RateLimitBy::Client => SHARDS,
            RateLimitBy::Route => 0,
        };
        Limiter {
            interval,
            allowance: interval.saturating_mul(u64::from(spec.burst.saturating_sub(1))),
            start: Instant::now(),
            route: Mutex::new(0),
            clients: (0..shards).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            full_log: LogEvery::new(Duration::from_secs(10)),
            spec,
        }
    }

    /// The verdict on a request from `client` (IPv4-mapped addresses taken as IPv4) at `now`.
    pub fn check(&self, client: IpAddr, now: Instant) -> Verdict {
        let now =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        if self.clients.is_empty() {
            let mut tat = self.route.lock().unwrap_or_else(PoisonError::into_inner);
            return self.take(&mut tat, now);
        }
        let client = client.to_canonical();
        let shard = self.hasher.hash_one(client) as usize % self.clients.len();
        let mut table = self.clients[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tat) = table.get_mut(&client) {
            return self.take(tat, now);
        }
        let room = self.spec.max_clients.div_ceil(self.clients.len());
        if table.len() >= room {
            // Clients whose TAT has passed are as good as new: forgotten, they lose nothing.
            table.retain(|_, tat| *tat > now);
            if table.len() >= room {
                return Verdict::Untracked;
            }
        }
        let mut tat = 0;
        let verdict = self.take(&mut tat, now);
        table.insert(client, tat);
        verdict
    }

    /// GCRA on one bucket's TAT.
    fn take(&self, tat: &mut u64, now: u64) -> Verdict {
        let next = (*tat).max(now);
        let ahead = next - now;
        if ahead > self.allowance {
            return Verdict::Limited(Duration::from_nanos(ahead - self.allowance));
        }
        *tat = next + self.interval;
        Verdict::Pass
    }

    /// Clients the table holds now (tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.clients
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests;
