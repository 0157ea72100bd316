//! One endpoint's last five minutes, a slot per second, for the plots of the status page and
//! `history` in `/status`: request latency p50/p99, SYN-RTT p50/p99, failed attempts by
//! reason, hedged connects.
//!
//! Cheap where it is fed: a request adds to a histogram bucket of the endpoint's (two relaxed
//! atomic adds, no lock, nothing allocated); a failed attempt, a hedge and a handshake add one
//! more. Once a second, on the wall-clock second, the roller ([`History::roll`]) swaps the
//! atomics to zero and keeps what they held as one [`Second`]: counts and p50/p99 of that
//! second, 48 bytes. The ring of [`WINDOW`] seconds is behind a mutex only the roller and
//! `/status` take.
//!
//! Memory per endpoint, fixed: the live histograms, 2 × [`BUCKETS`] × 4 bytes, plus the error
//! and hedge counters (≈ 1.7 KiB), and the ring, 300 × 48 bytes (≈ 14 KiB): ≈ 16 KiB, however
//! busy the endpoint. Health transitions for the timeline are kept by `health` (64 at most).
//!
//! Quantiles come from log-linear buckets: exact below 16 µs, then 8 buckets per power of two
//! (a bucket is at most 12.5 % wide; its midpoint stands for it), up to 2²⁷ µs (134 s); above
//! that, the last bucket.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::proxy::error::ErrorKind;

/// Seconds kept.
pub const WINDOW: usize = 300;
/// Values below this many µs have a bucket each.
const LINEAR: u64 = 16;
/// Sub-buckets per power of two, as bits.
const SUB_BITS: u32 = 3;
/// Highest power of two resolved: 2²⁷ µs ≈ 134 s.
const TOP_BIT: u32 = 27;
/// Histogram buckets.
pub const BUCKETS: usize = LINEAR as usize + ((TOP_BIT - 3) as usize) * (1 << SUB_BITS);

/// The attempt failures counted per endpoint, in this order (`errors` in `/status`).
pub const ERROR_KINDS: [ErrorKind; 12] = [
    ErrorKind::ConnectTimeout,
    ErrorKind::ConnectRefused,
    ErrorKind::ConnectUnreachable,
    ErrorKind::ConnectFailed,
    ErrorKind::TlsHandshakeTimeout,
    ErrorKind::TlsError,
    ErrorKind::ResponseTimeout,
    ErrorKind::UpstreamHostDied,
    ErrorKind::UpstreamWriteTimeout,
    ErrorKind::UpstreamReset,
    ErrorKind::InvalidUpstreamResponse,
    ErrorKind::RequestTimeout,
];

/// The bucket of a value in µs.
fn bucket(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros();
    if msb > TOP_BIT {
        return BUCKETS - 1;
    }
    let shift = msb - SUB_BITS;
    let sub = ((us >> shift) as usize) & ((1 << SUB_BITS) - 1);
    (LINEAR as usize + (msb as usize - 4) * (1 << SUB_BITS) + sub).min(BUCKETS - 1)
}

/// The value a bucket stands for: its midpoint, in µs.
fn value(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let k = i - LINEAR as usize;
    let msb = (k >> SUB_BITS) as u32 + 4;
    let sub = (k & ((1 << SUB_BITS) - 1)) as u64;
    let shift = msb - SUB_BITS;
    let low = ((1 << SUB_BITS) + sub) << shift;
    low + (1 << shift) / 2
}

/// p50 and p99 of a histogram, in µs; `None` without samples.
fn quantiles(counts: &[u32; BUCKETS]) -> Option<(u32, u32)> {
    let n: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if n == 0 {
        return None;
    }
    let at = |q: f64| -> u32 {
        // The smallest value with at least q of the samples at or below it.
        let rank = ((q * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return value(i).min(u64::from(u32::MAX)) as u32;
            }
        }
        u32::MAX
    };
    Some((at(0.50), at(0.99)))
}

/// One second of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Second {
    pub requests: u32,
    /// p50, p99 of the requests' latency, µs.
    pub latency: Option<(u32, u32)>,
    pub syn_rtt: Option<(u32, u32)>,
    pub hedges: u16,
    pub errors: [u16; ERROR_KINDS.len()],
}

/// The live counters of the second under way.
struct Live {
    latency: [AtomicU32; BUCKETS],
    latency_n: AtomicU32,
    syn_rtt: [AtomicU32; BUCKETS],
    syn_rtt_n: AtomicU32,
    errors: [AtomicU32; ERROR_KINDS.len()],
    hedges: AtomicU32,
}

/// Takes a histogram's counts, leaving zeros; `n` (the sample count, raised before a bucket
/// is) says whether there is anything to take.
fn take(buckets: &[AtomicU32; BUCKETS], n: &AtomicU32) -> Option<[u32; BUCKETS]> {
    if n.swap(0, Ordering::AcqRel) == 0 {
        return None;
    }
    Some(std::array::from_fn(|i| {
        buckets[i].swap(0, Ordering::Relaxed)
    }))
}

struct Ring {
    /// The Unix second of `slots[0]`.
    first: u64,
    slots: VecDeque<Second>,
}

pub(crate) struct History {
    live: Live,
    ring: Mutex<Ring>,
}

/// An endpoint's history as `/status` shows it (`history`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// The Unix second of the first entry of each array; entry `i` is second `first_unix_s + i`.
    pub first_unix_s: u64,
    pub requests: Vec<u32>,
    pub latency_p50_us: Vec<Option<u32>>,
    pub latency_p99_us: Vec<Option<u32>>,
    pub syn_rtt_p50_us: Vec<Option<u32>>,
    pub syn_rtt_p99_us: Vec<Option<u32>>,
    pub hedges: Vec<u16>,
    /// Failed attempts by reason (the `x-gateway-error` names), only reasons seen.
    pub errors: std::collections::BTreeMap<String, Vec<u16>>,
}

impl History {
    pub fn new() -> History {
        History {
            live: Live {
                latency: std::array::from_fn(|_| AtomicU32::new(0)),
                latency_n: AtomicU32::new(0),
                syn_rtt: std::array::from_fn(|_| AtomicU32::new(0)),
                syn_rtt_n: AtomicU32::new(0),
                errors: std::array::from_fn(|_| AtomicU32::new(0)),
                hedges: AtomicU32::new(0),
            },
            ring: Mutex::new(Ring {
                first: 0,
                slots: VecDeque::with_capacity(WINDOW),
            }),
        }
    }

    /// A request served from this endpoint (or that failed on it last) took `d`.
    pub fn request(&self, d: Duration) {
        self.live.latency_n.fetch_add(1, Ordering::AcqRel);
        self.live.latency[bucket(d.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
    }

    /// A handshake's SYN-RTT (kernel-measured when available).
    pub fn syn_rtt(&self, d: Duration) {
        self.live.syn_rtt_n.fetch_add(1, Ordering::AcqRel);
        self.live.syn_rtt[bucket(d.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt on this endpoint failed with `kind`.
    pub fn failed(&self, kind: ErrorKind) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.live.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connect to this endpoint passed its deadline and a hedge was raced against it.
    pub fn hedged(&self) {
        self.live.hedges.fetch_add(1, Ordering::Relaxed);
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes Unix second `second`: what came in since the last roll becomes its slot. Seconds
    /// skipped (a stalled roller) become empty slots; a second already closed is not reopened.
    pub fn roll(&self, second: u64) {
        let l = &self.live;
        let latency = take(&l.latency, &l.latency_n);
        let syn = take(&l.syn_rtt, &l.syn_rtt_n);
        let mut s = Second {
            requests: latency.map_or(0, |c| c.iter().sum()),
            latency: latency.as_ref().and_then(quantiles),
            syn_rtt: syn.as_ref().and_then(quantiles),
            hedges: l.hedges.swap(0, Ordering::Relaxed).min(u32::from(u16::MAX)) as u16,
            errors: [0; ERROR_KINDS.len()],
        };
        for (e, a) in s.errors.iter_mut().zip(&l.errors) {
            *e = a.swap(0, Ordering::Relaxed).min(u32::from(u16::MAX)) as u16;
        }
        let mut r = self.ring();
        if r.slots.is_empty() {
            r.first = second;
        }
        let next = r.first + r.slots.len() as u64;
        if second < next && !r.slots.is_empty() {
            // The clock stepped back: this belongs to the last second closed.
            if let Some(last) = r.slots.back_mut() {
                merge(last, &s);
            }
            return;
        }
        for _ in next..second.min(next + WINDOW as u64) {
            push(&mut r, Second::default());
        }
        if second >= next + WINDOW as u64 {
            r.slots.clear();
            r.first = second;
        }
        push(&mut r, s);
    }

    /// The window as `/status` shows it.
    pub fn series(&self) -> Series {
        let r = self.ring();
        let mut out = Series {
            first_unix_s: r.first,
            ..Series::default()
        };
        for s in &r.slots {
            out.requests.push(s.requests);
            out.latency_p50_us.push(s.latency.map(|q| q.0));
            out.latency_p99_us.push(s.latency.map(|q| q.1));
            out.syn_rtt_p50_us.push(s.syn_rtt.map(|q| q.0));
            out.syn_rtt_p99_us.push(s.syn_rtt.map(|q| q.1));
            out.hedges.push(s.hedges);
        }
        for (i, kind) in ERROR_KINDS.iter().enumerate() {
            if r.slots.iter().any(|s| s.errors[i] > 0) {
                out.errors.insert(
                    kind.reason().to_owned(),
                    r.slots.iter().map(|s| s.errors[i]).collect(),
                );
            }
        }
        out
    }
}

fn push(r: &mut Ring, s: Second) {
    if r.slots.len() == WINDOW {
        r.slots.pop_front();
        r.first += 1;
    }
    r.slots.push_back(s);
}

/// Adds `s` to `into` (the counts; a quantile is kept from whichever had more requests).
fn merge(into: &mut Second, s: &Second) {
    if s.requests > into.requests {
        into.latency = s.latency;
    }
    into.syn_rtt = into.syn_rtt.or(s.syn_rtt);
    into.requests += s.requests;
    into.hedges = into.hedges.saturating_add(s.hedges);
    for (a, b) in into.errors.iter_mut().zip(s.errors) {
        *a = a.saturating_add(b);
    }
}

#[cfg(test)]
mod tests;
