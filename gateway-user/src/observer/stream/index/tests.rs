use std::time::Duration;

use gateway_common::{Outcome, errno};

use super::*;
use crate::observer::records::Clock;

const MS: u64 = 1_000_000;

fn connect(cookie: u64, outcome: Outcome, ts_event_ns: u64) -> Connect {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"curl");
    Connect {
        cookie,
        dst: "10.77.1.2:8080".parse().unwrap(),
        src_port: 40000,
        pid: 1234,
        comm,
        cgroup_id: 42,
        outcome,
        syn_retransmits: 0,
        ts_connect_ns: ts_event_ns.saturating_sub(250_000),
        ts_event_ns,
        syn_rtt: (outcome == Outcome::Established).then(|| Duration::from_micros(120)),
        errno: (outcome == Outcome::Refused).then_some(errno::ECONNREFUSED),
        so_error: None,
        reset: None,
    }
}

fn read(cookie: u64, value: u32) -> Decoded {
    Decoded::SoError(SoErrorRead {
        cookie,
        dst: "10.77.1.2:8080".parse().unwrap(),
        pid: 1234,
        comm: [0; 16],
        value,
    })
}

fn index(window_ms: u64, remember_ms: u64, max: usize) -> ConnectIndex {
    ConnectIndex::new(&StreamOptions {
        join_window: Duration::from_millis(window_ms),
        remember_for: Duration::from_millis(remember_ms),
        max_remembered: max,
    })
}

#[test]
fn so_error_read_joins_its_outcome() {
    let clock = Clock::now();
    let mut ix = index(100, 0, 100);
    let mut out = Drained::default();
    ix.push(
        Decoded::Outcome(connect(9, Outcome::Refused, 1)),
        0,
        &mut out,
    );
    ix.expire(0, &mut out.connects);
    assert!(out.connects.is_empty(), "held for the join window");
    ix.push(read(9, errno::ECONNREFUSED), 1_000, &mut out);
    assert_eq!(out.connects.len(), 1);
    assert_eq!(
        out.connects[0].record(&clock).so_error.as_deref(),
        Some("ECONNREFUSED")
    );
    assert_eq!(out.so_error_reads.len(), 1, "every read is reported too");
    ix.expire(1_000 * MS, &mut out.connects);
    assert_eq!(out.connects.len(), 1, "released once");
}

#[test]
fn an_outcome_nobody_asks_about_is_released_after_the_window() {
    let clock = Clock::now();
    let mut ix = index(100, 0, 100);
    let mut out = Drained::default();
    ix.push(
        Decoded::Outcome(connect(1, Outcome::Established, 1)),
        0,
        &mut out,
    );
    ix.expire(99 * MS, &mut out.connects);
    assert!(out.connects.is_empty());
    ix.expire(100 * MS, &mut out.connects);
    assert_eq!(out.connects.len(), 1);
    let rec = out.connects[0].record(&clock);
    assert_eq!(rec.so_error, None);
    assert_eq!(rec.syn_rtt_us, Some(120));
}

#[test]
fn a_read_of_zero_is_reported_as_zero_and_late_reads_are_counted() {
    let clock = Clock::now();
    let mut ix = index(1, 0, 100);
    let mut out = Drained::default();
    ix.push(
        Decoded::Outcome(connect(3, Outcome::Established, 1)),
        0,
        &mut out,
    );
    ix.push(read(3, 0), 10, &mut out);
    assert_eq!(
        out.connects[0].record(&clock).so_error.as_deref(),
        Some("0")
    );
    ix.push(read(3, 0), 20, &mut out);
    assert_eq!(ix.late_so_errors(), 1);
    ix.push(read(77, 0), 30, &mut out);
    assert_eq!(
        ix.late_so_errors(),
        2,
        "a read of a connect never seen is late too"
    );
}

#[test]
fn released_connects_come_out_in_the_order_they_happened() {
    let mut ix = index(100, 0, 100);
    let mut out = Drained::default();
    ix.push(
        Decoded::Outcome(connect(1, Outcome::Refused, 30)),
        0,
        &mut out,
    );
    ix.push(
        Decoded::Outcome(connect(2, Outcome::Refused, 10)),
        0,
        &mut out,
    );
    ix.push(
        Decoded::Outcome(connect(3, Outcome::Refused, 20)),
        0,
        &mut out,
    );
    ix.expire(u64::MAX, &mut out.connects);
    let cookies: Vec<u64> = out.connects.iter().map(|c| c.cookie).collect();
    assert_eq!(cookies, [2, 3, 1]);
}

#[test]
fn a_socket_that_connects_again_releases_its_first_outcome() {
    let mut ix = index(100, 30_000, 100);
    let mut out = Drained::default();
    ix.push(
        Decoded::Outcome(connect(5, Outcome::Refused, 1)),
        0,
        &mut out,
    );
    ix.push(
        Decoded::Outcome(connect(5, Outcome::Established, 2)),
        MS,
        &mut out,
    );
    assert_eq!(out.connects.len(), 1);
    assert_eq!(out.connects[0].outcome, Outcome::Refused);
    assert_eq!(ix.get(5).unwrap().outcome, Outcome::Established);
    // The first arrival's expiry must not forget the second.
    ix.expire(30_000 * MS, &mut out.connects);
    assert_eq!(ix.get(5).unwrap().outcome, Outcome::Established);
    ix.expire(30_001 * MS, &mut out.connects);
    assert!(ix.get(5).is_none());
}

#[test]
fn connects_stay_findable_with_their_read_until_remember_for_passes() {
    let mut ix = index(250, 30_000, 100);
    let mut out = Drained::default();
    ix.push(
        Decoded::Outcome(connect(8, Outcome::Refused, 1)),
        0,
        &mut out,
    );
    assert_eq!(
        ix.get(8).unwrap().so_error,
        None,
        "findable before its read"
    );
    ix.expire(300 * MS, &mut out.connects);
    assert_eq!(out.connects.len(), 1, "released after the window");
    ix.push(read(8, errno::ECONNREFUSED), 301 * MS, &mut out);
    assert_eq!(
        ix.get(8).unwrap().so_error,
        Some(errno::ECONNREFUSED),
        "a late read still completes the lookup"
    );
    assert_eq!(ix.late_so_errors(), 1);
    ix.expire(29_999 * MS, &mut out.connects);
    assert!(ix.get(8).is_some());
    ix.expire(30_000 * MS, &mut out.connects);
    assert!(ix.get(8).is_none());
    assert_eq!(out.connects.len(), 1, "forgetting releases nothing twice");
}

#[test]
fn the_oldest_go_first_beyond_the_bound_and_pending_ones_are_released_not_lost() {
    let mut ix = index(250, 30_000, 2);
    let mut out = Drained::default();
    for cookie in 1..=3 {
        ix.push(
            Decoded::Outcome(connect(cookie, Outcome::Established, cookie)),
            cookie,
            &mut out,
        );
    }
    ix.expire(3, &mut out.connects);
    assert_eq!(ix.len(), 2);
    assert!(ix.get(1).is_none());
    assert!(ix.get(2).is_some() && ix.get(3).is_some());
    let released: Vec<u64> = out.connects.iter().map(|c| c.cookie).collect();
    assert_eq!(released, [1], "the evicted one was still pending");
    ix.expire(u64::MAX, &mut out.connects);
    let released: Vec<u64> = out.connects.iter().map(|c| c.cookie).collect();
    assert_eq!(released, [1, 2, 3], "each connect once");
}
