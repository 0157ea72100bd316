//! A route's `rate_limit`: requests over `requests_per_second`, beyond a `burst` taken at once,
//! are answered `429` with `Retry-After` and never reach the upstream. One bucket per client
//! (`by = "client"`: the peer, or the client a trusted proxy names) or one for the whole route
//! (`by = "route"`), shared by every worker.
//!
//! Each bucket is GCRA's one number, the theoretical arrival time (TAT) of the next request
//! at the steady rate: a request at `now` passes when `TAT - now` is within the burst's
//! allowance, and moves the TAT on by one interval. A TAT in the past is the same as a bucket
//! never used, so the per-client table keeps only clients that are ahead of the rate, and
//! forgets the others when it needs room. An IPv6 client is its /64: one host holds at least
//! that many addresses, and a bucket per address would give it a new burst per address.
//!
//! The table is split into up to 16 shards, which together hold at most `max_clients`. When a
//! new client's shard holds only clients ahead of the rate (a flood from that many addresses),
//! the client passes uncounted (fail-open: the limit protects the upstream from a few
//! clients, and must not turn away everyone new), counted in
//! `gateway_rate_limit_untracked_total`. The shard is not searched again for clients to forget
//! until the earliest of them has fallen back under the rate.

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
    /// (`burst - 1` intervals), in microseconds: at one a day with the largest burst, 8.6e16
    /// of them, far from overflowing.
    interval: u64,
    allowance: u64,
    start: Instant,
    route: Mutex<u64>,
    clients: Box<[Mutex<Shard>]>,
    /// Clients each shard holds at most.
    room: usize,
    hasher: RandomState,
    /// The warning that the table is full, at most every 10 s.
    pub full_log: LogEvery,
}

/// Part of the per-client table.
#[derive(Default)]
struct Shard {
    tats: HashMap<IpAddr, u64>,
    /// No held client's TAT is earlier: until then, a full shard has none to forget.
    earliest: u64,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("spec", &self.spec).finish()
    }
}

impl Limiter {
    pub fn new(spec: RateLimit) -> Limiter {
        let interval = (1e6 / spec.requests_per_second).round().max(1.0) as u64;
        let shards = match spec.by {
            RateLimitBy::Client => SHARDS.min(spec.max_clients).max(1),
            RateLimitBy::Route => 0,
        };
        Limiter {
            interval,
            allowance: interval.saturating_mul(u64::from(spec.burst.saturating_sub(1))),
            start: Instant::now(),
            route: Mutex::new(0),
            clients: (0..shards).map(|_| Mutex::default()).collect(),
            room: spec.max_clients / shards.max(1),
            hasher: RandomState::new(),
            full_log: LogEvery::new(Duration::from_secs(10)),
            spec,
        }
    }

    /// The verdict on a request from `client` (IPv4-mapped addresses taken as IPv4) at `now`.
    pub fn check(&self, client: IpAddr, now: Instant) -> Verdict {
        let now = u64::try_from(now.saturating_duration_since(self.start).as_micros())
            .unwrap_or(u64::MAX);
        if self.clients.is_empty() {
            let mut tat = self.route.lock().unwrap_or_else(PoisonError::into_inner);
            return self.take(&mut tat, now);
        }
        let client = bucket_of(client);
        let shard = self.hasher.hash_one(client) as usize % self.clients.len();
        let mut shard = self.clients[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tat) = shard.tats.get_mut(&client) {
            return self.take(tat, now);
        }
        if shard.tats.len() >= self.room {
            if now < shard.earliest {
                return Verdict::Untracked;
            }
            // Clients whose TAT has passed are as good as new: forgotten, they lose nothing.
            shard.tats.retain(|_, tat| *tat > now);
            if shard.tats.len() >= self.room {
                shard.earliest = shard.tats.values().copied().min().unwrap_or(0);
                return Verdict::Untracked;
            }
        }
        let mut tat = 0;
        let verdict = self.take(&mut tat, now);
        shard.tats.insert(client, tat);
        verdict
    }

    /// GCRA on one bucket's TAT.
    fn take(&self, tat: &mut u64, now: u64) -> Verdict {
        let next = (*tat).max(now);
        let ahead = next - now;
        if ahead > self.allowance {
            return Verdict::Limited(Duration::from_micros(ahead - self.allowance));
        }
        *tat = next.saturating_add(self.interval);
        Verdict::Pass
    }

    /// Clients the table holds now (tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.clients
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).tats.len())
            .sum()
    }
}

/// The bucket's key: an IPv4 address, or an IPv6 address's /64.
fn bucket_of(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests;
