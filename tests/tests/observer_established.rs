//! Privileged tests of what the observer reports about established connections and about its
//! own limits: RTOs, retransmits, unACKed bytes and srtt by cookie (the signals that separate
//! "the host died mid-request" from "the backend is slow"), and a ring buffer that overflows
//! (lost records are counted exactly, and the kernel aggregates still count every connect).
//! Run with `--test-threads=1`.

use std::{
    io::{BufRead as _, BufReader},
    time::Duration,
};

use gateway::observer::records::socket_addr_to_key;
use gateway_common::Outcome;
use gateway_lab::Fault;
use gateway_testkit::{
    connect_probe,
    observer::{Probe, observed_lab, observed_lab_with_records},
};

const PORT: u16 = 8080;

#[test]
fn privileged_acked_request_on_a_healthy_connection() {
    let (lab, mut rec) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    // Ended by a reset (here its own abort), which is when the proxy asks whether a request's
    // bytes were ACKed.
    let p = connect_probe!()
        .run_in(
            &lab,
            "blocking",
            up.addr_v4(PORT),
            &["--send", "1000", "--hold-ms", "200", "--abort"],
        )
        .remove(0);
    assert_eq!(p.result, "ok");
    assert_eq!(
        rec.record(p.cookie, Duration::from_secs(5)).outcome(),
        Outcome::Established
    );
    let cs = rec
        .observer
        .conn_stats(p.cookie)
        .expect("CONN_STATS has the reset connection");
    assert_eq!(
        cs.bytes_acked, 1000,
        "the upstream kernel ACKed every request byte"
    );
    assert_eq!(cs.unacked_bytes, 0);
    assert_eq!((cs.rtos, cs.data_retransmits), (0, 0));
    assert!(cs.closed_ns > 0, "recorded when it left ESTABLISHED");
    assert!(
        cs.srtt_us > 0 && cs.srtt_us < 5_000,
        "srtt {} µs",
        cs.srtt_us
    );
}

/// A connection closed cleanly (everything ACKed, nothing retransmitted) leaves no
/// `CONN_STATS` record, by either side's close; its connect record is there as always.
#[test]
fn privileged_a_clean_close_leaves_no_connection_record() {
    let (lab, mut rec) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let p = connect_probe!()
        .run_in(
            &lab,
            "blocking",
            up.addr_v4(PORT),
            &["--send", "1000", "--hold-ms", "200"],
        )
        .remove(0);
    assert_eq!(p.result, "ok");
    assert_eq!(
        rec.record(p.cookie, Duration::from_secs(5)).outcome(),
        Outcome::Established
    );
    assert_eq!(
        rec.observer.conn_stats(p.cookie).map(|c| c.bytes_acked),
        None,
        "a clean close is not recorded"
    );
}

/// A connect-probe that connects to `addr`, then after `pause_ms` sends 1000 bytes and keeps
/// the connection `hold_ms` more; returned once connected, with its line.
fn send_after(
    lab: &gateway_lab::Lab,
    addr: std::net::SocketAddr,
    pause_ms: &str,
    hold_ms: &str,
) -> (std::process::Child, Probe) {
    send_after_in_style(lab, "blocking", &[], addr, pause_ms, hold_ms)
}

/// [`send_after`] with connect-probe's `style` and its own arguments `extra`.
fn send_after_in_style(
    lab: &gateway_lab::Lab,
    style: &str,
    extra: &[&str],
    addr: std::net::SocketAddr,
    pause_ms: &str,
    hold_ms: &str,
) -> (std::process::Child, Probe) {
    let mut args = extra.to_vec();
    args.extend([
        "--send",
        "1000",
        "--pause-ms",
        pause_ms,
        "--hold-ms",
        hold_ms,
    ]);
    let mut child = connect_probe!().spawn_in(lab, style, addr, &args);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let p: Probe = serde_json::from_str(&line).unwrap();
    assert_eq!(p.result, "ok", "{line}");
    (child, p)
}

/// Waits for the probe to end; its connect is recorded as established, and `CONN_STATS` has
/// its connection.
fn ended_with_a_record(
    rec: &mut gateway_testkit::observer::Recorder,
    mut child: std::process::Child,
    cookie: u64,
) -> gateway_common::ConnStats {
    assert!(child.wait().unwrap().success());
    assert_eq!(
        rec.record(cookie, Duration::from_secs(5)).outcome(),
        Outcome::Established
    );
    rec.observer
        .conn_stats(cookie)
        .expect("CONN_STATS has the connection")
}

/// The stale keep-alive race, as the kernel records it: the upstream closes an idle
/// connection (its FIN: CLOSE_WAIT here), a request is written on it anyway, and the upstream's
/// kernel resets it. The callbacks stay on through CLOSE_WAIT, so the reset is recorded, and
/// the record says that none of the request was ACKed: what lets the proxy retry even a POST.
#[test]
fn privileged_a_request_written_after_the_peers_fin_is_recorded_unacked() {
    let (lab, mut rec) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let srv = up.serve_hold(PORT).unwrap();
    let (child, p) = send_after(&lab, up.addr_v4(PORT), "500", "300");
    // The upstream closes the connection before the request is written.
    srv.stop();
    let cs = ended_with_a_record(&mut rec, child, p.cookie);
    assert_eq!(cs.bytes_acked, 0, "no request byte was ACKed");
    assert!(cs.closed_ns > 0);
}

#[test]
fn privileged_host_dies_mid_request_shows_rtos_and_unacked_bytes() {
    let (lab, mut rec) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let (child, p) = send_after(&lab, up.addr_v4(PORT), "300", "2500");
    host_dies_before_the_request(&mut rec, up, child, p.cookie);
}

/// The connection of probe `child` (`cookie`) to `up` is up; the host now drops everything,
/// before the request is sent. Its connection shows the RTOs, retransmits and unACKed bytes,
/// by cookie and per destination.
fn host_dies_before_the_request(
    rec: &mut gateway_testkit::observer::Recorder,
    up: &gateway_lab::Upstream,
    child: std::process::Child,
    cookie: u64,
) {
    let _dead = up.apply(Fault::Blackhole { port: PORT }).unwrap();
    let cs = ended_with_a_record(rec, child, cookie);
    assert_eq!(
        cs.bytes_acked, 0,
        "no request byte reached the upstream's kernel"
    );
    assert!(
        cs.unacked_bytes >= 1000,
        "unACKed {} bytes",
        cs.unacked_bytes
    );
    // Minimum RTO is 200 ms and doubles: ~0.2, 0.6, 1.4 s within the 2.5 s hold.
    assert!(cs.rtos >= 2, "{} RTOs", cs.rtos);
    assert!(
        cs.data_retransmits >= 2,
        "{} retransmits",
        cs.data_retransmits
    );
    assert!(cs.last_rto_ns > 0 && cs.closed_ns > 0);
    let key = socket_addr_to_key(up.addr_v4(PORT));
    let (_, dest) = rec
        .observer
        .dest_stats()
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap();
    assert_eq!(dest.rtos, u64::from(cs.rtos));
    assert_eq!(dest.data_retransmits, u64::from(cs.data_retransmits));
}

/// As above, on a connection whose record in the kernel's table a newer connect has taken
/// (a pooled connection outlives `max_connections` connects): RTOs, retransmits and unACKed
/// bytes are still recorded, by cookie and per destination, from the connection's own state.
#[test]
fn privileged_a_connection_whose_record_was_reused_still_shows_rtos_and_unacked_bytes() {
    const RECORDS: u32 = 4;
    let (lab, mut rec) = observed_lab_with_records(1, RECORDS);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let (child, p) = send_after(&lab, up.addr_v4(PORT), "600", "2500");
    // Twice as many connects as the table has records, with consecutive cookies: they take
    // every slot, the connection's among them.
    let refused = connect_probe!().run_in(
        &lab,
        "blocking",
        up.addr_v4(PORT + 1),
        &["--count", &(2 * RECORDS).to_string()],
    );
    assert!(
        refused.iter().all(|r| r.result == "ECONNREFUSED"),
        "{refused:?}"
    );
    host_dies_before_the_request(&mut rec, up, child, p.cookie);
}

/// As above, on a socket that connected twice, when all that is left of it in the kernel's
/// table is its first, refused connect (`connect-probe reconnect` arranges that): sock_ops
/// must not take that stale record for the connection's, or its RTOs would go uncounted.
#[test]
fn privileged_a_socket_that_connected_again_shows_rtos_past_its_stale_record() {
    const RECORDS: u32 = 4;
    let (lab, mut rec) = observed_lab_with_records(1, RECORDS);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let (first, records) = (up.addr_v4(PORT + 1).to_string(), RECORDS.to_string());
    let (child, p) = send_after_in_style(
        &lab,
        "reconnect",
        &["--first", &first, "--slots", &records],
        up.addr_v4(PORT),
        "600",
        "2500",
    );
    assert_eq!(
        rec.record(p.cookie, Duration::from_secs(5)).outcome(),
        Outcome::Refused,
        "the first connect"
    );
    host_dies_before_the_request(&mut rec, up, child, p.cookie);
}

#[test]
fn privileged_ring_buffer_overflow_is_counted_exactly() {
    let (lab, mut rec) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _f = up.apply(Fault::Refuse { port: PORT }).unwrap();
    // The ring holds ~10,000 records (1 MiB); nobody drains it while 15,000 connects happen.
    const N: usize = 15_000;
    let probes = connect_probe!().run_in(
        &lab,
        "blocking",
        up.addr_v4(PORT),
        &["--count", &N.to_string()],
    );
    assert_eq!(probes.len(), N);
    let received = rec.drain_count();
    let lost = rec.observer.events_lost();
    assert!(
        lost > 0,
        "the ring must have overflowed (received {received})"
    );
    assert_eq!(
        received as u64 + lost,
        N as u64,
        "every record is either delivered or counted as lost"
    );
    let key = socket_addr_to_key(up.addr_v4(PORT));
    let (_, dest) = rec
        .observer
        .dest_stats()
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap();
    assert_eq!(
        dest.attempts[Outcome::Refused as usize],
        N as u64,
        "aggregates do not depend on the ring"
    );
}
