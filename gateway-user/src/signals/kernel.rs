//! The proxy's view of the observer stream: [`KernelSignals`], the [`SignalSource`] that
//! answers, by `SO_COOKIE`, what the kernel saw of one upstream connect (from the stream's
//! index) and of one established connection (a lookup in the kernel's `CONN_STATS` map).
//!
//! A background thread drains the stream every [`DRAIN_INTERVAL`], so that the ring buffer
//! never fills, and a lookup drains on demand when the stream lacks the cookie, or has it
//! without the application's `SO_ERROR` read yet: the kernel writes the outcome record before
//! `connect()` returns (established, refused, unreachable) or before `close()` returns
//! (aborted), and the follow-up while `getsockopt(SO_ERROR)` runs, so a drain at the moment of
//! asking finds them without waiting. Draining reads mmapped memory, not a syscall.
//!
//! Records that stop coming ([`LOST_AFTER`] connects in a row without one: the programs were
//! detached, or the process was moved out of the observer's cgroup) turn [`SignalSource::mode`]
//! to userspace timing, which `/healthz`, `/status` and `gateway_observer_kernel_signals` show
//! and the decisions follow (a response timeout is then not taken for a slow backend on the
//! word of a kernel that no longer watches); a record turns it back.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use gateway_common::ConnStats;
use tracing::{error, info};

use super::{ConnectEvidence, EstablishedEvidence, SignalMode, SignalSource};
use crate::observer::{
    KernelObserver,
    records::Connect,
    stream::{DRAIN_INTERVAL, Drained, ObserverStream, StreamOptions},
};

struct Stream {
    stream: ObserverStream,
    /// The proxy only looks connects up: what each drain completes is dropped.
    drained: Drained,
}

impl Stream {
    fn drain(&mut self) {
        self.stream.drain(&mut self.drained);
        self.drained.clear();
    }

    fn evidence(&self, cookie: u64) -> Option<ConnectEvidence> {
        self.stream.get(cookie).map(evidence_of)
    }
}

pub struct KernelSignals {
    stream: Mutex<Stream>,
    /// Upstream connects in a row the stream had no record of.
    misses: AtomicU32,
    /// [`LOST_AFTER`] of them: records stopped coming.
    lost: AtomicBool,
}

/// Connects in a row without a record after which the proxy stops trusting the observer.
/// Every connect of this process gets a record while the programs are attached to its cgroup
/// (the kernel writes it before `connect()` returns); a full ring buffer loses a few, not
/// dozens in a row.
pub const LOST_AFTER: u32 = 32;

/// The proxy's view of one connect the stream decoded.
pub fn evidence_of(c: &Connect) -> ConnectEvidence {
    ConnectEvidence {
        outcome: c.outcome,
        syn_retransmits: u32::from(c.syn_retransmits),
        syn_rtt: c.syn_rtt,
        errno: c.errno,
        elapsed: c.elapsed(),
        so_error: c.so_error,
        refused_by_icmp: c.refused_by_icmp(),
    }
}

/// The proxy's view of a `CONN_STATS` value.
pub fn established_of(cs: &ConnStats) -> EstablishedEvidence {
    EstablishedEvidence {
        data_retransmits: cs.data_retransmits,
        rtos: cs.rtos,
        srtt: (cs.srtt_us > 0).then(|| Duration::from_micros(u64::from(cs.srtt_us))),
        bytes_acked: cs.bytes_acked,
        unacked_bytes: u64::from(cs.unacked_bytes),
    }
}

impl KernelSignals {
    /// Takes ownership of an attached observer and starts the drain thread. The thread stops,
    /// and the observer detaches, when the last `Arc` is dropped.
    pub fn start(observer: KernelObserver) -> Arc<KernelSignals> {
        let me = Arc::new(KernelSignals {
            stream: Mutex::new(Stream {
                stream: ObserverStream::new(observer, &StreamOptions::default()),
                drained: Drained::default(),
            }),
            misses: AtomicU32::new(0),
            lost: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("kernel-signals".into())
            .spawn(move || {
                while let Some(me) = weak.upgrade() {
                    me.lock().drain();
                    drop(me);
                    std::thread::sleep(DRAIN_INTERVAL);
                }
            })
            .expect("spawning the kernel-signals thread");
        me
    }

    fn lock(&self) -> MutexGuard<'_, Stream> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the stream had a record of an upstream connect: [`LOST_AFTER`] misses in a row
    /// turn the mode to userspace timing (the programs were detached, or this process left
    /// the observer's cgroup: its connects are no longer seen), and a record turns it back.
    fn saw(&self, found: bool) {
        if found {
            self.misses.store(0, Ordering::Relaxed);
            if self.lost.swap(false, Ordering::Relaxed) {
                info!(
                    "kernel observer: records of upstream connects come again; decisions use kernel evidence again"
                );
            }
        } else if self.misses.fetch_add(1, Ordering::Relaxed) + 1 == LOST_AFTER
            && !self.lost.swap(true, Ordering::Relaxed)
        {
            error!(
                cgroup = %self.lock().stream.cgroup().display(),
                connects = LOST_AFTER,
                "kernel observer: no record of the last upstream connects; its programs were detached, or this process left the observer cgroup. Decisions use userspace timing until records come again (/healthz, gateway_observer_kernel_signals)"
            );
        }
    }
}

impl SignalSource for KernelSignals {
    fn mode(&self) -> SignalMode {
        if self.lost.load(Ordering::Relaxed) {
            return SignalMode::UserspaceOnly {
                reason: format!(
                    "no kernel record of the last {LOST_AFTER} upstream connects: the observer's programs were detached, or this process left its cgroup {}",
                    self.lock().stream.cgroup().display()
                ),
            };
        }
        SignalMode::Kernel
    }

    fn kernel(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
    }

    fn connect_evidence(&self, cookie: u64) -> Option<ConnectEvidence> {
        let evidence = {
            let mut stream = self.lock();
            match stream.evidence(cookie) {
                Some(e) if e.so_error.is_some() => Some(e),
                // Not drained yet, or drained before the application read SO_ERROR.
                seen => {
                    stream.drain();
                    stream.evidence(cookie).or(seen)
                }
            }
        };
        self.saw(evidence.is_some());
        evidence
    }

    fn established_evidence(&self, cookie: u64) -> Option<EstablishedEvidence> {
        let cs = self.lock().stream.conn_stats(cookie)?;
        Some(established_of(&cs))
    }

    fn kernel_anomalies(&self) -> Option<Vec<(&'static str, u64)>> {
        let counters = self.lock().stream.counters();
        Some(
            gateway_common::anomaly::KINDS
                .iter()
                .map(|&(index, kind)| (kind, counters.get(index)))
                .collect(),
        )
    }

    fn anomaly_logs_suppressed(&self) -> Option<u64> {
        let counters = self.lock().stream.counters();
        Some(counters.get(gateway_common::counter::ANOMALY_LOGS_SUPPRESSED))
    }

    fn events_lost(&self) -> Option<u64> {
        Some(self.lock().stream.events_lost())
    }

    fn cgroup(&self) -> Option<PathBuf> {
        Some(self.lock().stream.cgroup().to_path_buf())
    }
}
