//! Connect records as userspace sees them: decoded from the ring buffer, joined with the
//! application's `SO_ERROR` read, and serialised in the `gateway observe --json` contract.
//!
//! The kernel sends the outcome the moment it happens, and the application reads `SO_ERROR`
//! only afterwards (poll-style clients: Go's net package, tokio). That read arrives as a
//! follow-up record with the same cookie. [`Joiner`] holds each outcome for a short window
//! (default [`DEFAULT_JOIN_WINDOW`]) so that one JSON object per connect carries both.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use gateway_common::{
    AF_INET, ConnStats, ConnectEvent, EventKind, Outcome, SO_ERROR_NONE, UpstreamKey, errno,
};
use serde::Serialize;

use crate::signals::{ConnEvidence, ConnectEvidence};

/// How long an outcome waits for the application's SO_ERROR read before it is printed
/// without one. Poll-style clients read it within microseconds of the wake-up.
pub const DEFAULT_JOIN_WINDOW: Duration = Duration::from_millis(250);

/// Symbolic errno, e.g. `ETIMEDOUT`; unknown values print as `E<number>`.
pub fn errno_name(err: u32) -> String {
    match errno::name(err) {
        Some(n) => n.to_owned(),
        None => format!("E{err}"),
    }
}

pub fn key_to_socket_addr(key: &UpstreamKey) -> SocketAddr {
    let ip = if key.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    };
    SocketAddr::new(ip, key.port)
}

pub fn socket_addr_to_key(addr: SocketAddr) -> UpstreamKey {
    let mut key = UpstreamKey {
        family: 0,
        port: addr.port(),
        addr: [0; 16],
    };
    match addr.ip() {
        IpAddr::V4(v4) => {
            key.family = AF_INET;
            key.addr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                key.family = AF_INET;
                key.addr[..4].copy_from_slice(&v4.octets());
            }
            None => {
                key.family = gateway_common::AF_INET6;
                key.addr = v6.octets();
            }
        },
    }
    key
}

pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Converts the kernel's CLOCK_MONOTONIC (`bpf_ktime_get_ns`) to Unix time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let read = |id| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: ts is a valid out-parameter.
            unsafe { libc::clock_gettime(id, &mut ts) };
            i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
        };
        let mono = read(libc::CLOCK_MONOTONIC);
        let real = read(libc::CLOCK_REALTIME);
        Clock {
            realtime_minus_monotonic_ns: real - mono,
        }
    }

    /// A clock with a given realtime − monotonic offset (tests, fuzzing).
    pub fn from_offset_ns(realtime_minus_monotonic_ns: i128) -> Clock {
        Clock {
            realtime_minus_monotonic_ns,
        }
    }

    pub fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        (i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns).max(0) as u64
    }

    /// Current CLOCK_MONOTONIC in ns, on the kernel's time base.
    pub fn monotonic_now() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-parameter.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}

/// One connect, as printed by `gateway observe --json`. Field names are a contract.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ConnectRecord {
    pub ts_unix_ns: u64,
    pub dst: SocketAddr,
    pub src_port: u16,
    pub cookie: u64,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub outcome: OutcomeName,
    pub syn_retransmits: u16,
    /// `connect()` to outcome.
    pub elapsed_us: u64,
    pub syn_rtt_us: Option<u64>,
    pub errno: Option<String>,
    /// What the application read through `getsockopt(SO_ERROR)`: an errno name, `"0"` when it
    /// read no error, `null` when it never asked.
    pub so_error: Option<String>,
}

/// An [`Outcome`] that serialises as its contract name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutcomeName(pub Outcome);

impl Serialize for OutcomeName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl fmt::Display for OutcomeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

fn so_error_text(v: u16) -> Option<String> {
    match v {
        SO_ERROR_NONE => None,
        0 => Some("0".to_owned()),
        e => Some(errno_name(u32::from(e))),
    }
}

impl ConnectRecord {
    /// Decodes an outcome record; `None` for follow-ups and for values this build does not know.
    pub fn from_event(ev: &ConnectEvent, clock: &Clock) -> Option<ConnectRecord> {
        if ev.kind != EventKind::Outcome as u8 {
            return None;
        }
        let outcome = Outcome::from_u8(ev.outcome)?;
        Some(ConnectRecord {
            ts_unix_ns: clock.unix_ns(ev.ts_event_ns),
            dst: key_to_socket_addr(&ev.dst),
            src_port: ev.src_port,
            cookie: ev.cookie,
            pid: ev.pid,
            comm: comm_str(&ev.comm),
            cgroup_id: ev.cgroup_id,
            outcome: OutcomeName(outcome),
            syn_retransmits: ev.syn_retransmits,
            elapsed_us: ev.ts_event_ns.saturating_sub(ev.ts_connect_ns) / 1000,
            syn_rtt_us: (outcome == Outcome::Established).then_some(ev.syn_rtt_ns / 1000),
            errno: (ev.errno != 0).then(|| errno_name(u32::from(ev.errno))),
            so_error: so_error_text(ev.so_error),
        })
    }

    pub fn outcome(&self) -> Outcome {
        self.outcome.0
    }
}

/// A `getsockopt(SO_ERROR)` read by an application, as the kernel reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct SoErrorRead {
    pub cookie: u64,
    pub dst: SocketAddr,
    pub pid: u32,
    pub comm: String,
    /// The errno read; 0 = no error.
    pub value: u32,
}

/// What one drained ring-buffer record means.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Outcome(ConnectRecord),
    SoError(SoErrorRead),
}

pub fn decode(ev: &ConnectEvent, clock: &Clock) -> Option<Decoded> {
    if ev.kind == EventKind::SoError as u8 && ev.so_error != SO_ERROR_NONE {
        return Some(Decoded::SoError(SoErrorRead {
            cookie: ev.cookie,
            dst: key_to_socket_addr(&ev.dst),
            pid: ev.pid,
            comm: comm_str(&ev.comm),
            value: u32::from(ev.so_error),
        }));
    }
    ConnectRecord::from_event(ev, clock).map(Decoded::Outcome)
}

/// One ring-buffer record as the kernel wrote it: `None` when the slot is shorter than a
/// [`ConnectEvent`] (a record from a different build). What the fields mean is checked by
/// [`decode`].
pub fn event_from_bytes(bytes: &[u8]) -> Option<ConnectEvent> {
    pod_from_bytes(bytes)
}

/// A kernel value (ring-buffer record or map value) from its bytes; `None` when there are too
/// few. Bytes past the value are ignored.
pub fn pod_from_bytes<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `Pod` types (gateway-common) are repr(C), made of integers only, with no padding
    // (its size assertions), so any bytes are a valid value; read_unaligned copes with any
    // alignment of the ring-buffer slot, and the length was checked above.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The proxy's view of an outcome record; `None` for follow-ups and unknown outcomes.
pub fn connect_evidence(ev: &ConnectEvent) -> Option<ConnectEvidence> {
    if ev.kind != EventKind::Outcome as u8 {
        return None;
    }
    let outcome = Outcome::from_u8(ev.outcome)?;
    Some(ConnectEvidence {
        outcome,
        syn_retransmits: u32::from(ev.syn_retransmits),
        syn_rtt: (outcome == Outcome::Established).then(|| Duration::from_nanos(ev.syn_rtt_ns)),
        errno: (ev.errno != 0).then_some(u32::from(ev.errno)),
        elapsed: Duration::from_nanos(ev.ts_event_ns.saturating_sub(ev.ts_connect_ns)),
    })
}

/// The proxy's view of a `CONN_STATS` value.
pub fn conn_evidence(cs: &ConnStats) -> ConnEvidence {
    ConnEvidence {
        data_retransmits: cs.data_retransmits,
        rtos: cs.rtos,
        srtt: (cs.srtt_us > 0).then(|| Duration::from_micros(u64::from(cs.srtt_us))),
        bytes_acked: cs.bytes_acked,
        unacked_bytes: u64::from(cs.unacked_bytes),
    }
}

/// Holds outcome records until their SO_ERROR read arrives or the join window passes.
/// Time is the kernel's monotonic clock in ns, passed in, so this is testable without sleeping.
#[derive(Debug)]
pub struct Joiner {
    window_ns: u64,
    pending: HashMap<u64, (u64, ConnectRecord)>,
    /// SO_ERROR reads that arrived after their outcome had already been released.
    pub late_so_errors: u64,
}

impl Joiner {
    pub fn new(window: Duration) -> Joiner {
        Joiner {
            window_ns: window.as_nanos() as u64,
            pending: HashMap::new(),
            late_so_errors: 0,
        }
    }

    /// Feeds one decoded record (received at `now_ns`); completed records go to `ready`.
    pub fn push(&mut self, d: Decoded, now_ns: u64, ready: &mut Vec<ConnectRecord>) {
        match d {
            Decoded::Outcome(rec) => {
                // A socket can connect again after a failure (same cookie): release the old one.
                if let Some((_, old)) = self.pending.insert(rec.cookie, (now_ns, rec)) {
                    ready.push(old);
                }
            }
            Decoded::SoError(read) => match self.pending.remove(&read.cookie) {
                Some((_, mut rec)) => {
                    rec.so_error = so_error_text(read.value as u16);
                    ready.push(rec);
                }
                None => self.late_so_errors += 1,
            },
        }
    }

    /// Releases records whose window has passed (all of them when `now_ns` is `u64::MAX`),
    /// oldest first.
    pub fn flush(&mut self, now_ns: u64, ready: &mut Vec<ConnectRecord>) {
        let start = ready.len();
        let window = self.window_ns;
        self.pending.retain(|_, (since, rec)| {
            if now_ns.saturating_sub(*since) >= window {
                ready.push(rec.clone());
                false
            } else {
                true
            }
        });
        ready[start..].sort_by_key(|r| r.ts_unix_ns);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests;
