//! Rare kernel-side anomalies: a map insert that failed, a connect in flight whose record a
//! newer one took (the table of records is too small for the connects in flight), a state
//! transition the state machine does not expect. Each is counted in
//! `COUNTERS` (userspace exports the counts) and logged through aya-log, naming the map and the
//! socket, at most once per [`ANOMALY_LOG_INTERVAL_NS`] per kind and CPU (`ANOMALY_LOGGED`
//! holds when each last logged).
//!
//! Off the hot path: only failure branches call [`report`], which counts, applies the rate
//! limit and parks the details in the per-CPU `ANOMALY_PENDING` slot; [`flush`] writes the
//! line. `gw_connect4` and `gw_connect6` call it once on their way out, and `gw_sock_ops` after
//! a run that may have parked one (its outcome, or something remarkable: not the runs that
//! return at once, a connect's SYN, or a clean close). An anomaly parked by `gw_getsockopt` or
//! `gw_sys_exit_connect` is written by the next of those to look on that CPU. Few log call sites keep the verifier's work, and
//! so the observer's start-up, small: aya-log's formatting code is large, and inlined at every
//! failure branch it made `gw_sock_ops` alone take 0.5 s to verify.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_log_ebpf::warn;
use gateway_common::{AF_INET, ANOMALY_LOG_INTERVAL_NS, UpstreamKey, counter};

use crate::maps::{ANOMALY_LOGGED, ANOMALY_PENDING, AnomalyPending, bump};

/// What the log line calls each anomaly kind, and which map it concerns.
#[inline(always)]
fn describe(kind: u32) -> (&'static str, &'static str) {
    match kind {
        counter::DEST_INSERT_FAILED => ("insert failed", "DEST_STATS"),
        counter::CONN_INSERT_FAILED => ("insert failed", "CONN_STATS"),
        counter::SLOT_REUSED => ("record of a connect in flight overwritten", "SOCK_STATE"),
        _ => ("unexpected state transition", "SOCK_STATE"),
    }
}

/// Counts the anomaly `kind` (a `counter` index) and, unless one of the same kind was logged
/// on this CPU within the interval, parks it for [`flush`].
#[inline(always)]
pub fn report(kind: u32, cookie: u64, dst: &UpstreamKey, pid: u32) {
    bump(kind);
    let (Some(last), Some(pending)) = (
        ANOMALY_LOGGED.get_ptr_mut(kind),
        ANOMALY_PENDING.get_ptr_mut(0),
    ) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Per-CPU slots: no other CPU writes them, and a program runs to completion on one CPU.
    let (last, pending) = unsafe { (&mut *last, &mut *pending) };
    if *last != 0 && now.wrapping_sub(*last) < ANOMALY_LOG_INTERVAL_NS {
        bump(counter::ANOMALY_LOGS_SUPPRESSED);
        return;
    }
    *last = now;
    pending.kind = kind;
    pending.pid = pid;
    pending.cookie = cookie;
    pending.port = dst.port;
    if dst.family == AF_INET {
        // As an IPv4-mapped IPv6 address, so that one format prints both families.
        pending.addr = [0; 16];
        pending.addr[10] = 0xff;
        pending.addr[11] = 0xff;
        pending.addr[12] = dst.addr[0];
        pending.addr[13] = dst.addr[1];
        pending.addr[14] = dst.addr[2];
        pending.addr[15] = dst.addr[3];
    } else {
        pending.addr = dst.addr;
    }
    pending.armed = 1;
}

/// Writes the line parked by [`report`], if any. Called at the end of every connect4/6 run, and
/// of every sock_ops run that may have parked one (see the module's text).
#[inline(always)]
pub fn flush() {
    let Some(pending) = ANOMALY_PENDING.get_ptr_mut(0) else {
        return;
    };
    let pending: &mut AnomalyPending = unsafe { &mut *pending };
    if pending.armed == 0 {
        return;
    }
    pending.armed = 0;
    let (what, map) = describe(pending.kind);
    let (cookie, pid, addr, port) = (pending.cookie, pending.pid, pending.addr, pending.port);
    warn!(
        0,
        "kernel anomaly {}: map {}, socket cookie {} (pid {}) to [{:i}]:{}",
        what,
        map,
        cookie,
        pid,
        addr,
        port
    );
}
