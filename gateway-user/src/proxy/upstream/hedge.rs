//! Hedged connects: when an endpoint has not answered a SYN by its connect deadline, a connect
//! to another healthy endpoint races it; the first to establish wins and the other is closed.
//!
//! A hedge needs `hedge = true`, a deadline below the hard cap (an adaptive one: with the
//! configured timeout as deadline there is no time left to race in), another endpoint that is
//! healthy (not suspect) and not tried yet, room in the hedge budget (`decide::budget`) and a
//! free connection slot. The first connect keeps running until `connect_timeout_ms` after it
//! started; the hedge gets its own endpoint's deadline.

use std::{future::Future, net::SocketAddr, ops::ControlFlow, pin::Pin, sync::Arc, time::Duration};

use tokio::{sync::OwnedSemaphorePermit, time::Instant};

use super::{
    Cluster,
    connect::{Pending, finish, handshake},
    endpoint::Endpoint,
    pool::UpstreamConn,
};
use crate::{
    decide::{budget::HedgePermit, deadline::may_hedge, health::Evidence},
    proxy::{error::ProxyError, telemetry::HedgeResult},
};

/// A route's hedging knobs (its cluster's `retry.hedge` and `hedge_budget_percent`, or the
/// route's overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hedging {
    pub enabled: bool,
    pub budget_percent: u32,
    /// The request's hashed key (`consistent_hash`): the hedge goes to the key's next
    /// endpoint, where the key moves if the first is ejected.
    pub key: Option<u64>,
}

/// A hedge that may start: its endpoint, budget permit and connection slot.
pub(super) struct Hedge {
    pub endpoint: Arc<Endpoint>,
    _permit: HedgePermit,
    slot: OwnedSemaphorePermit,
}

/// A hedge for `ep`, whose connect passed its `deadline`, if one is allowed now.
pub(super) fn plan(
    cluster: &Cluster,
    ep: &Endpoint,
    deadline: Duration,
    tried: &(dyn Fn(SocketAddr) -> bool + Sync),
    hedging: Hedging,
) -> Option<Hedge> {
    if !may_hedge(hedging.enabled, deadline, cluster.spec.timeouts.connect) {
        return None;
    }
    let endpoint = cluster
        .pick(|a| a == ep.addr || tried(a), (hedging.key, false))
        .ok()
        .filter(|e| !e.health.suspect())?;
    let budget = cluster
        .budgets
        .try_hedge(hedging.budget_percent)
        .zip(cluster.slots.clone().try_acquire_owned().ok());
    let Some((permit, slot)) = budget else {
        cluster.meter.hedge(HedgeResult::BudgetExhausted);
        return None;
    };
    Some(Hedge {
        endpoint,
        _permit: permit,
        slot,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Which {
    First,
    Second,
}

/// How one side of a race ended.
#[derive(Debug)]
pub(super) enum Ended<T> {
    /// Its future completed (established or failed).
    Done(T),
    /// Its cap passed first.
    Capped,
}

/// Runs two futures until `on_end` breaks with a winner, or both have ended (completed or
/// capped). Returns the winner and whether the other side had already ended.
pub(super) async fn race<A, B, T, W>(
    mut a: Pin<&mut A>,
    a_cap: Instant,
    mut b: Pin<&mut B>,
    b_cap: Instant,
    mut on_end: impl FnMut(Which, Ended<T>) -> ControlFlow<W>,
) -> Option<(W, bool)>
where
    A: Future<Output = T> + ?Sized,
    B: Future<Output = T> + ?Sized,
{
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        let (which, end) = tokio::select! {
            r = a.as_mut(), if !a_done => (Which::First, Ended::Done(r)),
            r = b.as_mut(), if !b_done => (Which::Second, Ended::Done(r)),
            _ = tokio::time::sleep_until(a_cap), if !a_done => (Which::First, Ended::Capped),
            _ = tokio::time::sleep_until(b_cap), if !b_done => (Which::Second, Ended::Capped),
        };
        match which {
            Which::First => a_done = true,
            Which::Second => b_done = true,
        }
        if let ControlFlow::Break(w) = on_end(which, end) {
            let other_done = match which {
                Which::First => b_done,
                Which::Second => a_done,
            };
            return Some((w, other_done));
        }
    }
    None
}

/// Races `first` (past its deadline) against a connect to the hedge's endpoint.
pub(super) async fn race_connects(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    mut first: Pending,
    slot: OwnedSemaphorePermit,
    hedge: Hedge,
) -> Result<(Arc<Endpoint>, UpstreamConn), ProxyError> {
    ep.health.history.hedged();
    let ep2 = hedge.endpoint.clone();
    let deadline2 = ep2.health.deadline(&cluster.spec).value;
    let mut second = Pending::start(ep2.addr)?;
    let (info, info2) = (first.info, second.info);
    let cap = info.start + cluster.spec.timeouts.connect;
    let cap2 = info2.start + deadline2;
    let mut last_err = None;
    let won = race(
        first.fut.as_mut(),
        cap,
        second.fut.as_mut(),
        cap2,
        |which, end| {
            let (e, p) = match which {
                Which::First => (ep, info),
                Which::Second => (&ep2, info2),
            };
            match end {
                Ended::Done(r) => match finish(cluster, e, p, r) {
                    Ok(c) => return ControlFlow::Break((which, c)),
                    Err(err) => last_err = Some(err),
                },
                Ended::Capped => {
                    e.meter.connect_abandoned(None, true);
                    if which == Which::Second {
                        cluster.report(e, Evidence::SynUnanswered, &|| {
                            format!("no SYN-ACK, no RST, no ICMP within the {} ms connect deadline (hedged connect)", deadline2.as_millis())
                        });
                    }
                }
            }
            ControlFlow::Continue(())
        },
    )
    .await;
    match won {
        Some(((Which::First, c), other_done)) => {
            if !other_done {
                ep2.meter.connect_abandoned(None, false);
            }
            cluster.meter.hedge(HedgeResult::Lost);
            drop((second, hedge));
            Ok((ep.clone(), handshake(cluster, ep, c, slot).await?))
        }
        Some(((Which::Second, c), other_done)) => {
            if !other_done {
                ep.meter.connect_abandoned(None, true);
            }
            cluster.meter.hedge(HedgeResult::Won);
            // The first connect's slot too: the request holds one connection, not two, during
            // the handshake (a TLS one may take `tls_handshake_timeout`).
            drop((first, slot));
            Ok((ep2.clone(), handshake(cluster, &ep2, c, hedge.slot).await?))
        }
        None => {
            cluster.meter.hedge(HedgeResult::Lost);
            drop(first);
            Err(last_err.unwrap_or_else(|| {
                Pending::timed_out(
                    ep.addr,
                    info.cookie,
                    cluster.spec.timeouts.connect,
                    &*cluster.signals,
                )
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn after(ms: u64, v: &'static str) -> &'static str {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        v
    }

    /// Runs a race where every completed side is accepted; returns the winner, whether the
    /// other side had ended, the events in order, and the time taken.
    async fn run(
        a: (u64, u64),
        b: (u64, u64),
        accept: &[&str],
    ) -> (Option<(&'static str, bool)>, Vec<String>, Duration) {
        let t0 = Instant::now();
        let fa = std::pin::pin!(after(a.0, "a"));
        let fb = std::pin::pin!(after(b.0, "b"));
        let mut events = Vec::new();
        let won = race(
            fa,
            t0 + Duration::from_millis(a.1),
            fb,
            t0 + Duration::from_millis(b.1),
            |which, end| {
                let at = t0.elapsed().as_millis();
                match end {
                    Ended::Done(v) => {
                        events.push(format!("{which:?} done {v} at {at}"));
                        if accept.contains(&v) {
                            return ControlFlow::Break(v);
                        }
                    }
                    Ended::Capped => events.push(format!("{which:?} capped at {at}")),
                }
                ControlFlow::Continue(())
            },
        )
        .await;
        (won, events, t0.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_to_establish_wins_and_the_other_is_dropped() {
        let (won, events, took) = run((300, 5000), (100, 50_000), &["a", "b"]).await;
        assert_eq!(won, Some(("b", false)));
        assert_eq!(events, ["Second done b at 100"]);
        assert_eq!(took, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_hedge_leaves_the_first_connect_running_until_its_own_cap() {
        // The hedge's endpoint is blackholed too: capped at its 50 ms deadline; the first
        // connect establishes later, within the 5 s hard cap.
        let (won, events, took) = run((300, 5000), (10_000, 50), &["a", "b"]).await;
        assert_eq!(won, Some(("a", true)));
        assert_eq!(events, ["Second capped at 50", "First done a at 300"]);
        assert_eq!(took, Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_side_does_not_end_the_race() {
        // "b" completes first but is refused (not accepted): "a" can still win.
        let (won, events, _) = run((200, 5000), (10, 1000), &["a"]).await;
        assert_eq!(won, Some(("a", true)));
        assert_eq!(events, ["Second done b at 10", "First done a at 200"]);
    }

    #[tokio::test(start_paused = true)]
    async fn both_capped_means_no_winner_at_the_later_cap() {
        let (won, events, took) = run((60_000, 5000), (60_000, 250), &["a", "b"]).await;
        assert_eq!(won, None);
        assert_eq!(events, ["Second capped at 250", "First capped at 5000"]);
        assert_eq!(took, Duration::from_millis(5000));
    }
}
