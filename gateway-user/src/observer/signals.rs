//! The kernel observer as the proxy's [`SignalSource`]: per-connect evidence by `SO_COOKIE`,
//! established-connection evidence from `CONN_STATS`, and a stream of every connect outcome
//! for the health and deadline logic.
//!
//! The observer's ring buffer is drained by a background thread every
//! [`DRAIN_INTERVAL`], and on demand when the proxy asks about a cookie it has not seen yet: the
//! kernel writes the record before `connect()` returns (established, refused, unreachable) or
//! before `close()` returns (aborted), so a drain at the moment of asking finds it without
//! waiting. Reading the ring is a read of mmapped memory, not a syscall.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use gateway_common::ConnectEvent;

use super::{
    KernelObserver,
    records::{Clock, conn_evidence, connect_evidence as evidence_of, key_to_socket_addr},
};
use crate::signals::{ConnEvidence, ConnectEvidence, SignalMode, SignalSource};

/// How often the background thread drains the ring buffer (KERNEL.md: 10–50 ms).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// How long evidence is kept for a cookie nobody asked about.
pub const EVIDENCE_TTL: Duration = Duration::from_secs(30);
/// At most this many cookies are remembered; the oldest go first.
pub const MAX_REMEMBERED: usize = 65_536;

/// One connect outcome, as the health and deadline logic consume it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectSeen {
    pub cookie: u64,
    pub endpoint: SocketAddr,
    pub evidence: ConnectEvidence,
}

/// Receives every connect outcome the kernel reports for this process's cgroup.
pub type Listener = Box<dyn Fn(&ConnectSeen) + Send + Sync>;

struct Inner {
    observer: KernelObserver,
    by_cookie: HashMap<u64, ConnectEvidence>,
    order: VecDeque<(u64, u64)>,
    scratch: Vec<ConnectEvent>,
}

pub struct KernelSignals {
    inner: Mutex<Inner>,
    listeners: Mutex<Vec<Listener>>,
    stop: AtomicBool,
}

impl KernelSignals {
    /// Takes ownership of an attached observer and starts the drain thread. The thread stops
    /// when the last `Arc` is dropped... or at [`KernelSignals::shutdown`].
    pub fn start(observer: KernelObserver) -> Arc<KernelSignals> {
        let me = Arc::new(KernelSignals {
            inner: Mutex::new(Inner {
                observer,
                by_cookie: HashMap::new(),
                order: VecDeque::new(),
                scratch: Vec::new(),
            }),
            listeners: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("kernel-signals".into())
            .spawn(move || {
                while let Some(me) = weak.upgrade() {
                    if me.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    me.drain();
                    drop(me);
                    std::thread::sleep(DRAIN_INTERVAL);
                }
            })
            .expect("spawning the kernel-signals thread");
        me
    }

    /// Registers a function called for every connect outcome (from the drain, under no lock
    /// of the caller's).
    pub fn subscribe(&self, f: Listener) {
        self.listeners.lock().expect("listeners lock").push(f);
    }

    /// Stops the drain thread; the observer detaches when the last reference goes.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Records the kernel could not queue (ring buffer full).
    pub fn events_lost(&self) -> u64 {
        self.inner
            .lock()
            .expect("signals lock")
            .observer
            .events_lost()
    }

    fn drain(&self) {
        let seen: Vec<ConnectSeen> = {
            let mut guard = self.inner.lock().expect("signals lock");
            let inner = &mut *guard;
            inner.observer.drain(&mut inner.scratch);
            let now = Clock::monotonic_now();
            let mut seen = Vec::new();
            for ev in inner.scratch.drain(..) {
                let Some(evidence) = evidence_of(&ev) else {
                    continue;
                };
                inner.by_cookie.insert(ev.cookie, evidence.clone());
                inner.order.push_back((now, ev.cookie));
                seen.push(ConnectSeen {
                    cookie: ev.cookie,
                    endpoint: key_to_socket_addr(&ev.dst),
                    evidence,
                });
            }
            let ttl = EVIDENCE_TTL.as_nanos() as u64;
            while let Some(&(t, cookie)) = inner.order.front() {
                if inner.order.len() > MAX_REMEMBERED || now.saturating_sub(t) > ttl {
                    inner.order.pop_front();
                    inner.by_cookie.remove(&cookie);
                } else {
                    break;
                }
            }
            seen
        };
        if !seen.is_empty() {
            let listeners = self.listeners.lock().expect("listeners lock");
            for s in &seen {
                for l in listeners.iter() {
                    l(s);
                }
            }
        }
    }
}

impl SignalSource for KernelSignals {
    fn mode(&self) -> SignalMode {
        SignalMode::Kernel
    }

    fn connect_evidence(&self, cookie: u64) -> Option<ConnectEvidence> {
        if let Some(e) = self
            .inner
            .lock()
            .expect("signals lock")
            .by_cookie
            .get(&cookie)
        {
            return Some(e.clone());
        }
        self.drain();
        self.inner
            .lock()
            .expect("signals lock")
            .by_cookie
            .get(&cookie)
            .cloned()
    }

    fn events_lost(&self) -> Option<u64> {
        Some(KernelSignals::events_lost(self))
    }

    fn kernel_anomalies(&self) -> Option<Vec<(&'static str, u64)>> {
        let counters = self.inner.lock().expect("signals lock").observer.counters();
        Some(
            gateway_common::anomaly::KINDS
                .iter()
                .map(|&(index, kind)| (kind, counters.get(index)))
                .collect(),
        )
    }

    fn cgroup(&self) -> Option<std::path::PathBuf> {
        Some(
            self.inner
                .lock()
                .expect("signals lock")
                .observer
                .cgroup()
                .to_path_buf(),
        )
    }

    fn conn_evidence(&self, cookie: u64) -> Option<ConnEvidence> {
        let cs = self
            .inner
            .lock()
            .expect("signals lock")
            .observer
            .conn_stats(cookie)?;
        Some(conn_evidence(&cs))
    }
}
