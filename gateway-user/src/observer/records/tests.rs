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
        reset: gateway_common::RESET_UNKNOWN,
        _pad: [0; 5],
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
fn follow_ups_and_outcomes_decode_to_their_kinds() {
    let ev = event(EventKind::Outcome, Outcome::Established, 9);
    let Some(Decoded::Outcome(c)) = decode(&ev) else {
        panic!("an outcome")
    };
    assert_eq!(c.syn_rtt, Some(Duration::from_micros(120)));
    assert_eq!(c.elapsed(), Duration::from_micros(250));
    assert_eq!(c.so_error, None);
    let mut follow = event(EventKind::SoError, Outcome::Established, 9);
    follow.so_error = 0;
    assert!(matches!(
        decode(&follow),
        Some(Decoded::SoError(SoErrorRead {
            cookie: 9,
            value: 0,
            ..
        }))
    ));
    let mut unknown = ev;
    unknown.outcome = 200;
    assert_eq!(decode(&unknown), None);
}

#[test]
fn unknown_errnos_get_a_number() {
    assert_eq!(errno_name(110), "ETIMEDOUT");
    assert_eq!(errno_name(4242), "E4242");
}
