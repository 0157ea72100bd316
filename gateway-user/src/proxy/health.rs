//! Passive outlier detection: a small pure state machine per endpoint.
//!
//! Today it is fed by connect outcomes the gateway sees itself; the kernel observer will feed
//! it evidence (SYNs unanswered, RSTs, ICMP errors) in a later issue. An endpoint is ejected
//! after `consecutive_failures` connect failures in a row, for `ejection` doubled on each
//! consecutive ejection (capped at 2^10), and only while the cluster's ejected share stays
//! within `max_ejected_percent`. An ejection ends by time; the next request is the probe.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::HealthPolicy;

#[derive(Clone, Debug, Default)]
pub(crate) struct Outlier {
    consecutive_failures: u32,
    /// Consecutive ejections, for the back-off; reset by a success.
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// What a failure did to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Healthy,
    /// Newly ejected, for this long.
    Ejected(Duration),
    /// Would be ejected, but the cluster's ejection budget is spent.
    OverBudget,
}

impl Outlier {
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.ejections = 0;
        self.ejected_until = None;
    }

    /// `may_eject`: whether the cluster's budget allows one more ejected endpoint.
    pub fn on_failure(&mut self, now: Instant, policy: &HealthPolicy, may_eject: bool) -> Verdict {
        if self.is_ejected(now) {
            return Verdict::Healthy;
        }
        self.consecutive_failures += 1;
        if self.consecutive_failures < policy.consecutive_failures {
            return Verdict::Healthy;
        }
        if !may_eject {
            return Verdict::OverBudget;
        }
        let d = policy.ejection * 2u32.pow(self.ejections.min(10));
        self.ejections += 1;
        self.consecutive_failures = 0;
        self.ejected_until = Some(now + d);
        Verdict::Ejected(d)
    }
}

/// How many of `total` endpoints may be ejected at once.
pub(crate) fn ejection_budget(total: usize, max_percent: u32) -> usize {
    total * max_percent as usize / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            consecutive_failures: 3,
            ejection: Duration::from_secs(10),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_and_backs_off() {
        let p = policy();
        let mut o = Outlier::default();
        let now = Instant::now();
        assert_eq!(o.on_failure(now, &p, true), Verdict::Healthy);
        assert_eq!(o.on_failure(now, &p, true), Verdict::Healthy);
        assert_eq!(
            o.on_failure(now, &p, true),
            Verdict::Ejected(Duration::from_secs(10))
        );
        assert!(o.is_ejected(now + Duration::from_secs(9)));
        assert!(!o.is_ejected(now + Duration::from_secs(10)));
        let later = now + Duration::from_secs(10);
        for _ in 0..2 {
            assert_eq!(o.on_failure(later, &p, true), Verdict::Healthy);
        }
        assert_eq!(
            o.on_failure(later, &p, true),
            Verdict::Ejected(Duration::from_secs(20))
        );
        o.on_success();
        assert!(!o.is_ejected(later));
    }

    #[test]
    fn success_resets_the_count() {
        let p = policy();
        let mut o = Outlier::default();
        let now = Instant::now();
        o.on_failure(now, &p, true);
        o.on_failure(now, &p, true);
        o.on_success();
        assert_eq!(o.on_failure(now, &p, true), Verdict::Healthy);
    }

    #[test]
    fn budget_limits_ejections() {
        let p = policy();
        let mut o = Outlier::default();
        let now = Instant::now();
        o.on_failure(now, &p, false);
        o.on_failure(now, &p, false);
        assert_eq!(o.on_failure(now, &p, false), Verdict::OverBudget);
        assert!(!o.is_ejected(now));
        assert_eq!(ejection_budget(1, 50), 0);
        assert_eq!(ejection_budget(4, 50), 2);
        assert_eq!(ejection_budget(1, 100), 1);
    }
}
