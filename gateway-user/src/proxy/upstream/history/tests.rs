use super::*;

#[test]
fn buckets_hold_values_within_their_width() {
    for us in (0..20_000u64).chain([
        100_000,
        999_999,
        1_000_000,
        3_000_000,
        30_000_000,
        120_000_000,
    ]) {
        let v = value(bucket(us));
        let err = (v as f64 - us as f64).abs() / (us.max(1) as f64);
        assert!(err <= 0.0625 + 1e-9, "{us} µs stands as {v} µs");
    }
    assert_eq!(bucket(0), 0);
    assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    assert_eq!(bucket(1 << 40), BUCKETS - 1);
    // Monotonic.
    let mut last = 0;
    for us in 0..5_000_000u64 {
        let b = bucket(us);
        assert!(b >= last, "{us}");
        last = b;
    }
}

#[test]
fn a_second_keeps_its_counts_and_quantiles() {
    let h = History::new();
    for _ in 0..98 {
        h.request(Duration::from_micros(800));
    }
    h.request(Duration::from_millis(50));
    h.request(Duration::from_secs(3));
    h.syn_rtt(Duration::from_micros(90));
    h.failed(ErrorKind::ConnectTimeout);
    h.failed(ErrorKind::ConnectTimeout);
    h.failed(ErrorKind::NoRoute); // not an endpoint's failure: not counted
    h.hedged();
    h.roll(1_000);
    let s = h.series();
    assert_eq!(s.first_unix_s, 1_000);
    assert_eq!(s.requests, [100]);
    let (p50, p99) = (s.latency_p50_us[0].unwrap(), s.latency_p99_us[0].unwrap());
    assert!((780..=830).contains(&p50), "{p50}");
    assert!(
        (47_000..=53_000).contains(&p99),
        "p99 is the 99th of 100: {p99}"
    );
    assert!((85..=95).contains(&s.syn_rtt_p50_us[0].unwrap()));
    assert_eq!(s.hedges, [1]);
    assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    assert_eq!(s.errors["connect_timeout"], [2]);
    // The next second starts from zero.
    h.roll(1_001);
    let s = h.series();
    assert_eq!(s.requests, [100, 0]);
    assert_eq!(s.latency_p50_us[1], None);
    assert_eq!(s.errors["connect_timeout"], [2, 0]);
}

#[test]
fn the_window_is_five_minutes_and_gaps_are_empty_seconds() {
    let h = History::new();
    h.roll(10);
    h.request(Duration::from_millis(1));
    // The roller stalled for two seconds.
    h.roll(13);
    let s = h.series();
    assert_eq!((s.first_unix_s, s.requests.clone()), (10, vec![0, 0, 0, 1]));
    for t in 14..1_000 {
        h.request(Duration::from_millis(1));
        h.roll(t);
    }
    let s = h.series();
    assert_eq!(s.requests.len(), WINDOW);
    assert_eq!(s.first_unix_s, 1_000 - WINDOW as u64);
    // A long stall leaves only what is within the window.
    h.roll(5_000);
    let s = h.series();
    assert_eq!((s.first_unix_s, s.requests.len()), (5_000, 1));
    // A clock stepping back adds to the last second rather than reopening one.
    h.request(Duration::from_millis(1));
    h.roll(4_990);
    assert_eq!(h.series().requests, [1]);
}

/// Writers on other threads never lose a sample: each lands in some second.
#[test]
fn concurrent_requests_are_all_counted() {
    let h = std::sync::Arc::new(History::new());
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u64 {
                    h.request(Duration::from_micros(100 + i % 1000));
                }
            })
        })
        .collect();
    let mut t = 0;
    let mut total = 0;
    let mut roll = |t: u64| {
        h.roll(t);
        total += *h.series().requests.last().unwrap();
    };
    while !writers.iter().all(|w| w.is_finished()) {
        roll(t);
        t += 1;
    }
    for w in writers {
        w.join().unwrap();
    }
    roll(t);
    assert_eq!(total, 80_000);
}
