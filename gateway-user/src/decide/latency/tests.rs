use super::*;

const TAU: Duration = Duration::from_secs(10);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn close(a: Duration, b: Duration) -> bool {
    (a.as_secs_f64() - b.as_secs_f64()).abs() < 1e-6
}

#[test]
fn a_peak_replaces_the_estimate_and_lower_samples_pull_it_down_by_elapsed_time() {
    let t0 = Instant::now();
    let mut e = PeakEwma::new(t0);
    assert_eq!(e.estimate(t0, TAU), None);
    e.sample(ms(10), t0, TAU, false);
    assert_eq!(e.estimate(t0, TAU), Some(ms(10)));
    // A peak wins at once, whatever the time since the last update.
    e.sample(ms(3000), t0 + ms(1), TAU, false);
    assert!(close(e.estimate(t0 + ms(1), TAU).unwrap(), ms(3000)));
    // A lower sample one τ later: S·e^-1 + r·(1 - e^-1).
    let t = t0 + ms(1) + TAU;
    e.sample(ms(10), t, TAU, false);
    let want = 3.0 * (-1f64).exp() + 0.010 * (1.0 - (-1f64).exp());
    assert!(
        (e.estimate(t, TAU).unwrap().as_secs_f64() - want).abs() < 1e-9,
        "{:?}",
        e.estimate(t, TAU)
    );
    assert_eq!(e.samples(), 3);
}

#[test]
fn an_idle_estimate_decays_towards_zero_and_steady_samples_converge_on_them() {
    let t0 = Instant::now();
    let mut e = PeakEwma::new(t0);
    e.sample(ms(1000), t0, TAU, false);
    let later = e.estimate(t0 + TAU, TAU).unwrap().as_secs_f64();
    assert!((later - (-1f64).exp()).abs() < 1e-9, "{later}");
    // Samples every 5 ms at 2 ms: after 20 τ (200 s) the estimate is theirs.
    let mut t = t0;
    for _ in 0..40_000 {
        t += ms(5);
        e.sample(ms(2), t, TAU, false);
    }
    let v = e.estimate(t, TAU).unwrap();
    assert!(v >= ms(2) && v < Duration::from_micros(2_050), "{v:?}");
}

#[test]
fn lower_bounds_only_raise_and_say_what_raised() {
    let t0 = Instant::now();
    let mut e = PeakEwma::new(t0);
    e.sample(ms(5), t0, TAU, false);
    assert!(!e.lower_bound(Duration::from_micros(80), Source::Handshakes, t0, TAU));
    assert_eq!(e.source(), Source::Responses);
    // A handshake that needed a SYN retransmit: at least 1 s.
    assert!(e.lower_bound(ms(1003), Source::Handshakes, t0 + ms(1), TAU));
    assert_eq!(e.source(), Source::Handshakes);
    assert!(close(e.estimate(t0 + ms(1), TAU).unwrap(), ms(1003)));
    assert!(e.lower_bound(ms(2000), Source::Stalls, t0 + ms(2), TAU));
    assert_eq!(e.source(), Source::Stalls);
    // A lower bound on an endpoint never sampled starts its estimate.
    let mut fresh = PeakEwma::new(t0);
    assert!(fresh.lower_bound(ms(1), Source::Handshakes, t0, TAU));
    assert_eq!(fresh.estimate(t0, TAU), Some(ms(1)));
}

#[test]
fn a_fresh_trickle_sample_replaces_the_estimate() {
    let t0 = Instant::now();
    let mut e = PeakEwma::new(t0);
    e.sample(ms(3000), t0, TAU, false);
    // Still slow: the peak stays.
    e.sample(ms(3000), t0 + ms(3000), TAU, true);
    assert!(close(e.estimate(t0 + ms(3000), TAU).unwrap(), ms(3000)));
    // Fast again: averaged in, one sample after 3 s would leave ~2.2 s.
    let t = t0 + ms(6000);
    e.sample(ms(1), t, TAU, true);
    assert_eq!(e.estimate(t, TAU), Some(ms(1)));
    let mut plain = PeakEwma::new(t0);
    plain.sample(ms(3000), t0, TAU, false);
    plain.sample(ms(1), t0 + ms(3000), TAU, false);
    assert!(plain.estimate(t0 + ms(3000), TAU).unwrap() > ms(2000));
}

#[test]
fn cost_is_the_larger_of_estimate_and_pending_age_times_load_per_weight() {
    assert!((cost(ms(2), ms(0), 0, 1) - 0.002).abs() < 1e-12);
    assert!((cost(ms(2), ms(0), 3, 1) - 0.008).abs() < 1e-12);
    assert!((cost(ms(2), ms(50), 1, 1) - 0.100).abs() < 1e-12);
    assert!((cost(ms(2), ms(0), 3, 2) - 0.004).abs() < 1e-12);
}

#[test]
fn p2c_compares_two_distinct_eligible_endpoints() {
    let costs = [5.0, 1.0, 9.0];
    // Draws 0 then 0 again: the second must be another endpoint.
    let mut draws = [0usize, 0, 0, 0, 0, 2].into_iter().cycle();
    let got = p2c(3, |_| draws.next().unwrap(), |i| costs[i], |_| true);
    assert_eq!(got, Some(0), "0 (cost 5) against 2 (cost 9)");
    let mut draws = [2usize, 1].into_iter().cycle();
    assert_eq!(
        p2c(3, |_| draws.next().unwrap(), |i| costs[i], |_| true),
        Some(1)
    );
    // The most expensive of three is never picked when the choices are distinct.
    let mut seed = 7u64;
    let mut rng = |bound: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % bound
    };
    for _ in 0..1000 {
        assert_ne!(p2c(3, &mut rng, |i| costs[i], |_| true), Some(2));
    }
    assert_eq!(p2c(8, |_| 0, |_| 1.0, |i| i == 6), Some(6));
    // Within the tie tolerance the first drawn wins: 0.5 ms against 0.9 ms is noise.
    let close = [0.0009, 0.0005];
    let mut draws = [0usize, 1].into_iter().cycle();
    assert_eq!(
        p2c(2, |_| draws.next().unwrap(), |i| close[i], |_| true),
        Some(0)
    );
    let near = [1.05, 1.0];
    let mut draws = [0usize, 1].into_iter().cycle();
    assert_eq!(
        p2c(2, |_| draws.next().unwrap(), |i| near[i], |_| true),
        Some(0)
    );
    let apart = [0.004, 0.002];
    let mut draws = [0usize, 1].into_iter().cycle();
    assert_eq!(
        p2c(2, |_| draws.next().unwrap(), |i| apart[i], |_| true),
        Some(1)
    );
    assert_eq!(p2c(3, |_| 0, |_| 1.0, |_| false), None);
    assert_eq!(p2c(0, |_| 0, |_| 1.0, |_| true), None);
}

#[test]
fn an_outlier_is_slow_relative_to_the_lower_median_within_the_budget() {
    let p = LatencyPolicy::default();
    let e = evaluate(&[Some(ms(1)), Some(ms(1)), Some(ms(3000))], &[], &p, 1);
    assert_eq!(e.slow, [false, false, true]);
    assert_eq!(e.reference, Some(ms(1)));
    assert_eq!(e.threshold, Some(ms(101)), "max(3 × 1 ms, 1 ms + 100 ms)");
    // Two endpoints: the slower is measured against the faster.
    assert_eq!(
        evaluate(&[Some(ms(3000)), Some(ms(2))], &[], &p, 1).slow,
        [true, false]
    );
    // The margin: 1 ms against 0.2 ms is 5×, but not slow.
    let e = evaluate(
        &[Some(Duration::from_micros(200)), Some(ms(1)), Some(ms(1))],
        &[],
        &p,
        1,
    );
    assert_eq!(e.slow, [false, false, false]);
    // The budget: the slowest first.
    let e = evaluate(
        &[Some(ms(1)), Some(ms(500)), Some(ms(900)), Some(ms(1))],
        &[],
        &p,
        1,
    );
    assert_eq!(e.slow, [false, false, true, false]);
    // Unknown or unroutable endpoints neither count nor are slow; one known is no reference.
    let e = evaluate(&[None, Some(ms(3000)), None], &[], &p, 1);
    assert_eq!((e.reference, e.slow), (None, vec![false; 3]));
    // Everyone slow: nothing better to go to.
    let e = evaluate(
        &[Some(ms(3000)), Some(ms(3000)), Some(ms(3100))],
        &[],
        &p,
        1,
    );
    assert_eq!(e.slow, [false; 3]);
}

#[test]
fn a_slow_endpoint_stays_slow_down_to_half_the_threshold() {
    let p = LatencyPolicy::default();
    // A host stall put the healthy endpoints' peaks at 863 ms: the threshold (2.6 s) passes a
    // 3 s backend's estimate decayed to 2.4 s. Slow already: it stays slow (exit 1.3 s).
    let lat = [Some(ms(863)), Some(ms(2436)), Some(ms(800))];
    assert_eq!(evaluate(&lat, &[false; 3], &p, 1).slow, [false; 3]);
    assert_eq!(
        evaluate(&lat, &[false, true, false], &p, 1).slow,
        [false, true, false]
    );
    assert_eq!(
        exit_threshold(ms(863), &p),
        ms(1294) + Duration::from_micros(500)
    );
    // Recovered: its fresh trickle sample is far below.
    let lat = [Some(ms(2)), Some(ms(1)), Some(ms(3))];
    assert_eq!(
        evaluate(&lat, &[false, true, false], &p, 1).slow,
        [false; 3]
    );
    // Never below the reference: with slow_factor 2 the exit is the reference itself.
    let p2 = LatencyPolicy {
        slow_factor: 2,
        slow_margin: ms(1),
        ..LatencyPolicy::default()
    };
    assert_eq!(exit_threshold(ms(500), &p2), ms(500));
    // Everyone slow: a slow one no slower than the rest is not kept out.
    let lat = [Some(ms(3000)), Some(ms(3000)), Some(ms(3100))];
    assert_eq!(
        evaluate(&lat, &[false, false, true], &p, 1).slow,
        [false; 3]
    );
}

#[test]
fn a_trickle_is_one_request_at_a_time_at_most_every_interval() {
    let t0 = Instant::now();
    let i = DEFAULT_TRICKLE_INTERVAL;
    assert!(trickle_due(0, None, t0, i));
    assert!(!trickle_due(1, None, t0, i), "one in flight");
    assert!(!trickle_due(0, Some(t0), t0 + ms(999), i));
    assert!(trickle_due(0, Some(t0), t0 + ms(1000), i));
}

/// The policy alone, in simulated time, against the goals: 200 req/s over 3
/// endpoints (1 ms each); one answers every request after 3 s from t = 10 s to t = 40 s.
#[test]
fn simulated_slow_backend_is_avoided_trickled_and_taken_back() {
    let p = LatencyPolicy::default();
    let t0 = Instant::now();
    let fast = ms(1);
    let slow_at = |t: f64| (10.0..40.0).contains(&t);
    let mut ewma: Vec<PeakEwma> = (0..3).map(|_| PeakEwma::new(t0)).collect();
    // Per endpoint: (sent, done, trickle) of requests in flight.
    let mut flight: Vec<Vec<(Instant, Instant, bool)>> = vec![Vec::new(); 3];
    let mut slow = [false; 3];
    let mut last_pick: [Option<Instant>; 3] = [None; 3];
    let mut seed = 42u64;
    let mut rng = move |bound: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % bound
    };
    let (mut late, mut to_bad_after_2s, mut after_2s) = (0, 0, 0);
    let mut share_after_recovery = Vec::new();
    for step in 0..12_000u64 {
        let now = t0 + ms(5) * step as u32;
        let t = step as f64 * 0.005;
        // Completions: samples.
        for (i, f) in flight.iter_mut().enumerate() {
            f.retain(|&(sent, done, trickle)| {
                if done > now {
                    return true;
                }
                ewma[i].sample(done - sent, done, p.decay, trickle);
                false
            });
        }
        if step % 20 == 0 {
            let lat: Vec<Option<Duration>> = (0..3)
                .map(|i| {
                    let n = flight[i].len() as u32;
                    let age = if n == 0 {
                        Duration::ZERO
                    } else {
                        flight[i].iter().map(|(s, _, _)| now - *s).sum::<Duration>() / n
                    };
                    ewma[i].estimate(now, p.decay).map(|e| e.max(age))
                })
                .collect();
            let e = evaluate(&lat, &slow, &p, 1);
            slow.copy_from_slice(&e.slow);
        }
        let due = (0..3).find(|&i| {
            trickle_due(
                flight[i].len() as u64,
                last_pick[i],
                now,
                p.trickle_interval,
            )
        });
        let i = match due {
            Some(i) => i,
            None => p2c(
                3,
                &mut rng,
                |i| {
                    let est = ewma[i].estimate(now, p.decay).unwrap_or(fast);
                    let n = flight[i].len() as u32;
                    let age = if n == 0 {
                        Duration::ZERO
                    } else {
                        flight[i].iter().map(|(s, _, _)| now - *s).sum::<Duration>() / n
                    };
                    cost(est, age, u64::from(n), 1)
                },
                |i| !slow[i],
            )
            .unwrap(),
        };
        last_pick[i] = Some(now);
        let latency = if i == 1 && slow_at(t) { ms(3000) } else { fast };
        flight[i].push((now, now + latency, due.is_some()));
        if t >= 10.0 && latency > ms(1000) {
            late += 1;
        }
        if (12.0..40.0).contains(&t) {
            after_2s += 1;
            to_bad_after_2s += usize::from(i == 1);
        }
        if t >= 40.0 {
            share_after_recovery.push((t, i == 1));
        }
    }
    assert!(late <= 20, "{late} requests slower than 1 s");
    let share = to_bad_after_2s as f64 / after_2s as f64;
    assert!(share < 0.02, "slow endpoint share {share}");
    // Within 10 s of recovering it takes about a third again (over 45..50 s).
    let back: Vec<bool> = share_after_recovery
        .iter()
        .filter(|(t, _)| *t >= 45.0 && *t < 50.0)
        .map(|(_, b)| *b)
        .collect();
    let share = back.iter().filter(|b| **b).count() as f64 / back.len() as f64;
    assert!(share > 0.25, "share after recovery {share}");
    eprintln!("simulated: {late} late requests, share after recovery {share:.2}");
}
