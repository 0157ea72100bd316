//! Load-balancing decisions, as pure functions over endpoint indices.
//!
//! Round robin walks a precomputed smooth weighted schedule (nginx's algorithm: weights
//! interleave, `a:2 b:1` gives `a b a`, not `a a b`) with one atomic counter, so the hot path
//! takes no lock. Least request is power of two choices: two weighted random draws, and the one
//! with fewer in-flight requests per unit of weight wins. Consistent hashing is weighted
//! rendezvous hashing over a key of the request. All skip endpoints the caller rules out
//! (ejected, or already tried by this request).

use std::{cmp::Ordering, net::SocketAddr};

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

/// An eligible endpoint at random by weight: a few draws from the schedule, then (most ruled
/// out) one draw among the eligible places of the schedule, so that a single eligible endpoint
/// is always found, and the odds stay by weight. (The first eligible place after a random one
/// favoured the endpoint after the longest run of ineligible ones.)
pub(crate) fn weighted_random(
    schedule: &[u32],
    mut draw: impl FnMut() -> usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = schedule.len();
    if n == 0 {
        return None;
    }
    if let Some(i) = (0..8)
        .map(|_| schedule[draw() % n] as usize)
        .find(|&i| eligible(i))
    {
        return Some(i);
    }
    let places = schedule.iter().filter(|&&i| eligible(i as usize)).count();
    if places == 0 {
        return None;
    }
    let nth = draw() % places;
    schedule
        .iter()
        .map(|&i| i as usize)
        .filter(|&i| eligible(i))
        .nth(nth)
}

/// Weighted rendezvous (highest random weight) hashing: of the eligible endpoints, the one
/// whose score for `key` is highest. Endpoint `i` scores `-weight(i) / ln(u)`, `u` a uniform
/// draw in (0, 1) made of `key` and the endpoint's `id(i)`: the weighted form (Schindelhauer
/// and Schomaker), under which each endpoint's share of keys is its share of the weight.
/// Whether another endpoint comes or goes, a key stays where it was unless it scored that one
/// highest; a request that tried its key's endpoint goes to its key's second, and so on, so
/// retries and ejections are as consistent as the choice. O(endpoints) per pick, with no table
/// to rebuild when the set changes (DNS, a reload).
pub(crate) fn rendezvous(
    n: usize,
    key: u64,
    id: impl Fn(usize) -> u64,
    weight: impl Fn(usize) -> u32,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..n)
        .filter(|&i| eligible(i))
        .map(|i| (i, score(key, id(i), weight(i))))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// [`rendezvous`] with bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing
/// with Bounded Loads"; HAProxy's and Envoy's `hash_balance_factor`): of the eligible endpoints
/// in the key's order, the first with fewer requests in flight (`load`) than its bound,
/// `factor` percent of its weighted share of all those in flight with this one. The bounds add
/// up to at least the requests in flight and this one, so one always qualifies. Also the key's
/// own endpoint (of those eligible) when it was full and another took the request (a spill).
///
/// The usual case, the key's own endpoint within its bound, costs one pass more than
/// [`rendezvous`] (the loads); only a spill ranks the endpoints.
pub(crate) fn rendezvous_bounded(
    n: usize,
    key: u64,
    (id, weight): (impl Fn(usize) -> u64, impl Fn(usize) -> u32),
    eligible: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> u64,
    factor: u32,
) -> Option<(usize, Option<usize>)> {
    let first = rendezvous(n, key, &id, &weight, &eligible)?;
    let (loads, weights) = (0..n)
        .filter(|&i| eligible(i))
        .fold((0u64, 0u64), |(l, w), i| {
            (l + load(i), w + u64::from(weight(i).max(1)))
        });
    let within = |i: usize| {
        let share = u128::from(loads + 1) * u128::from(weight(i).max(1));
        let bound = (u128::from(factor) * share).div_ceil(100 * u128::from(weights));
        u128::from(load(i)) < bound
    };
    if within(first) {
        return Some((first, None));
    }
    let mut ranked: Vec<(usize, f64)> = (0..n)
        .filter(|&i| eligible(i))
        .map(|i| (i, score(key, id(i), weight(i))))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    // None within its bound only if another worker's requests moved the loads meanwhile: the
    // key's own endpoint then, and no spill.
    match ranked.iter().map(|&(i, _)| i).find(|&i| within(i)) {
        Some(next) => Some((next, Some(first))),
        None => Some((first, None)),
    }
}

fn score(key: u64, id: u64, weight: u32) -> f64 {
    let h = mix(key ^ mix(id));
    // The top 52 bits and a half, as a double in (0, 1), exactly: never 0 (whose ln is -inf)
    // or 1 (ln 0).
    let u = ((h >> 12) as f64 + 0.5) / (1u64 << 52) as f64;
    -f64::from(weight.max(1)) / u.ln()
}

/// splitmix64's finaliser: every bit of the input moves every bit of the output.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a of `bytes`: a key's hash, the same in every build and every gateway of a fleet, so
/// that gateways side by side send a key to the same endpoint.
pub(crate) fn key_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An endpoint's identity in [`rendezvous`]: its address, whatever its place in the list.
pub(crate) fn address_id(a: SocketAddr) -> u64 {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    key_hash(&ip) ^ u64::from(a.port()).rotate_left(48)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)))
            .collect()
    }

    /// The endpoint of each of `keys` keys over `eps` with `weights`, those of `out` left out.
    fn owners(eps: &[SocketAddr], weights: &[u32], out: &[usize], keys: u64) -> Vec<usize> {
        (0..keys)
            .map(|k| {
                rendezvous(
                    eps.len(),
                    key_hash(&k.to_le_bytes()),
                    |i| address_id(eps[i]),
                    |i| weights[i],
                    |i| !out.contains(&i),
                )
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn rendezvous_spreads_keys_by_weight() {
        let eps = addrs(4);
        let got = owners(&eps, &[1, 1, 1, 3], &[], 60_000);
        let share = |i| got.iter().filter(|&&o| o == i).count() as f64 / 60_000.0;
        for i in 0..3 {
            assert!((share(i) - 1.0 / 6.0).abs() < 0.01, "{i}: {}", share(i));
        }
        assert!((share(3) - 0.5).abs() < 0.01, "{}", share(3));
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_an_endpoint_that_goes() {
        let eps = addrs(5);
        let w = [1; 5];
        let all = owners(&eps, &w, &[], 10_000);
        // Endpoint 2 ejected (or tried): its keys go elsewhere, no other key moves.
        let without = owners(&eps, &w, &[2], 10_000);
        for (a, b) in all.iter().zip(&without) {
            if *a != 2 {
                assert_eq!(a, b);
            } else {
                assert_ne!(*b, 2);
            }
        }
        // The order of the list does not matter: a key follows the address.
        let mut shuffled = eps.clone();
        shuffled.reverse();
        let again = owners(&shuffled, &w, &[], 10_000);
        for (a, b) in all.iter().zip(&again) {
            assert_eq!(eps[*a], shuffled[*b]);
        }
        assert_eq!(
            rendezvous(3, 7, |i| i as u64, |_| 1, |_| false),
            None,
            "nothing eligible"
        );
    }

    /// Bounded loads: the key's endpoint while it is within `factor` percent of the average,
    /// then the key's next endpoints in order; never over the bound while one is under it.
    #[test]
    fn bounded_rendezvous_spills_a_full_endpoint_to_the_keys_next() {
        let eps = addrs(4);
        let id = |i: usize| address_id(eps[i]);
        let key = key_hash(b"hot");
        let order: Vec<usize> = {
            let mut out = Vec::new();
            while let Some(i) = rendezvous(4, key, id, |_| 1, |i| !out.contains(&i)) {
                out.push(i);
            }
            out
        };
        let pick = |loads: &[u64], factor| {
            rendezvous_bounded(4, key, (id, |_| 1), |_| true, |i| loads[i], factor)
        };
        // Idle: the key's own endpoint, as without a bound.
        assert_eq!(pick(&[0; 4], 125), Some((order[0], None)));
        // The owner at 2 with the others idle: 2 < ceil(1.25 * 3 / 4) = 1 is false: spilled
        // to the key's second.
        let mut loads = [0u64; 4];
        loads[order[0]] = 2;
        assert_eq!(pick(&loads, 125), Some((order[1], Some(order[0]))));
        // A factor large enough lets it keep the key.
        assert_eq!(pick(&loads, 1000), Some((order[0], None)));
        // The owner and its second full: the third.
        loads[order[1]] = 2;
        assert_eq!(pick(&loads, 125), Some((order[2], Some(order[0]))));

        // A hot key: 1,000 requests arriving one after the other, none finishing. No endpoint
        // ever holds more than 1.25 x the average (rounded up); the key's endpoints fill in
        // its order, so its own holds the most.
        let mut loads = [0u64; 4];
        for _ in 0..1000 {
            let (i, _) = pick(&loads, 125).unwrap();
            let total: u64 = loads.iter().sum::<u64>() + 1;
            assert!(loads[i] < (125 * total).div_ceil(400), "{loads:?} -> {i}");
            loads[i] += 1;
        }
        assert_eq!(loads[order[0]], 313, "{loads:?}");
        assert!(loads.iter().all(|&l| l <= 313), "{loads:?}");
        // Weights: a weight-3 endpoint's bound is three times a weight-1 one's.
        let weights = [3, 1, 1, 1];
        let mut loads = [0u64; 4];
        for _ in 0..600 {
            let load = |i: usize| loads[i];
            let (i, _) =
                rendezvous_bounded(4, key, (id, |i| weights[i]), |_| true, load, 110).unwrap();
            loads[i] += 1;
        }
        assert!(
            loads[0] <= 330 && loads[1..].iter().all(|&l| l <= 110),
            "{loads:?}"
        );
        assert_eq!(loads.iter().sum::<u64>(), 600);
        assert_eq!(
            rendezvous_bounded(3, 7, (|i| i as u64, |_| 1), |_| false, |_| 0, 125),
            None
        );
    }

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
