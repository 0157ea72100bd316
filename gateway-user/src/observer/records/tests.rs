use super::*;

fn event(kind: EventKind, outcome: Outcome, cookie: u64) -> ConnectEvent {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"curl");
    ConnectEvent {
        cookie,
        ts_connect_ns: 1_000_000,
        ts_event_ns: 1_250_000,
        syn_rtt_ns: if outcome == Outcome::Established {
            120_000
        } else {
            0
        },
        cgroup_id: 42,
        dst: socket_addr_to_key("10.77.1.2:8080".parse().unwrap()),
        pid: 1234,
        comm,
        src_port: 40000,
        syn_retransmits: 1,
        errno: if outcome == Outcome::Refused {
            errno::ECONNREFUSED as u16
        } else {
            0
        },
        so_error: SO_ERROR_NONE,
        kind: kind as u8,
        outcome: outcome as u8,
        _pad: [0; 6],
    }
}

#[test]
fn json_has_exactly_the_contract_fields() {
    let clock = Clock {
        realtime_minus_monotonic_ns: 1_700_000_000_000_000_000,
    };
    let rec =
        ConnectRecord::from_event(&event(EventKind::Outcome, Outcome::Refused, 7), &clock).unwrap();
    let v: serde_json::Value = serde_json::to_value(&rec).unwrap();
    let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "cgroup_id",
            "comm",
            "cookie",
            "dst",
            "elapsed_us",
            "errno",
            "outcome",
            "pid",
            "so_error",
            "src_port",
            "syn_retransmits",
            "syn_rtt_us",
            "ts_unix_ns"
        ]
    );
    assert_eq!(v["dst"], "10.77.1.2:8080");
    assert_eq!(v["outcome"], "refused");
    assert_eq!(v["errno"], "ECONNREFUSED");
    assert_eq!(v["so_error"], serde_json::Value::Null);
    assert_eq!(v["syn_rtt_us"], serde_json::Value::Null);
    assert_eq!(v["elapsed_us"], 250);
    assert_eq!(v["comm"], "curl");
    assert_eq!(v["ts_unix_ns"], 1_700_000_000_001_250_000u64);
}

#[test]
fn ipv6_and_mapped_addresses_round_trip() {
    let v6: SocketAddr = "[fd77:0:1::2]:443".parse().unwrap();
    assert_eq!(key_to_socket_addr(&socket_addr_to_key(v6)), v6);
    let mapped: SocketAddr = "[::ffff:10.0.0.5]:80".parse().unwrap();
    assert_eq!(
        key_to_socket_addr(&socket_addr_to_key(mapped)).to_string(),
        "10.0.0.5:80"
    );
}

#[test]
fn so_error_read_joins_its_outcome() {
    let clock = Clock::now();
    let mut j = Joiner::new(Duration::from_millis(100));
    let mut ready = Vec::new();
    let out = decode(&event(EventKind::Outcome, Outcome::Refused, 9), &clock).unwrap();
    j.push(out, 0, &mut ready);
    assert!(ready.is_empty(), "held for the join window");
    let mut follow = event(EventKind::SoError, Outcome::Refused, 9);
    follow.so_error = errno::ECONNREFUSED as u16;
    j.push(decode(&follow, &clock).unwrap(), 1_000, &mut ready);
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].so_error.as_deref(), Some("ECONNREFUSED"));
    assert_eq!(j.pending(), 0);
}

#[test]
fn an_outcome_nobody_asks_about_is_released_after_the_window() {
    let clock = Clock::now();
    let mut j = Joiner::new(Duration::from_millis(100));
    let mut ready = Vec::new();
    j.push(
        decode(&event(EventKind::Outcome, Outcome::Established, 1), &clock).unwrap(),
        0,
        &mut ready,
    );
    j.flush(99_000_000, &mut ready);
    assert!(ready.is_empty());
    j.flush(100_000_000, &mut ready);
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].so_error, None);
    assert_eq!(ready[0].syn_rtt_us, Some(120));
}

#[test]
fn a_read_of_zero_is_reported_as_zero_and_late_reads_are_counted() {
    let clock = Clock::now();
    let mut j = Joiner::new(Duration::from_millis(1));
    let mut ready = Vec::new();
    j.push(
        decode(&event(EventKind::Outcome, Outcome::Established, 3), &clock).unwrap(),
        0,
        &mut ready,
    );
    let mut follow = event(EventKind::SoError, Outcome::Established, 3);
    follow.so_error = 0;
    j.push(decode(&follow, &clock).unwrap(), 10, &mut ready);
    assert_eq!(ready[0].so_error.as_deref(), Some("0"));
    j.push(decode(&follow, &clock).unwrap(), 20, &mut ready);
    assert_eq!(j.late_so_errors, 1);
}

#[test]
fn unknown_errnos_get_a_number() {
    assert_eq!(errno_name(110), "ETIMEDOUT");
    assert_eq!(errno_name(4242), "E4242");
}
