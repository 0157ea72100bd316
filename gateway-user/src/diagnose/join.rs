//! Joins what a probe saw of its own attempt (`connect()`'s result, its clock, `TCP_INFO`)
//! with the kernel's record of the same socket, found by `SO_COOKIE`: the kernel's facts win
//! where it has them, and each [`Attempt`] says where its values come from.

use gateway_common::{Outcome, errno};

use super::{
    kernel::KernelSession,
    measure::{Attempt, AttemptOutcome, Source},
    probe::{ConnectResult, Observed},
};
use crate::observer::records::errno_name;

/// What `connect()`'s errno says, when the kernel's record is missing.
fn outcome_of_errno(e: i32) -> AttemptOutcome {
    match e as u32 {
        errno::ECONNREFUSED | errno::ECONNRESET => AttemptOutcome::Refused,
        errno::ETIMEDOUT => AttemptOutcome::Timeout,
        errno::EADDRNOTAVAIL => AttemptOutcome::AddrUnavailable,
        errno::EHOSTUNREACH
        | errno::ENETUNREACH
        | errno::EHOSTDOWN
        | errno::ENONET
        | errno::EPROTO
        | errno::ENETDOWN => AttemptOutcome::Unreachable,
        errno::EPERM | errno::EACCES => AttemptOutcome::Denied,
        _ => AttemptOutcome::Error,
    }
}

/// Joins what the prober saw with the kernel's record of the same socket (by cookie).
pub(super) fn to_attempt(o: &Observed, kernel: Option<&KernelSession>) -> Attempt {
    let (user_outcome, user_errno) = match &o.result {
        ConnectResult::Established => (AttemptOutcome::Established, None),
        ConnectResult::DeadlineHit => (AttemptOutcome::Deadline, None),
        ConnectResult::Failed(e) => (outcome_of_errno(*e), Some(errno_name(*e as u32))),
        ConnectResult::Local(msg) => (AttemptOutcome::Error, Some(msg.clone())),
    };
    let elapsed_us = o.elapsed.as_micros() as u64;
    let mut http = o.http.clone();
    let record = kernel
        .filter(|_| o.cookie != 0)
        .and_then(|k| k.record(o.cookie));
    let Some(rec) = record else {
        return Attempt {
            cookie: o.cookie,
            outcome: user_outcome,
            source: Source::Userspace,
            errno: user_errno,
            elapsed_us,
            syn_retransmits: o.syn_retransmits,
            syn_rtt_us: (user_outcome == AttemptOutcome::Established).then_some(elapsed_us),
            refused_by_icmp: false,
            http,
        };
    };
    let outcome = match rec.outcome {
        Outcome::Established => AttemptOutcome::Established,
        Outcome::Refused => AttemptOutcome::Refused,
        Outcome::Timeout => AttemptOutcome::Timeout,
        Outcome::Unreachable => AttemptOutcome::Unreachable,
        Outcome::AddrUnavailable => AttemptOutcome::AddrUnavailable,
        // The prober closed the socket: its deadline, or a local failure it knows better.
        Outcome::Aborted => user_outcome,
    };
    if let (Some(h), Some(cs)) = (http.as_mut(), kernel.and_then(|k| k.conn_stats(o.cookie))) {
        h.data_retransmits = Some(cs.data_retransmits);
        h.rtos = Some(cs.rtos);
        h.source = Source::Kernel;
        // The kernel counts the connection's data retransmits; less those before the first
        // request line was ACKed, the rest came after.
        if let (Some(_), Some(before)) = (h.accept_us, h.retransmits_before_accept) {
            h.retransmits_after_accept = Some(cs.data_retransmits.saturating_sub(before));
        }
    }
    Attempt {
        cookie: o.cookie,
        outcome,
        source: Source::Kernel,
        errno: rec.errno.map(errno_name).or(user_errno),
        elapsed_us,
        syn_retransmits: Some(u32::from(rec.syn_retransmits)),
        syn_rtt_us: rec.syn_rtt.map(|d| d.as_micros() as u64),
        refused_by_icmp: rec.refused_by_icmp(),
        http,
    }
}
