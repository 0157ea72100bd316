//! Retry and hedge budgets: extra attempts are allowed only while they stay a small share of
//! the cluster's requests in flight, so that a failing upstream cannot make the gateway
//! multiply its own load (Finagle's and Envoy's retry budgets).
//!
//! - Retries in flight ≤ `max(requests in flight × budget_percent / 100, min_retry_concurrency)`.
//! - Hedged connects in flight ≤ `max(requests in flight × hedge_budget_percent / 100, 1)`, and
//!   none when `hedge_budget_percent` is 0.
//!
//! The counters are atomics, the permits are guards: dropping one gives its share back.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// How many extra attempts `active` requests in flight allow: `percent` of them, at least
/// `min`.
pub fn allowed(active: usize, percent: u32, min: u32) -> usize {
    (active * percent as usize / 100).max(min as usize)
}

/// One cluster's requests in flight, and the retries and hedges among them.
#[derive(Debug, Default)]
pub struct Budgets {
    active: AtomicUsize,
    retries: AtomicUsize,
    hedges: AtomicUsize,
}

/// Counts a request in flight while it lives.
#[derive(Debug)]
pub struct ActiveRequest(Arc<Budgets>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry in flight.
#[derive(Debug)]
pub struct RetryPermit(Arc<Budgets>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A hedged connect in flight.
#[derive(Debug)]
pub struct HedgePermit(Arc<Budgets>);

impl Drop for HedgePermit {
    fn drop(&mut self) {
        self.0.hedges.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one unit of `counter` if it stays within `limit`.
fn take(counter: &AtomicUsize, limit: usize) -> bool {
    if counter.fetch_add(1, Ordering::AcqRel) < limit {
        true
    } else {
        counter.fetch_sub(1, Ordering::AcqRel);
        false
    }
}

impl Budgets {
    pub fn start_request(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A retry, if `budget_percent` of the requests in flight (at least `min_concurrency`)
    /// leaves room for one more.
    pub fn try_retry(
        self: &Arc<Self>,
        budget_percent: u32,
        min_concurrency: u32,
    ) -> Option<RetryPermit> {
        let limit = allowed(self.active(), budget_percent, min_concurrency);
        take(&self.retries, limit).then(|| RetryPermit(self.clone()))
    }

    /// Whether [`Budgets::try_retry`] would give a permit now, without taking it (by the time
    /// it is asked, another request may have taken the room).
    pub fn retry_room(&self, budget_percent: u32, min_concurrency: u32) -> bool {
        self.retries.load(Ordering::Acquire)
            < allowed(self.active(), budget_percent, min_concurrency)
    }

    /// A hedged connect, if `budget_percent` of the requests in flight (at least one) leaves
    /// room; never when `budget_percent` is 0.
    pub fn try_hedge(self: &Arc<Self>, budget_percent: u32) -> Option<HedgePermit> {
        if budget_percent == 0 {
            return None;
        }
        let limit = allowed(self.active(), budget_percent, 1);
        take(&self.hedges, limit).then(|| HedgePermit(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_a_share_of_requests_in_flight_with_a_floor() {
        assert_eq!(allowed(0, 20, 3), 3);
        assert_eq!(allowed(10, 20, 3), 3);
        assert_eq!(allowed(100, 20, 3), 20);
        assert_eq!(allowed(9, 10, 1), 1);
        assert_eq!(allowed(1000, 10, 1), 100);
    }

    #[test]
    fn the_room_for_a_retry_is_seen_without_taking_it() {
        let b = Arc::new(Budgets::default());
        let _r = b.start_request();
        assert!(!b.retry_room(0, 0), "no budget at all");
        assert!(b.retry_room(20, 1));
        assert!(b.retry_room(20, 1), "looking takes nothing");
        let permit = b.try_retry(20, 1).unwrap();
        assert!(!b.retry_room(20, 1));
        drop(permit);
        assert!(b.retry_room(20, 1));
    }

    #[test]
    fn retries_beyond_the_budget_are_refused_until_one_ends() {
        let b = Arc::new(Budgets::default());
        let requests: Vec<_> = (0..10).map(|_| b.start_request()).collect();
        // 10 in flight × 20 % = 2, but at least 3.
        let permits: Vec<_> = (0..3)
            .map(|_| b.try_retry(20, 3).expect("within"))
            .collect();
        assert!(
            b.try_retry(20, 3).is_none(),
            "a fourth retry is over budget"
        );
        drop(permits.into_iter().next());
        assert!(b.try_retry(20, 3).is_some(), "one ended: room again");
        drop(requests);
        assert_eq!(b.active(), 0);
    }

    #[test]
    fn hedges_follow_their_own_share_and_zero_turns_them_off() {
        let b = Arc::new(Budgets::default());
        let _requests: Vec<_> = (0..30).map(|_| b.start_request()).collect();
        assert!(b.try_hedge(0).is_none(), "0 % means never");
        // 30 × 10 % = 3.
        let held: Vec<_> = (0..3).map(|_| b.try_hedge(10).expect("within")).collect();
        assert!(b.try_hedge(10).is_none());
        drop(held);
        assert!(b.try_hedge(10).is_some());
    }
}
