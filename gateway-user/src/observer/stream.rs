//! The observer stream: the one reader of the kernel's ring buffer. It drains the ring every
//! [`DRAIN_INTERVAL`] (the kernel submits without a wake-up, `docs/kernel.md` "Cost"), decodes
//! each record ([`super::records::decode`]), joins each connect's outcome with the
//! application's `SO_ERROR` read, and indexes connects by socket cookie for a while
//! ([`StreamOptions`]). It also reads the kernel's maps that the readers need beside the ring:
//! established-connection signals by cookie, per-destination aggregates, lost-record counts.
//!
//! Three thin views read it, one per command: the proxy's `crate::signals::kernel`
//! (evidence by cookie, drained by a thread and on demand), `diagnose`'s
//! `crate::diagnose::kernel` (the probes' records by cookie) and `gateway observe` (every
//! connect, complete, once). The stream never sleeps and never spawns: each view drains it at
//! [`DRAIN_INTERVAL`] in its own way.

pub mod index;

use std::{path::Path, time::Duration};

use gateway_common::{ConnStats, ConnectEvent, DestStats, UpstreamKey};

use self::index::ConnectIndex;
use super::{
    KernelCounters, KernelObserver,
    records::{Clock, Connect, SoErrorRead, decode},
};

/// How often a view drains the ring buffer. The kernel never wakes userspace for a record
/// (`BPF_RB_NO_WAKEUP`): `docs/kernel.md` measured 2–12 µs per connect with a 10–50 ms timer,
/// against 14–19 µs with a wake-up per record. A view that must see a record at once drains on
/// demand as well.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(25);
/// How long an outcome waits for the application's `SO_ERROR` read before it is released
/// without one. Poll-style clients read it within microseconds of the wake-up.
pub const DEFAULT_JOIN_WINDOW: Duration = Duration::from_millis(250);
/// How long a connect stays findable by cookie after its outcome arrived.
pub const DEFAULT_REMEMBER_FOR: Duration = Duration::from_secs(30);
/// At most this many connects are remembered; the oldest go first.
pub const DEFAULT_MAX_REMEMBERED: usize = 65_536;

/// How the stream joins and how long it remembers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// How long an outcome waits for its `SO_ERROR` read before it is released without one.
    pub join_window: Duration,
    /// How long a connect stays findable by cookie (at least until it is released).
    pub remember_for: Duration,
    /// At most this many connects are remembered; the oldest are forgotten first, and one
    /// still waiting for its `SO_ERROR` read is released as it goes, never lost.
    pub max_remembered: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            join_window: DEFAULT_JOIN_WINDOW,
            remember_for: DEFAULT_REMEMBER_FOR,
            max_remembered: DEFAULT_MAX_REMEMBERED,
        }
    }
}

/// What drains brought. A view that only looks connects up by cookie clears it unread.
#[derive(Debug, Default)]
pub struct Drained {
    /// Connects complete: joined with their `SO_ERROR` read, or their join window passed.
    /// Each connect comes out once.
    pub connects: Vec<Connect>,
    /// Every `SO_ERROR` read drained, joined or not.
    pub so_error_reads: Vec<SoErrorRead>,
    /// Ring-buffer records read, whatever they held.
    pub records: usize,
}

impl Drained {
    pub fn clear(&mut self) {
        self.connects.clear();
        self.so_error_reads.clear();
        self.records = 0;
    }
}

/// The attached observer, read as one stream.
pub struct ObserverStream {
    observer: KernelObserver,
    clock: Clock,
    index: ConnectIndex,
    /// Reused between drains.
    events: Vec<ConnectEvent>,
}

impl ObserverStream {
    pub fn new(observer: KernelObserver, options: &StreamOptions) -> ObserverStream {
        ObserverStream {
            observer,
            clock: Clock::now(),
            index: ConnectIndex::new(options),
            events: Vec::new(),
        }
    }

    /// Moves every waiting record into the stream; what completes goes to `out`. Never blocks.
    pub fn drain(&mut self, out: &mut Drained) {
        self.drain_at(Clock::monotonic_now(), out);
    }

    /// Drains one last time and releases every connect still waiting for its `SO_ERROR`
    /// read (on the way out).
    pub fn finish(&mut self, out: &mut Drained) {
        self.drain(out);
        self.index.expire(u64::MAX, &mut out.connects);
    }

    /// `now_ns` is the kernel's CLOCK_MONOTONIC, the time base of the records.
    fn drain_at(&mut self, now_ns: u64, out: &mut Drained) {
        self.observer.drain(&mut self.events);
        self.ingest(now_ns, out);
    }

    /// Decodes and indexes the records in `self.events`.
    fn ingest(&mut self, now_ns: u64, out: &mut Drained) {
        out.records += self.events.len();
        for ev in self.events.drain(..) {
            if let Some(d) = decode(&ev) {
                self.index.push(d, now_ns, out);
            }
        }
        self.index.expire(now_ns, &mut out.connects);
    }

    /// The connect made on the socket with this cookie, if the stream has it (drain first
    /// to see the latest records).
    pub fn get(&self, cookie: u64) -> Option<&Connect> {
        self.index.get(cookie)
    }

    /// Converts the records' kernel time to Unix time.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// `SO_ERROR` reads that came after their connect had been released without them.
    pub fn late_so_errors(&self) -> u64 {
        self.index.late_so_errors()
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        self.observer.cgroup()
    }

    /// Which hook watches the return of connect() (see [`KernelObserver::connect_exit_hook`]).
    pub fn connect_exit_hook(&self) -> &'static str {
        self.observer.connect_exit_hook()
    }

    /// Established-connection signals of one socket, by `SO_COOKIE` (a map lookup).
    pub fn conn_stats(&self, cookie: u64) -> Option<ConnStats> {
        self.observer.conn_stats(cookie)
    }

    /// Per-destination aggregates, as the kernel holds them now.
    pub fn dest_stats(&self) -> Vec<(UpstreamKey, DestStats)> {
        self.observer.dest_stats()
    }

    /// Records the kernel could not put in the ring buffer because it was full.
    pub fn events_lost(&self) -> u64 {
        self.observer.events_lost()
    }

    /// The kernel side's own health counters.
    pub fn counters(&self) -> KernelCounters {
        self.observer.counters()
    }

    /// Walks the kernel's per-destination table one entry at a time (never a copy of the whole
    /// map), draining the ring meanwhile so that a long walk cannot make it overflow; what
    /// completes goes to `out`. Returns the entries walked.
    pub fn for_each_dest_draining(
        &mut self,
        out: &mut Drained,
        f: impl FnMut(&UpstreamKey, &DestStats),
    ) -> usize {
        let n = self.observer.for_each_dest_draining(&mut self.events, f);
        self.ingest(Clock::monotonic_now(), out);
        n
    }
}
