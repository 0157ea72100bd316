//! Load-balancing decisions, as pure functions over endpoint indices.
//!
//! Round robin walks a precomputed smooth weighted schedule (nginx's algorithm: weights
//! interleave, `a:2 b:1` gives `a b a`, not `a a b`) with one atomic counter, so the hot path
//! takes no lock. Least request is power of two choices: two weighted random draws, and the one
//! with fewer in-flight requests per unit of weight wins. Both skip endpoints the caller rules
//! out (ejected, or already tried by this request).

use std::cmp::Ordering;

/// Longest schedule built; weights are scaled down past it. Bounded so that a cluster of many
/// heavy endpoints cannot make the schedule large.
const MAX_SCHEDULE: usize = 4096;

/// The smooth weighted round-robin order of endpoint indices, one full cycle.
pub(crate) fn schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<i64> = weights.iter().map(|&x| i64::from((x / g).max(1))).collect();
    let mut total: i64 = w.iter().sum();
    if total as usize > MAX_SCHEDULE {
        let scale = total as f64 / MAX_SCHEDULE as f64;
        for x in &mut w {
            *x = ((*x as f64 / scale).round() as i64).max(1);
        }
        total = w.iter().sum();
    }
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Round robin: the first eligible endpoint in the schedule from position `tick`.
pub(crate) fn round_robin(
    schedule: &[u32],
    tick: usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = schedule.len();
    (0..n)
        .map(|k| schedule[(tick + k) % n] as usize)
        .find(|&i| eligible(i))
}

/// Power of two choices. `draw()` returns a random position in `schedule` (so draws are
/// weighted); `load(i)` is endpoint `i`'s in-flight requests and `weight(i)` its weight.
pub(crate) fn least_request(
    schedule: &[u32],
    mut draw: impl FnMut() -> usize,
    load: impl Fn(usize) -> u64,
    weight: impl Fn(usize) -> u32,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = schedule.len();
    if n == 0 {
        return None;
    }
    // A few draws find eligible endpoints quickly unless most are ruled out; then fall back to
    // a scan so that a single eligible endpoint is always found.
    let mut pick = || {
        (0..4)
            .map(|_| schedule[draw() % n] as usize)
            .find(|&i| eligible(i))
    };
    let a = pick();
    let b = pick();
    match (a, b) {
        (Some(a), Some(b)) => {
            // Compare load(a)/weight(a) with load(b)/weight(b) without division.
            let la = u128::from(load(a)) * u128::from(weight(b));
            let lb = u128::from(load(b)) * u128::from(weight(a));
            Some(match la.cmp(&lb) {
                Ordering::Greater => b,
                _ => a,
            })
        }
        (Some(x), None) | (None, Some(x)) => Some(x),
        (None, None) => round_robin(schedule, draw(), eligible),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_schedule_interleaves_by_weight() {
        assert_eq!(schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(schedule(&[2, 1]), vec![0, 1, 0]);
        assert_eq!(schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(schedule(&[10, 10]), vec![0, 1]);
        let big = schedule(&[1000, 1000, 1000, 1000, 1000, 1]);
        assert!(big.len() <= MAX_SCHEDULE + 6);
        assert!(big.contains(&5));
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let s = schedule(&[1, 1, 1]);
        assert_eq!(round_robin(&s, 0, |_| true), Some(0));
        assert_eq!(round_robin(&s, 1, |i| i != 1), Some(2));
        assert_eq!(round_robin(&s, 4, |i| i == 0), Some(0));
        assert_eq!(round_robin(&s, 4, |_| false), None);
    }

    #[test]
    fn least_request_prefers_the_less_loaded_per_weight() {
        let s = schedule(&[1, 1]);
        let mut draws = [0usize, 1].into_iter().cycle();
        let loads = [10u64, 3];
        let got = least_request(&s, || draws.next().unwrap(), |i| loads[i], |_| 1, |_| true);
        assert_eq!(got, Some(1));
        // Weight 4 makes 10 in flight lighter than 3 at weight 1.
        let mut draws = [0usize, 1].into_iter().cycle();
        let got = least_request(
            &s,
            || draws.next().unwrap(),
            |i| loads[i],
            |i| if i == 0 { 4 } else { 1 },
            |_| true,
        );
        assert_eq!(got, Some(0));
    }

    #[test]
    fn least_request_finds_the_only_eligible_endpoint() {
        let s = schedule(&[1; 8]);
        let got = least_request(&s, || 0, |_| 0, |_| 1, |i| i == 6);
        assert_eq!(got, Some(6));
    }
}
