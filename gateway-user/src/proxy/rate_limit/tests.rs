use super::*;

fn limiter(rate: f64, burst: u32, by: RateLimitBy, max_clients: usize) -> Limiter {
    Limiter::new(RateLimit {
        requests_per_second: rate,
        burst,
        by,
        max_clients,
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_burst_passes_at_once_then_the_steady_rate() {
    let l = limiter(10.0, 5, RateLimitBy::Client, 100);
    let t0 = l.start;
    let a = ip("192.0.2.1");
    for _ in 0..5 {
        assert_eq!(l.check(a, t0), Verdict::Pass);
    }
    // The sixth at once waits one interval (100 ms) for the bucket to refill one.
    assert_eq!(l.check(a, t0), Verdict::Limited(Duration::from_millis(100)));
    assert_eq!(
        l.check(a, t0 + Duration::from_millis(40)),
        Verdict::Limited(Duration::from_millis(60))
    );
    assert_eq!(l.check(a, t0 + Duration::from_millis(100)), Verdict::Pass);
    // At the steady rate it never waits; after a quiet second the whole burst is back.
    for i in 2..20 {
        assert_eq!(
            l.check(a, t0 + Duration::from_millis(100 * i)),
            Verdict::Pass
        );
    }
    let later = t0 + Duration::from_secs(10);
    for _ in 0..5 {
        assert_eq!(l.check(a, later), Verdict::Pass);
    }
    assert!(matches!(l.check(a, later), Verdict::Limited(_)));
}

#[test]
fn each_client_has_its_own_bucket_and_ipv4_mapped_is_ipv4() {
    let l = limiter(1.0, 1, RateLimitBy::Client, 100);
    let t0 = l.start;
    assert_eq!(l.check(ip("192.0.2.1"), t0), Verdict::Pass);
    assert!(matches!(
        l.check(ip("::ffff:192.0.2.1"), t0),
        Verdict::Limited(_)
    ));
    assert_eq!(l.check(ip("192.0.2.2"), t0), Verdict::Pass);
    // By route: one bucket, whoever asks.
    let r = limiter(1.0, 1, RateLimitBy::Route, 100);
    assert_eq!(r.check(ip("192.0.2.1"), r.start), Verdict::Pass);
    assert!(matches!(
        r.check(ip("192.0.2.2"), r.start),
        Verdict::Limited(_)
    ));
    assert_eq!(r.held(), 0);
}

#[test]
fn the_table_is_bounded_forgets_idle_clients_and_fails_open_when_full() {
    // 16 shards of 1 client each.
    let l = limiter(1.0, 2, RateLimitBy::Client, 16);
    let t0 = l.start;
    let mut untracked = 0;
    for i in 0..1000u32 {
        let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
        match l.check(a, t0) {
            Verdict::Pass => {}
            Verdict::Untracked => untracked += 1,
            Verdict::Limited(_) => panic!("a new client is never limited"),
        }
    }
    assert!(l.held() <= 16, "{}", l.held());
    assert!(untracked >= 1000 - 16, "{untracked}");
    // Once their TATs have passed, the held clients make room for new ones: the first new
    // client of each shard takes its place (1,000 clients reach all 16 shards).
    let later = t0 + Duration::from_secs(5);
    let passed = (0..1000u32)
        .filter(|i| {
            l.check(
                IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000u32 + i)),
                later,
            ) == Verdict::Pass
        })
        .count();
    assert_eq!(passed, 16);
    assert_eq!(l.held(), 16);
}

#[test]
fn an_ipv6_client_is_its_64_and_a_small_table_holds_no_more_than_max_clients() {
    let l = limiter(1.0, 1, RateLimitBy::Client, 100);
    let t0 = l.start;
    assert_eq!(l.check(ip("2001:db8:1:2::1"), t0), Verdict::Pass);
    // Another address of the same /64 is the same client; another /64 is not.
    assert!(matches!(
        l.check(ip("2001:db8:1:2:ffff::9"), t0),
        Verdict::Limited(_)
    ));
    assert_eq!(l.check(ip("2001:db8:1:3::1"), t0), Verdict::Pass);
    // max_clients = 3: three shards of one.
    let small = limiter(1.0, 2, RateLimitBy::Client, 3);
    for i in 0..100u32 {
        let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
        small.check(a, small.start);
    }
    assert_eq!(small.held(), 3);
}

#[test]
fn the_slowest_rate_and_the_largest_burst_do_not_overflow() {
    let l = limiter(1.0 / 86_400.0, 1_000_000, RateLimitBy::Route, 1);
    let a = ip("192.0.2.1");
    let mut passed = 0;
    for _ in 0..1_000_001 {
        if l.check(a, l.start) == Verdict::Pass {
            passed += 1;
        }
    }
    assert_eq!(passed, 1_000_000);
    assert!(matches!(l.check(a, l.start), Verdict::Limited(_)));
}
