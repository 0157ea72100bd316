//! Connect records as userspace sees them: each ring-buffer record decoded into a typed
//! [`Connect`] outcome or an [`SoErrorRead`] follow-up ([`decode`]), and a connect's
//! `gateway observe --json` form ([`ConnectRecord`], a contract). Also the small conversions
//! every reader needs: kernel keys to socket addresses, errno names, the kernel's clock to Unix
//! time.
//!
//! Joining an outcome with its follow-up, by cookie, is the stream's job (`super::stream`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use gateway_common::{
    AF_INET, ConnectEvent, EventKind, Outcome, RESET_NONE, RESET_SEEN, SO_ERROR_NONE, UpstreamKey,
    errno,
};
use serde::Serialize;

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

/// One connect as the kernel reported it: its outcome record, decoded and typed, and (once the
/// application has read it) the `SO_ERROR` the application got. `Copy` and free of
/// allocations, so that the stream can index it and hand it out cheaply; [`Connect::record`]
/// is its `gateway observe --json` form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    pub cookie: u64,
    pub dst: SocketAddr,
    /// Local port; 0 if the kernel never assigned one.
    pub src_port: u16,
    pub pid: u32,
    /// NUL-padded; see [`comm_str`].
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub outcome: Outcome,
    pub syn_retransmits: u16,
    /// `connect()`, on the kernel's CLOCK_MONOTONIC (`bpf_ktime_get_ns`).
    pub ts_connect_ns: u64,
    /// The outcome, on the same clock.
    pub ts_event_ns: u64,
    /// First SYN to SYN-ACK; established connects only.
    pub syn_rtt: Option<Duration>,
    /// The kernel's error that ended the connect (`ECONNREFUSED`, `ETIMEDOUT`, …).
    pub errno: Option<u32>,
    /// What the application read with `getsockopt(SO_ERROR)`: 0 when it read no error, `None`
    /// while it has not asked.
    pub so_error: Option<u32>,
    /// Whether an RST arrived for the connect; `None` when not known (the tracepoint that
    /// sees RSTs is not attached). A refusal with none was an ICMP port unreachable.
    pub reset: Option<bool>,
}

impl Connect {
    /// Decodes an outcome record; `None` for follow-ups and for values this build does not
    /// know.
    pub fn decode(ev: &ConnectEvent) -> Option<Connect> {
        if ev.kind != EventKind::Outcome as u8 {
            return None;
        }
        let outcome = Outcome::from_u8(ev.outcome)?;
        Some(Connect {
            cookie: ev.cookie,
            dst: key_to_socket_addr(&ev.dst),
            src_port: ev.src_port,
            pid: ev.pid,
            comm: ev.comm,
            cgroup_id: ev.cgroup_id,
            outcome,
            syn_retransmits: ev.syn_retransmits,
            ts_connect_ns: ev.ts_connect_ns,
            ts_event_ns: ev.ts_event_ns,
            syn_rtt: (outcome == Outcome::Established).then(|| Duration::from_nanos(ev.syn_rtt_ns)),
            errno: (ev.errno != 0).then_some(u32::from(ev.errno)),
            so_error: (ev.so_error != SO_ERROR_NONE).then_some(u32::from(ev.so_error)),
            reset: match ev.reset {
                RESET_SEEN => Some(true),
                RESET_NONE => Some(false),
                _ => None,
            },
        })
    }

    /// A refusal (`ECONNREFUSED`) that no RST brought: an ICMP port unreachable, a
    /// firewall's `REJECT`.
    pub fn refused_by_icmp(&self) -> bool {
        self.outcome == Outcome::Refused && self.reset == Some(false)
    }

    /// `connect()` to the outcome.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.ts_event_ns.saturating_sub(self.ts_connect_ns))
    }

    /// The `gateway observe --json` form, with the time converted to Unix time by `clock`.
    pub fn record(&self, clock: &Clock) -> ConnectRecord {
        ConnectRecord {
            ts_unix_ns: clock.unix_ns(self.ts_event_ns),
            dst: self.dst,
            src_port: self.src_port,
            cookie: self.cookie,
            pid: self.pid,
            comm: comm_str(&self.comm),
            cgroup_id: self.cgroup_id,
            outcome: OutcomeName(self.outcome),
            syn_retransmits: self.syn_retransmits,
            elapsed_us: self.elapsed().as_micros() as u64,
            syn_rtt_us: self.syn_rtt.map(|d| d.as_micros() as u64),
            errno: self.errno.map(errno_name),
            so_error: self.so_error.map(so_error_text),
            refused_by: (self.outcome == Outcome::Refused)
                .then(|| self.reset.map(|rst| if rst { "rst" } else { "icmp" }))
                .flatten(),
        }
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
    /// A refused connect: `"rst"` when an RST refused it, `"icmp"` when an ICMP port
    /// unreachable did (a firewall's `REJECT`). Absent otherwise, and when the kernel could not
    /// tell (the tracepoint that sees RSTs is not attached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_by: Option<&'static str>,
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

/// `"0"` for a read of no error, else the errno's name.
fn so_error_text(v: u32) -> String {
    match v {
        0 => "0".to_owned(),
        e => errno_name(e),
    }
}

impl ConnectRecord {
    /// Decodes an outcome record straight into its JSON form; `None` for follow-ups and for
    /// values this build does not know.
    pub fn from_event(ev: &ConnectEvent, clock: &Clock) -> Option<ConnectRecord> {
        Connect::decode(ev).map(|c| c.record(clock))
    }

    pub fn outcome(&self) -> Outcome {
        self.outcome.0
    }
}

/// A `getsockopt(SO_ERROR)` read by an application, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoErrorRead {
    pub cookie: u64,
    pub dst: SocketAddr,
    pub pid: u32,
    /// NUL-padded; see [`comm_str`].
    pub comm: [u8; 16],
    /// The errno read; 0 = no error.
    pub value: u32,
}

/// What one drained ring-buffer record means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    Outcome(Connect),
    SoError(SoErrorRead),
}

/// Decodes one ring-buffer record; `None` for a kind or outcome this build does not know.
pub fn decode(ev: &ConnectEvent) -> Option<Decoded> {
    if ev.kind == EventKind::SoError as u8 && ev.so_error != SO_ERROR_NONE {
        return Some(Decoded::SoError(SoErrorRead {
            cookie: ev.cookie,
            dst: key_to_socket_addr(&ev.dst),
            pid: ev.pid,
            comm: ev.comm,
            value: u32::from(ev.so_error),
        }));
    }
    Connect::decode(ev).map(Decoded::Outcome)
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

#[cfg(test)]
mod tests;
