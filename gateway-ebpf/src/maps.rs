//! Maps shared by every hook, and the table of connect records (`SOCK_STATE`).

use aya_ebpf::{
    btf_maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use gateway_common::{
    ANOMALY_SLOTS, ConnStats, ConnectEvent, DestStats, UpstreamKey, counter,
    names::{
        DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_DESTINATIONS, DEFAULT_MAX_PENDING, EVENTS_RING_BYTES,
    },
};

/// `SockState::flags` bits.
pub const F_CONNECT_SENT: u32 = 1 << 0;
pub const F_ESTABLISHED: u32 = 1 << 1;
pub const F_EMITTED: u32 = 1 << 3;
pub const F_SO_ERROR_SENT: u32 = 1 << 4;
/// connect4/6 turned the socket's sock_ops callbacks on (`connect::callbacks_on`).
pub const F_CALLBACKS_ON: u32 = 1 << 5;
/// The connection left ESTABLISHED (or CLOSE_WAIT) and its callbacks are off: no callback of
/// it can follow (`sockops::closing`).
pub const F_FINISHED: u32 = 1 << 6;
/// An RST arrived for the socket (`reset::gw_tcp_receive_reset`).
pub const F_RST_RECEIVED: u32 = 1 << 7;

/// Everything known about one socket's connect, shared by all hooks through `SOCK_STATE`.
/// This never crosses to userspace; `ev` is the record that does.
#[repr(C)]
pub struct SockState {
    pub ev: ConnectEvent,
    pub last_rto_ns: u64,
    /// Keeps a slot at 128 bytes, two whole cache lines (array values are 8-byte aligned).
    pub _pad: u64,
    pub flags: u32,
    pub data_retransmits: u32,
    pub rtos: u32,
    /// A non-zero SO_ERROR the application read while the connect was still in SYN_SENT: a
    /// soft error (an ICMP that arrived while the socket was locked, kept in sk_err_soft).
    pub app_error: u32,
}

/// The records of recent connects, in a preallocated table indexed by socket cookie: a record
/// goes into the first of its [`WAYS`] candidate slots that holds the socket's earlier record
/// or no connect in flight ([`take_slot`]), and stays until a later record takes that slot. Creating and freeing a per-socket `sk_storage`
/// instead was about half of what the observer cost a connect (docs/kernel.md, "The table of
/// records").
#[btf_map]
pub static SOCK_STATE: Array<SockState, { DEFAULT_MAX_CONNECTIONS as usize }> = Array::new();

/// Set by userspace: `SOCK_STATE`'s size minus one (the size is a power of two).
#[unsafe(no_mangle)]
pub static SOCK_SLOT_MASK: u32 = DEFAULT_MAX_CONNECTIONS - 1;

/// Set by userspace from the running kernel's BTF: `offsetof(struct sock, __sk_common) +
/// offsetof(struct sock_common, skc_cookie)`, for [`sock_cookie`].
#[unsafe(no_mangle)]
pub static SK_COOKIE_OFFSET: u32 = 0;

/// One word per CPU through which [`sock_cookie`] turns a socket pointer into a number it may
/// add an offset to (the verifier forbids arithmetic on a socket pointer, but a
/// pointer stored into a map value reads back as a plain number).
#[btf_map]
pub static SCRATCH: PerCpuArray<u64, 1> = PerCpuArray::new();

/// One record per connect outcome (and at most one SO_ERROR follow-up).
#[btf_map]
pub static EVENTS: RingBuf<ConnectEvent, { EVENTS_RING_BYTES as usize }> = RingBuf::new();

/// Per-destination aggregates.
#[btf_map]
pub static DEST_STATS: LruHashMap<UpstreamKey, DestStats, { DEFAULT_MAX_DESTINATIONS as usize }> =
    LruHashMap::new();

/// Established-connection signals by socket cookie.
#[btf_map]
pub static CONN_STATS: LruHashMap<u64, ConnStats, { DEFAULT_MAX_CONNECTIONS as usize }> =
    LruHashMap::new();

/// The connect in flight on each thread (key: pid_tgid), so that `sys_exit_connect` can report
/// an EADDRNOTAVAIL that never reached sock_ops. Only used before Linux 6.12 (see
/// [`CALLBACKS_AT_CONNECT`]).
#[btf_map]
pub static PENDING_CONNECT: LruHashMap<u64, ConnectEvent, { DEFAULT_MAX_PENDING as usize }> =
    LruHashMap::new();

/// Health of the kernel side itself; see `gateway_common::counter`.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

/// When each anomaly kind was last logged on this CPU (`bpf_ktime_get_ns`); see `anomaly`.
#[btf_map]
pub static ANOMALY_LOGGED: PerCpuArray<u64, { ANOMALY_SLOTS as usize }> = PerCpuArray::new();

/// An anomaly waiting to be logged at the end of the program that found it; see `anomaly`.
#[repr(C)]
pub struct AnomalyPending {
    pub cookie: u64,
    pub kind: u32,
    pub pid: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub armed: u8,
    pub _pad: [u8; 5],
}

#[btf_map]
pub static ANOMALY_PENDING: PerCpuArray<AnomalyPending, 1> = PerCpuArray::new();

/// Set by userspace from the running kernel's BTF: `offsetof(struct sock, sk_err)` and
/// `offsetof(struct sock, sk_err_soft)`. aya has no CO-RE for Rust programs, so the loader
/// resolves the offsets by hand.
#[unsafe(no_mangle)]
pub static SK_ERR_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
pub static SK_ERR_SOFT_OFFSET: u32 = 0;

/// Set by userspace for `gw_raw_sys_exit`: where `struct pt_regs` keeps the syscall number
/// (`orig_ax` on x86-64, `syscallno` on arm64), from the kernel's BTF, and the number of
/// connect() on this architecture.
#[unsafe(no_mangle)]
pub static PT_REGS_SYSCALL_NR_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
pub static SYSCALL_NR_CONNECT: i32 = -1;

/// Set by userspace to 1 when connect4/6 turn on the socket's sock_ops callbacks themselves,
/// with `bpf_setsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS)` (Linux 6.12 and later): then the state
/// callback sees a connect that fails before its SYN, and neither `PENDING_CONNECT` nor a
/// connect-return hook is needed. 0: the loader attached a connect-return hook (an older
/// kernel, or one asked for), which finishes what `PENDING_CONNECT` holds.
#[unsafe(no_mangle)]
pub static CALLBACKS_AT_CONNECT: u32 = 0;

/// Set by userspace to 0 when nothing reads `DEST_STATS` (the proxy, `diagnose`, `gateway
/// observe --no-destination-table`): then no program looks the destination up or counts into
/// it, a tenth to a seventh of what the observer cost a connect in `cargo xtask bench
/// observer` (docs/kernel.md, "Cost"), and the loader makes the map a single entry.
#[unsafe(no_mangle)]
pub static DEST_TABLE: u32 = 1;

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so no atomic is needed.
        unsafe { *p += 1 };
    }
}

/// Candidate slots per record. Cookies come from a counter that the kernel hands to each CPU
/// in batches (`gen_cookie_next()`), so the low bits of a connect's cookie can match those of a
/// connect on another CPU made a moment before: with one slot per cookie, a connect in flight
/// would lose its record to an unrelated one with a probability of about the share of the
/// table in flight; with four, only when all four are.
const WAYS: u32 = 4;

/// A connect with no outcome counts as in flight for this long after its SYN (a SYN-timeout
/// takes 127 s with the stock `tcp_syn_retries`), and for [`UNSENT_NS`] when no SYN was
/// seen, so that a record whose outcome can never come does not hold its slot forever.
const IN_FLIGHT_NS: u64 = 300_000_000_000;
const UNSENT_NS: u64 = 1_000_000_000;

/// Slot `way` of `cookie`'s candidates: the cookie's low bits with the top one or two of them
/// flipped, which for one CPU's consecutive cookies are the slots of connects made a half or a
/// quarter of the table ago.
#[inline(always)]
fn candidate(cookie: u64, way: u32) -> *mut SockState {
    let mask = unsafe { core::ptr::read_volatile(&SOCK_SLOT_MASK) };
    let half = (mask >> 1) + 1;
    let quarter = half >> 1;
    let flip = match way {
        0 => 0,
        1 => half,
        2 => quarter,
        _ => half | quarter,
    };
    SOCK_STATE
        .get_ptr_mut(((cookie as u32) ^ flip) & mask)
        .unwrap_or(core::ptr::null_mut())
}

/// The record of the socket with `cookie`, or null when its connect was not tracked or later
/// records have taken its slot.
#[inline(always)]
pub fn sock_state(cookie: u64) -> *mut SockState {
    if cookie == 0 {
        return core::ptr::null_mut();
    }
    let mut way = 0;
    while way < WAYS {
        let st = candidate(cookie, way);
        if !st.is_null() && unsafe { (*st).ev.cookie } == cookie {
            return st;
        }
        way += 1;
    }
    core::ptr::null_mut()
}

/// Whether `st` is the record of a connect still waiting for its outcome at `now`.
#[inline(always)]
fn in_flight(st: &SockState, now: u64) -> bool {
    if st.ev.cookie == 0 || st.flags & F_EMITTED != 0 {
        return false;
    }
    let age = now.wrapping_sub(st.ev.ts_connect_ns);
    if st.flags & F_CONNECT_SENT != 0 {
        age < IN_FLIGHT_NS
    } else {
        age < UNSENT_NS
    }
}

/// Where a record for `cookie` goes, searched in the order [`sock_state`] searches: the first
/// candidate that already holds this socket's record (an earlier connect of the same socket:
/// `Taken::Mine`), or that holds no connect in flight (`Taken::Free`); else the first candidate, whose connect
/// then loses its record (`Taken::Lost`). Taking the first that qualifies keeps a socket's new
/// record ahead of any older one of its own further on, so lookups find the new one; what sock_ops
/// does when they reach an older one left behind: [`stale`].
#[inline(always)]
pub fn take_slot(cookie: u64, now: u64) -> Option<(*mut SockState, Taken)> {
    let mut way = 0;
    while way < WAYS {
        let st = candidate(cookie, way);
        if !st.is_null() {
            let r = unsafe { &*st };
            if r.ev.cookie == cookie {
                return Some((st, Taken::Mine));
            }
            if !in_flight(r, now) {
                return Some((st, Taken::Free));
            }
        }
        way += 1;
    }
    let st = candidate(cookie, 0);
    if st.is_null() {
        None
    } else {
        Some((st, Taken::Lost))
    }
}

/// What [`take_slot`] found in the slot it returned.
pub enum Taken {
    /// An earlier record of the same socket.
    Mine,
    /// No record, or one whose connect is finished or expired.
    Free,
    /// A connect in flight, whose record is lost.
    Lost,
}

/// Whether a record found by cookie belongs to an earlier connect of the socket rather than
/// the connection now calling back, because no callback of that connect can follow it: it
/// failed (an outcome, never ESTABLISHED); or its connection ended (`F_FINISHED`: closed, or
/// disconnected with `AF_UNSPEC` and connected again); or it never sent a SYN (a route failure,
/// or, before Linux 6.12, EADDRNOTAVAIL, which sock_ops never sees) while this callback comes
/// from past SYN_SENT (`past_syn`, asked only then). Such a record is left behind when the
/// socket connected again and [`take_slot`] put the new record in an earlier candidate, which a
/// later connect has since taken.
#[inline(always)]
pub fn stale(st: &SockState, past_syn: impl FnOnce() -> bool) -> bool {
    st.flags & (F_EMITTED | F_ESTABLISHED) == F_EMITTED
        || st.flags & F_FINISHED != 0
        || (st.flags & F_CONNECT_SENT == 0 && past_syn())
}

/// The socket's cookie as the socket holds it, without assigning one: 0 when nobody has asked
/// for it yet. Read from `struct sock` at the offset the loader found in the kernel's BTF, for
/// the getsockopt program, where `bpf_get_socket_cookie` is refused. The verifier
/// forbids adding an offset to a socket pointer, so the pointer goes through a per-CPU map
/// word first, from which it reads back as a number (allowed to a loader with CAP_PERFMON,
/// which the observer needs anyway).
#[inline(always)]
pub fn sock_cookie(sk: *const u8) -> Result<u64, ()> {
    let word = SCRATCH.get_ptr_mut(0).ok_or(())?;
    let addr = unsafe {
        core::ptr::write_volatile(word, sk as u64);
        core::ptr::read_volatile(word)
    };
    let offset = unsafe { core::ptr::read_volatile(&SK_COOKIE_OFFSET) };
    if offset == 0 {
        return Err(());
    }
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((addr + u64::from(offset)) as *const u64) }
        .map_err(|_| ())
}
