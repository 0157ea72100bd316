//! What a request waiting for its response sees of its connection, in the kernel: the bytes
//! the upstream had ACKed before the request (`acked_before`, the baseline that tells this
//! request's bytes from earlier ones), and at each look (`attempt`'s `HOST_DIED_CHECK`) a
//! host or a path that died under it (`host_died`) or a stall on the path (`note_stall`).
//! Also whether the request could go elsewhere (`elsewhere`), which decides whether an attempt
//! is given up early at all.

use std::{net::SocketAddr, os::fd::RawFd, time::Duration};

use tokio::time::Instant;

use super::{Plan, attempt::Failed};
use crate::{
    decide::{
        evidence::{self, ResponseCause, Stall, gives_up_on_stall},
        latency::Source,
        retry::{Delivery, Failure, may_retry},
    },
    diagnose::tcpinfo::TcpInfo,
    proxy::{
        error::ProxyError,
        exchange::Exchange,
        upstream::{Cluster, Endpoint, UpstreamConn, socket_of},
    },
    signals::EstablishedEvidence,
};

/// The connection's `bytes_acked` (SYN excluded) before this request is written, when it can
/// matter and be known: 0 on a fresh connection; on a reused one, read from `TCP_INFO` for a
/// non-idempotent request with kernel signals on (only those need proof that the request
/// never arrived: idempotent ones are retried anyway, and without the kernel's record of the
/// connection's end there is nothing to compare with).
pub(super) fn acked_before(conn: &UpstreamConn, plan: &Plan) -> Option<u64> {
    if conn.is_http2() {
        // Other streams (and the connection preface) share the connection's byte counts.
        return None;
    }
    if conn.connect_time.is_some() {
        return Some(0);
    }
    if !plan.kernel || plan.idempotent {
        return None;
    }
    let fd = conn.socket()?;
    let info = crate::diagnose::tcpinfo::read(fd)?;
    // Checked again after the read: the fd was this connection's socket throughout.
    conn.socket()?;
    // TCP_INFO counts the SYN as one byte, the kernel observer's record does not.
    info.bytes_acked.map(|b| b.saturating_sub(1))
}

/// The request on its connection, once sent.
#[derive(Clone, Copy)]
pub(super) struct OnConn {
    pub cookie: u64,
    /// The socket's descriptor, checked against `cookie` before each use.
    pub fd: RawFd,
    /// The connection's `bytes_acked` before this request, when known.
    pub baseline: Option<u64>,
    pub sent: Instant,
}

/// A look at the request's connection: the failure to give it up with when the kernel shows
/// that the host or the path died under it and the request can go elsewhere
/// (`decide::evidence::gives_up_on_stall`).
pub(super) fn host_died(
    cluster: &Cluster,
    ep: &Endpoint,
    on: OnConn,
    plan: &Plan,
    ex: &Exchange,
) -> Option<Box<Failed>> {
    if !plan.kernel {
        return None;
    }
    let ev = cluster.signals.established_evidence(on.cookie)?;
    let info = live(on);
    let delivery = Delivery::of(on.baseline, Some(acked(info.as_ref(), &ev)));
    let stalled = stall(info.as_ref());
    let tried = |a| ex.record.attempts.iter().any(|t| t.endpoint == a);
    let go = gives_up_on_stall(&ev, stalled, || {
        let reused = ex.record.attempts.last().is_some_and(|a| a.reused);
        let died = Failure::ConnectionDied {
            delivery,
            host_died: true,
            reused,
        };
        elsewhere(cluster, plan, ex, (died, plan.can_replay()))(&tried)
    });
    let error = || ProxyError::UpstreamHostDied {
        endpoint: ep.addr,
        after: on.sent.elapsed(),
        cookie: on.cookie,
        evidence: ev.clone(),
        delivery,
    };
    let health = ResponseCause::HostDied.health_evidence();
    if !go {
        // Kept on its connection for want of a retry (the policy, the retry budget) while
        // other endpoints take new requests: the endpoint is told of the death all the same,
        // as when a request gives up, unless it is out already (ejected again, it would be
        // out longer).
        if evidence::host_died(&ev)
            && stalled.now()
            && ep.health.routable()
            && cluster.has_untried(tried)
        {
            cluster.report(ep, health, &|| error().to_string());
        }
        return None;
    }
    let error = error();
    cluster.report(ep, health, &|| error.to_string());
    Some(Failed::new(error, delivery, None))
}

/// `TCP_INFO` of the request's connection now, when it is still open: the kernel observer's
/// record is written at RTOs, retransmits and state changes only, so its counts can be stale.
pub(super) fn live(on: OnConn) -> Option<TcpInfo> {
    socket_of(on.fd, on.cookie).and_then(crate::diagnose::tcpinfo::read)
}

/// The connection's stall now (none when `TCP_INFO` cannot be read).
pub(super) fn stall(info: Option<&TcpInfo>) -> Stall {
    info.map_or_else(Stall::default, |i| Stall {
        unrecovered_rtos: i.unrecovered_rtos,
        rto: Duration::from_micros(u64::from(i.rto_us)),
    })
}

/// The connection's bytes ACKed (SYN excluded): now, else as the kernel's record last had them.
pub(super) fn acked(info: Option<&TcpInfo>, record: &EstablishedEvidence) -> u64 {
    info.and_then(|i| i.bytes_acked)
        .map_or(record.bytes_acked, |b| b.saturating_sub(1))
}

/// Whether the request could go elsewhere after `failure`: a retry its policy allows, and a
/// routable endpoint it has not tried (`tried`), found without a pick (which has side
/// effects). Asked before an attempt is given up early, which only helps a request that can
/// go elsewhere (`decide::deadline::gives_up_at_deadline`,
/// `decide::evidence::gives_up_on_stall`). The retry budget is looked at when asked, without
/// taking a permit: a request given up early when the budget was spent failed with
/// `retry budget spent`, where it could have run on.
pub(super) fn elsewhere<'c>(
    cluster: &'c Cluster,
    plan: &Plan,
    ex: &Exchange,
    (failure, resendable): (Failure, bool),
) -> impl Fn(&dyn Fn(SocketAddr) -> bool) -> bool + Sync + use<'c> {
    let policy = &plan.route.retry;
    let retry = may_retry(failure, super::attempted(plan, ex, resendable), policy);
    let (percent, min) = (policy.budget_percent, policy.min_retry_concurrency);
    move |tried| retry && cluster.has_untried(tried) && cluster.budgets.retry_room(percent, min)
}

/// Request bytes still unACKed by the upstream's kernel (`TCP_INFO`) more than three smoothed
/// RTTs after sending: the wait so far is on the path, and the endpoint's latency is at least
/// that (`decide::latency`).
pub(super) fn note_stall(cluster: &Cluster, ep: &Endpoint, on: OnConn) {
    let waited = on.sent.elapsed();
    let Some(info) = live(on) else {
        return;
    };
    if info.unacked > 0 && waited > Duration::from_micros(u64::from(info.rtt_us) * 3) {
        ep.latency
            .lower_bound(waited, Source::Stalls, &cluster.spec.latency);
    }
}
