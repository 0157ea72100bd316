//! Slow start (`health.slow_start_ms`): an endpoint back from an ejection (or a new address
//! from a DNS refresh) takes a share of its
//! weight that grows linearly over the window (never below [`MIN_PERCENT`]: that for its first
//! tenth), rather than its whole share at once. An instance that just came back (a cold cache, a JIT not yet warm, a
//! connection pool being refilled) is often knocked over again by a full share, and ejected
//! again: the flapping this stops. HAProxy's `slowstart` and Envoy's `slow_start_config`
//! (aggression 1) ramp the same way.

use std::time::Duration;

/// The share of its weight an endpoint takes when it is just back.
pub const MIN_PERCENT: u32 = 10;

/// The percent of its weight an endpoint routable again for `since` takes: 100 once `window`
/// is over (and always when `window` is zero: slow start off).
pub fn percent(since: Duration, window: Duration) -> u32 {
    if window.is_zero() || since >= window {
        return 100;
    }
    let p = (since.as_secs_f64() / window.as_secs_f64() * 100.0) as u32;
    p.clamp(MIN_PERCENT, 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_grows_linearly_from_the_floor_to_the_whole() {
        let w = Duration::from_secs(30);
        assert_eq!(percent(Duration::ZERO, w), MIN_PERCENT);
        assert_eq!(
            percent(Duration::from_secs(1), w),
            MIN_PERCENT,
            "3 % is under the floor"
        );
        assert_eq!(percent(Duration::from_secs(15), w), 50);
        assert_eq!(percent(Duration::from_millis(29_999), w), 99);
        assert_eq!(percent(w, w), 100);
        assert_eq!(percent(Duration::from_secs(3600), w), 100);
        assert_eq!(percent(Duration::ZERO, Duration::ZERO), 100, "off");
    }
}
