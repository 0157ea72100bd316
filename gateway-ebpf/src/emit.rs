//! Sending a record, and folding it into the per-destination aggregates.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use gateway_common::{
    DestStats, EventKind, OUTCOME_SLOTS, Outcome, SYN_RTT_BUCKETS, UpstreamKey, counter, errno,
};

use crate::{
    anomaly,
    maps::{DEST_STATS, DEST_TABLE, EVENTS, F_EMITTED, F_SO_ERROR_SENT, SockState, bump},
};

/// `BPF_RB_NO_WAKEUP`: userspace drains on a timer instead of being woken per record.
const BPF_RB_NO_WAKEUP: u64 = 1;

const ZERO_STATS: DestStats = unsafe { core::mem::zeroed() };

/// Sends the outcome record of `st` and counts it in `DEST_STATS`. Idempotent: a socket's
/// outcome is sent once.
#[inline(always)]
pub fn outcome(st: &mut SockState, outcome: Outcome, err: u32, now_ns: u64) {
    if st.flags & F_EMITTED != 0 {
        return;
    }
    st.flags |= F_EMITTED;
    st.ev.kind = EventKind::Outcome as u8;
    st.ev.outcome = outcome as u8;
    st.ev.errno = err as u16;
    st.ev.ts_event_ns = now_ns;
    if EVENTS.output(&st.ev, BPF_RB_NO_WAKEUP).is_err() {
        bump(counter::EVENTS_LOST);
    }
    let Some(stats) = dest_stats(&st.ev.dst, st.ev.cookie, st.ev.pid) else {
        return;
    };
    let stats = unsafe { &mut *stats };
    let slot = outcome as usize;
    if slot < OUTCOME_SLOTS {
        add(&mut stats.attempts[slot], 1);
    }
    if st.ev.syn_retransmits != 0 {
        add(&mut stats.syn_retransmits, u64::from(st.ev.syn_retransmits));
    }
    if outcome == Outcome::Established {
        let us = st.ev.syn_rtt_ns / 1000;
        add(&mut stats.syn_rtt_sum_us, us);
        if let Some(b) = stats.syn_rtt_hist.get_mut(log2_bucket(us)) {
            add(b, 1);
        }
    }
}

/// Sends the SO_ERROR follow-up record once the application has read SO_ERROR after the
/// outcome, and counts a non-zero value per destination.
#[inline(always)]
pub fn so_error(st: &mut SockState, value: u32) {
    if value != 0 {
        if let Some(stats) = dest_stats(&st.ev.dst, st.ev.cookie, st.ev.pid) {
            let stats = unsafe { &mut *stats };
            if let Some(c) = stats.so_errors.get_mut(errno::so_error_slot(value)) {
                add(c, 1);
            }
        }
    }
    if st.flags & F_EMITTED == 0 {
        // Read while the connect is still in flight. A non-zero value is a soft error the
        // application acted on; it goes into the outcome record when the socket closes.
        if value != 0 {
            st.app_error = value;
            st.ev.so_error = value as u16;
            st.flags |= F_SO_ERROR_SENT;
        }
        return;
    }
    if st.flags & F_SO_ERROR_SENT != 0 {
        return;
    }
    st.flags |= F_SO_ERROR_SENT;
    st.ev.kind = EventKind::SoError as u8;
    st.ev.so_error = value as u16;
    st.ev.ts_event_ns = unsafe { bpf_ktime_get_ns() };
    if EVENTS.output(&st.ev, BPF_RB_NO_WAKEUP).is_err() {
        bump(counter::EVENTS_LOST);
    }
}

/// The aggregate slot of `dst`, created on first use; none when userspace keeps no table
/// (`DEST_TABLE`). `cookie` and `pid` name the socket in the anomaly log if the slot cannot be
/// created.
#[inline(always)]
pub fn dest_stats(dst: &UpstreamKey, cookie: u64, pid: u32) -> Option<*mut DestStats> {
    if unsafe { core::ptr::read_volatile(&DEST_TABLE) } == 0 {
        return None;
    }
    if let Some(p) = DEST_STATS.get_ptr_mut(dst) {
        return Some(p);
    }
    // Another CPU may insert the same key between our lookup and insert: NOEXIST makes that a
    // harmless EEXIST, and the second lookup finds whichever entry won. Only a successful
    // insert counts as a new destination (evictions = inserts - entries).
    if DEST_STATS
        .insert(dst, &ZERO_STATS, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        bump(counter::DEST_INSERTED);
    }
    let p = DEST_STATS.get_ptr_mut(dst);
    if p.is_none() {
        anomaly::report(counter::DEST_INSERT_FAILED, cookie, dst, pid);
    }
    p
}

#[inline(always)]
pub fn add(counter: &mut u64, n: u64) {
    // Shared by all CPUs: an atomic add (BPF_ATOMIC | BPF_ADD), result unused. The BPF target
    // has no `AtomicU64::fetch_add` in core, so the intrinsic it lowers to is called directly.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        )
    };
}

/// floor(log2(us)), clamped to the histogram. Written as shifts because BPF has no clz
/// instruction and LLVM would otherwise emit a libcall.
#[inline(always)]
fn log2_bucket(us: u64) -> usize {
    let mut v = us;
    let mut b = 0usize;
    if v >= 1 << 32 {
        v >>= 32;
        b += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        b += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        b += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        b += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        b += 2;
    }
    if v >= 1 << 1 {
        b += 1;
    }
    if b >= SYN_RTT_BUCKETS {
        SYN_RTT_BUCKETS - 1
    } else {
        b
    }
}

/// Sends an EADDRNOTAVAIL record. The socket never got a port, so sock_ops never ran and the
/// record lives only in `PENDING_CONNECT`.
#[inline(always)]
pub fn addr_unavailable(ev: &gateway_common::ConnectEvent) {
    if EVENTS.output(ev, BPF_RB_NO_WAKEUP).is_err() {
        bump(counter::EVENTS_LOST);
    }
    if let Some(stats) = dest_stats(&ev.dst, ev.cookie, ev.pid) {
        add(
            unsafe { &mut (*stats).attempts[Outcome::AddrUnavailable as usize] },
            1,
        );
    }
}
