//! A warning that an outsider can make happen (a flood of failing accepts, of abusive
//! connections) is logged at most once per period, with the number of times it was not: the
//! log must not become the attack's amplifier. The events are counted in their metric anyway.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

pub(crate) struct LogEvery {
    every: Duration,
    epoch: Instant,
    /// When the last line was logged (ms since `epoch`; `u64::MAX`: never), and the events
    /// not logged since.
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogEvery {
    pub fn new(every: Duration) -> LogEvery {
        LogEvery {
            every,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
        }
    }

    /// One event: `Some(n)` when it is to be logged, `n` being the events not logged since the
    /// last line; `None` when it is not (it is counted for the next line).
    pub fn due(&self) -> Option<u64> {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now_ms.saturating_sub(last) >= self.every.as_millis() as u64;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_of_those_left_out() {
        let log = LogEvery::new(Duration::from_millis(200));
        assert_eq!(log.due(), Some(0), "the first is logged");
        assert_eq!(log.due(), None);
        assert_eq!(log.due(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(log.due(), Some(2), "two left out since");
        assert_eq!(log.due(), None);
    }
}
