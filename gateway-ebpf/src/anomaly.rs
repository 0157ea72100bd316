//! Rare kernel-side anomalies: a map insert that failed, a socket whose storage could not be
//! created, a state transition the state machine does not expect. Each is counted in
//! `COUNTERS` (userspace exports the counts) and logged through aya-log, naming the map and the
//! socket, at most once per [`ANOMALY_LOG_INTERVAL_NS`] per kind and CPU (`ANOMALY_LOGGED`
//! holds when each last logged). Only the failure branches call in here, so the per-connect
//! path pays nothing; the rate limit keeps a storm of failures from flooding the log ring
//! (aya-log's `AYA_LOGS`, which wakes the reader per record).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_log_ebpf::warn;
use gateway_common::{AF_INET, ANOMALY_LOG_INTERVAL_NS, UpstreamKey, counter};

use crate::maps::{ANOMALY_LOGGED, bump};

/// Counts the anomaly `kind` (a `counter` index) and logs it unless one of the same kind was
/// logged on this CPU within the interval.
#[inline(always)]
pub fn report(kind: u32, what: &str, map: &str, cookie: u64, dst: &UpstreamKey, pid: u32) {
    bump(kind);
    let Some(last) = ANOMALY_LOGGED.get_ptr_mut(kind) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Per-CPU slot: no other CPU writes it.
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < ANOMALY_LOG_INTERVAL_NS {
        bump(counter::ANOMALY_LOGS_SUPPRESSED);
        return;
    }
    *last = now;
    let port = dst.port;
    if dst.family == AF_INET {
        let ip = [dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]];
        warn!(
            0,
            "kernel anomaly {}: map {}, socket cookie {} (pid {}) to {:i}:{}",
            what,
            map,
            cookie,
            pid,
            ip,
            port
        );
    } else {
        let ip = dst.addr;
        warn!(
            0,
            "kernel anomaly {}: map {}, socket cookie {} (pid {}) to [{:i}]:{}",
            what,
            map,
            cookie,
            pid,
            ip,
            port
        );
    }
}
