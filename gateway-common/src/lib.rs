//! Types that cross the kernel/user boundary, and the names of the maps and programs.
//!
//! Everything here is `#[repr(C)]`, `Copy`, and laid out with explicit padding so that the
//! eBPF object and the userspace reader agree byte for byte. The `const` assertions at the
//! bottom keep that honest. With the `user` feature the types also implement `aya::Pod`.
#![no_std]

pub mod errno;
pub mod names;

/// Address family values, as in `<sys/socket.h>`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A TCP destination: the kernel's aggregate key, the health table's key and the metric label.
///
/// IPv4 addresses sit in the first four bytes of `addr`; the rest is zero. The port is in host
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UpstreamKey {
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

/// How a connect ended. The numeric values are part of the ring-buffer format.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A SYN-ACK arrived.
    Established = 1,
    /// An RST arrived (ECONNREFUSED).
    Refused = 2,
    /// The kernel gave up after its SYN retries (ETIMEDOUT).
    Timeout = 3,
    /// An ICMP error ended the connect (EHOSTUNREACH, ENETUNREACH, ...).
    Unreachable = 4,
    /// The application closed the socket while it was still in SYN_SENT.
    Aborted = 5,
    /// `connect()` failed with EADDRNOTAVAIL: no ephemeral port was free.
    AddrUnavailable = 6,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Established,
        Outcome::Refused,
        Outcome::Timeout,
        Outcome::Unreachable,
        Outcome::Aborted,
        Outcome::AddrUnavailable,
    ];

    pub const fn from_u8(v: u8) -> Option<Outcome> {
        match v {
            1 => Some(Outcome::Established),
            2 => Some(Outcome::Refused),
            3 => Some(Outcome::Timeout),
            4 => Some(Outcome::Unreachable),
            5 => Some(Outcome::Aborted),
            6 => Some(Outcome::AddrUnavailable),
            _ => None,
        }
    }

    /// The name used in JSON output and metric labels. This is a contract.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Established => "established",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::Aborted => "aborted",
            Outcome::AddrUnavailable => "addr_unavailable",
        }
    }

    /// The outcome of a connect that the kernel ended with `err` while in SYN_SENT.
    /// `err == 0` means nobody reported an error: the application closed the socket.
    pub const fn from_errno(err: u32) -> Outcome {
        match err {
            0 => Outcome::Aborted,
            errno::ECONNREFUSED | errno::ECONNRESET => Outcome::Refused,
            errno::ETIMEDOUT => Outcome::Timeout,
            errno::EADDRNOTAVAIL => Outcome::AddrUnavailable,
            // Everything else that ends a SYN_SENT socket arrives as an ICMP error:
            // EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENONET, EPROTO, EACCES, EMSGSIZE.
            _ => Outcome::Unreachable,
        }
    }
}

/// Number of slots in [`DestStats::attempts`]: index = `Outcome as usize`, slot 0 unused.
pub const OUTCOME_SLOTS: usize = 8;

/// What a ring-buffer record reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The outcome of one connect. Exactly one per tracked connect.
    Outcome = 1,
    /// The application read `SO_ERROR` after the outcome record was sent. At most one per
    /// connect; userspace joins it to the outcome by `cookie`.
    SoError = 2,
}

/// `so_error` value meaning "the application never read SO_ERROR".
pub const SO_ERROR_NONE: u16 = u16::MAX;

/// One ring-buffer record. Fields are filled at `connect()` (cgroup connect4/6) and completed
/// when the outcome is known.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    /// `SO_COOKIE` of the socket: the join key with a proxy's own attempt.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) inside `connect()`.
    pub ts_connect_ns: u64,
    /// `bpf_ktime_get_ns()` when the outcome happened (or SO_ERROR was read, for `SoError`).
    pub ts_event_ns: u64,
    /// SYN sent to SYN-ACK received, nanoseconds; 0 unless established. For a SYN sent once,
    /// the kernel's own first RTT sample (microsecond resolution); after SYN retransmits, the
    /// time since `connect()`, retransmit timeouts included.
    pub syn_rtt_ns: u64,
    /// cgroup v2 id of the socket's creator.
    pub cgroup_id: u64,
    pub dst: UpstreamKey,
    /// Thread-group id (the process id as `ps` shows it) of the caller of `connect()`.
    pub pid: u32,
    /// `comm` of the caller of `connect()`, NUL-padded.
    pub comm: [u8; 16],
    /// Local port, host order; 0 when the kernel never assigned one.
    pub src_port: u16,
    pub syn_retransmits: u16,
    /// Kernel errno that ended the connect, 0 if none.
    pub errno: u16,
    /// `SO_ERROR` as read by the application, or [`SO_ERROR_NONE`].
    pub so_error: u16,
    /// [`EventKind`] as u8.
    pub kind: u8,
    /// [`Outcome`] as u8.
    pub outcome: u8,
    /// Whether an RST ended the connect ([`RESET_SEEN`]) or it ended with none
    /// ([`RESET_NONE`]: for `ECONNREFUSED`, an ICMP port unreachable, a firewall's `REJECT`),
    /// seen by the `tcp:tcp_receive_reset` tracepoint; [`RESET_UNKNOWN`] without it.
    pub reset: u8,
    pub _pad: [u8; 5],
}

/// [`ConnectEvent::reset`]: not known (the tracepoint is not attached).
pub const RESET_UNKNOWN: u8 = 0;
/// [`ConnectEvent::reset`]: an RST arrived for the connect.
pub const RESET_SEEN: u8 = 1;
/// [`ConnectEvent::reset`]: no RST arrived for the connect.
pub const RESET_NONE: u8 = 2;

/// Per-destination aggregates kept by the kernel side in an LRU hash keyed by [`UpstreamKey`].
/// Every counter only grows; readers compute rates from deltas.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DestStats {
    /// Connect attempts by outcome; index = `Outcome as usize`.
    pub attempts: [u64; OUTCOME_SLOTS],
    /// SYNs retransmitted by connects to this destination.
    pub syn_retransmits: u64,
    /// Data segments retransmitted on established connections.
    pub data_retransmits: u64,
    /// Retransmission timeouts on established connections.
    pub rtos: u64,
    /// Sum of SYN-RTTs in microseconds (for a mean).
    pub syn_rtt_sum_us: u64,
    /// log2 histogram of SYN-RTT in microseconds: bucket `i` counts RTTs in
    /// `[2^i, 2^(i+1))` µs, bucket 0 also counts RTTs under 1 µs, the last bucket everything above.
    pub syn_rtt_hist: [u64; SYN_RTT_BUCKETS],
    /// `getsockopt(SO_ERROR)` reads that returned an error, by [`errno::SoErrorSlot`].
    pub so_errors: [u64; errno::SO_ERROR_SLOTS],
}

pub const SYN_RTT_BUCKETS: usize = 24;

/// Per-connection signals of an established connection, in an LRU hash keyed by cookie.
/// Written when an RTO or retransmit happens, and when the connection ends if it was reset or
/// aborted or had anything to tell (a retransmit, an RTO, bytes left unACKed). No record after
/// a close means a clean one: everything ACKed, nothing retransmitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnStats {
    /// Bytes of our data the peer's kernel has ACKed (`tcp_sock.bytes_acked` less the SYN).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// `bpf_ktime_get_ns()` of the most recent RTO, 0 if none.
    pub last_rto_ns: u64,
    /// `bpf_ktime_get_ns()` when the connection left ESTABLISHED (or CLOSE_WAIT), 0 while
    /// open.
    pub closed_ns: u64,
    pub data_retransmits: u32,
    pub rtos: u32,
    /// Smoothed RTT in microseconds at the last update.
    pub srtt_us: u32,
    /// `snd_nxt - snd_una` at the last update: bytes sent and not yet ACKed.
    pub unacked_bytes: u32,
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// An outcome record could not be reserved in the ring buffer.
    pub const EVENTS_LOST: u32 = 0;
    /// A destination could not be added to `DEST_STATS`.
    pub const DEST_INSERT_FAILED: u32 = 1;
    /// A connection could not be added to `CONN_STATS`.
    pub const CONN_INSERT_FAILED: u32 = 2;
    /// A connect that had sent its SYN and had no outcome yet lost its record: a newer
    /// connect took its `SOCK_STATE` slot (the table holds the last `max_connections`).
    pub const SLOT_REUSED: u32 = 3;
    /// Destinations added to `DEST_STATS`. The LRU evicts silently, so evictions are this
    /// minus the entries the map holds (nothing else ever deletes one).
    pub const DEST_INSERTED: u32 = 4;
    /// A tracked socket left SYN_SENT for a state other than ESTABLISHED or CLOSE, or left
    /// ESTABLISHED without the kernel having reported it established.
    pub const UNEXPECTED_STATE: u32 = 5;
    /// Anomaly log lines not written because one of the same kind was written on that CPU
    /// within the last [`super::ANOMALY_LOG_INTERVAL_NS`].
    pub const ANOMALY_LOGS_SUPPRESSED: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// The rare kernel-side anomalies, each reported through aya-log (rate-limited per kind and
/// CPU) and counted in `COUNTERS` at the index of the same value.
pub mod anomaly {
    use super::counter;

    /// Kinds, as `COUNTERS` indices.
    pub const KINDS: [(u32, &str); 4] = [
        (counter::DEST_INSERT_FAILED, "dest_insert_failed"),
        (counter::CONN_INSERT_FAILED, "conn_insert_failed"),
        (counter::SLOT_REUSED, "slot_reused"),
        (counter::UNEXPECTED_STATE, "unexpected_state"),
    ];
}

/// At most one anomaly log line per kind per CPU in this many nanoseconds.
pub const ANOMALY_LOG_INTERVAL_NS: u64 = 1_000_000_000;
/// Slots of the per-CPU `ANOMALY_LOGGED` array: one per [`counter`] index.
pub const ANOMALY_SLOTS: u32 = counter::COUNT;

const _: () = assert!(core::mem::size_of::<UpstreamKey>() == 20);
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == 96);
const _: () = assert!(
    core::mem::size_of::<DestStats>()
        == 8 * (OUTCOME_SLOTS + 4 + SYN_RTT_BUCKETS + errno::SO_ERROR_SLOTS)
);
const _: () = assert!(core::mem::size_of::<ConnStats>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain only integers, and have no implicit padding
    // (checked by the size assertions above).
    unsafe impl aya::Pod for super::UpstreamKey {}
    unsafe impl aya::Pod for super::ConnectEvent {}
    unsafe impl aya::Pod for super::DestStats {}
    unsafe impl aya::Pod for super::ConnStats {}
}
