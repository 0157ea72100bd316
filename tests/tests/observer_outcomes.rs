//! Privileged end-to-end tests of the kernel observer, one per outcome class, in the fault lab.
//! Each runs a real client (`connect-probe`) in the lab's client namespace and cgroup, injects
//! the fault on an upstream, and checks the observer's record against both the fault and what
//! the application itself saw. Needs root; run with `--test-threads=1`.

use std::time::Duration;

use gateway_common::Outcome;
use gateway_lab::{ClientSysctl, Fault, NetStat};
use gateway_testkit::{connect_probe, observer::observed_lab};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(5);

#[test]
fn privileged_accepting_v4_records_syn_rtt_pid_comm_and_so_error() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let addr = up.addr_v4(PORT);
    let p = connect_probe!().run_in(&lab, "go", addr, &[]).remove(0);
    assert_eq!(p.result, "ok");
    let r = t.record(p.cookie, WAIT);
    assert_eq!(r.outcome(), Outcome::Established);
    assert_eq!(r.dst, addr);
    assert_eq!(r.pid, p.pid, "attributed to the probe process");
    assert_eq!(r.comm, "connect-probe");
    assert_eq!(
        r.so_error.as_deref(),
        Some("0"),
        "Go-style clients read SO_ERROR=0 on success"
    );
    assert_eq!(r.errno, None);
    assert_eq!(r.syn_retransmits, 0);
    let rtt = r.syn_rtt_us.expect("established records carry a SYN-RTT");
    assert!(
        rtt < 5_000,
        "SYN-RTT on a veth must be under 5 ms, got {rtt} µs"
    );
    assert!(r.src_port != 0);
}

#[test]
fn privileged_accepting_v6() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let addr = up.addr_v6(PORT);
    let p = connect_probe!()
        .run_in(&lab, "blocking", addr, &[])
        .remove(0);
    assert_eq!(p.result, "ok");
    let r = t.record(p.cookie, WAIT);
    assert_eq!(r.outcome(), Outcome::Established);
    assert_eq!(r.dst, addr);
    assert!(r.syn_rtt_us.unwrap() < 5_000);
    assert_eq!(r.so_error, None, "a blocking connect never reads SO_ERROR");
}

#[test]
fn privileged_refused_v4_and_v6_within_50ms() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _f = up.apply(Fault::Refuse { port: PORT }).unwrap();
    for addr in up.addrs(PORT) {
        let p = connect_probe!().run_in(&lab, "go", addr, &[]).remove(0);
        assert_eq!(p.result, "ECONNREFUSED");
        let r = t.record(p.cookie, WAIT);
        assert_eq!(r.outcome(), Outcome::Refused, "{addr}");
        assert_eq!(r.errno.as_deref(), Some("ECONNREFUSED"));
        assert_eq!(
            r.so_error.as_deref(),
            Some("ECONNREFUSED"),
            "the app's getsockopt(SO_ERROR)"
        );
        assert!(r.elapsed_us < 50_000, "refused after {} µs", r.elapsed_us);
        assert_eq!(r.syn_rtt_us, None);
    }
}

#[test]
fn privileged_icmp_host_unreachable() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _f = up.apply(Fault::HostUnreachable { port: PORT }).unwrap();
    let p = connect_probe!()
        .run_in(&lab, "go", up.addr_v4(PORT), &[])
        .remove(0);
    assert_eq!(p.result, "EHOSTUNREACH");
    let r = t.record(p.cookie, WAIT);
    assert_eq!(r.outcome(), Outcome::Unreachable, "{r:?} {p:?}");
    assert_eq!(r.errno.as_deref(), Some("EHOSTUNREACH"));
    assert_eq!(r.so_error.as_deref(), Some("EHOSTUNREACH"));
}

#[test]
fn privileged_syn_blackhole_counts_every_retransmit_then_etimedout_matching_nstat() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _f = up.apply(Fault::SynBlackhole { port: PORT }).unwrap();
    const RETRIES: u8 = 2;
    let _r = lab
        .set_client_sysctl(ClientSysctl::SynRetries(RETRIES))
        .unwrap();
    let _l = lab
        .set_client_sysctl(ClientSysctl::SynLinearTimeouts(0))
        .unwrap();
    let before = lab.client().netstat().unwrap();
    let p = connect_probe!()
        .run_in(&lab, "blocking", up.addr_v4(PORT), &[])
        .remove(0);
    let after = lab.client().netstat().unwrap();
    assert_eq!(p.result, "ETIMEDOUT");
    let r = t.record(p.cookie, WAIT);
    assert_eq!(r.outcome(), Outcome::Timeout);
    assert_eq!(r.errno.as_deref(), Some("ETIMEDOUT"));
    assert_eq!(
        r.syn_retransmits,
        u16::from(RETRIES),
        "one per tcp_syn_retries"
    );
    let witness = after.delta(&before).get(NetStat::SYN_RETRANS).unwrap_or(0);
    assert_eq!(
        u64::from(r.syn_retransmits),
        witness,
        "the kernel's own TcpExtTCPSynRetrans agrees"
    );
    // Classic back-off (linear timeouts off): SYN at 0, retransmits at +1 s and +3 s, give up at +7 s.
    assert!(
        (6_500_000..8_500_000).contains(&r.elapsed_us),
        "timed out after {} µs",
        r.elapsed_us
    );
    assert!(
        (r.elapsed_us as i64 - p.elapsed_us as i64).abs() < 200_000,
        "kernel and app agree on the time"
    );
}

/// A connect whose first SYNs were lost and whose third got through: the SYN-RTT is the whole
/// wait, from the connect, not a clean sample of a single SYN (sock_ops reads the kernel's own
/// sample only for a SYN sent once; `syn_rtt_ns` in gateway-ebpf/src/sockops.rs).
#[test]
fn privileged_established_after_syn_retransmits_counts_the_wait_from_the_connect() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let _l = lab
        .set_client_sysctl(ClientSysctl::SynLinearTimeouts(0))
        .unwrap();
    let fault = up.apply(Fault::SynBlackhole { port: PORT }).unwrap();
    // SYN at 0, retransmits at +1 s and +3 s: the blackhole is gone before the second one.
    let p = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            connect_probe!()
                .run_in(&lab, "blocking", up.addr_v4(PORT), &[])
                .remove(0)
        });
        std::thread::sleep(Duration::from_millis(1_800));
        drop(fault);
        probe.join().unwrap()
    });
    assert_eq!(p.result, "ok");
    let r = t.record(p.cookie, WAIT);
    assert_eq!(r.outcome(), Outcome::Established);
    // Two retransmits, unless the probe started so late that its second SYN already got through.
    let wait_us = match r.syn_retransmits {
        1 => 1_000_000,
        2 => 3_000_000,
        n => panic!("{n} SYN retransmits for a blackhole of 1.8 s"),
    };
    let rtt = r.syn_rtt_us.unwrap();
    assert!(
        (wait_us - 100_000..wait_us + 600_000).contains(&rtt),
        "SYN-RTT {rtt} µs after {} SYN retransmits (at +1 s and +3 s)",
        r.syn_retransmits
    );
    assert!(
        rtt.abs_diff(r.elapsed_us) < 1_000,
        "SYN-RTT {rtt} µs is the connect's whole wait, {} µs",
        r.elapsed_us
    );
}

#[test]
fn privileged_syn_ack_delayed_200ms() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let _f = up
        .apply(Fault::SynAckDelay {
            port: PORT,
            delay: Duration::from_millis(200),
        })
        .unwrap();
    let p = connect_probe!()
        .run_in(&lab, "tokio", up.addr_v4(PORT), &[])
        .remove(0);
    assert_eq!(p.result, "ok");
    let r = t.record(p.cookie, WAIT);
    assert_eq!(r.outcome(), Outcome::Established);
    let rtt = r.syn_rtt_us.unwrap();
    // At least the delay, not twice it; the rest is the lab's delayer thread waking up.
    assert!(
        (200_000..300_000).contains(&rtt),
        "SYN-RTT {rtt} µs for a 200 ms SYN-ACK delay"
    );
    assert_eq!(
        r.so_error.as_deref(),
        Some("0"),
        "tokio reads SO_ERROR through take_error()"
    );
    assert_eq!(r.pid, p.pid);
}

#[test]
fn privileged_userspace_timeout_300ms_is_aborted() {
    let (lab, mut t) = observed_lab(1);
    let up = lab.upstream(0).unwrap();
    let _f = up.apply(Fault::SynBlackhole { port: PORT }).unwrap();
    for style in ["go", "tokio"] {
        let p = connect_probe!()
            .run_in(&lab, style, up.addr_v4(PORT), &["--timeout-ms", "300"])
            .remove(0);
        assert_eq!(p.result, "userspace_timeout");
        let r = t.record(p.cookie, WAIT);
        assert_eq!(r.outcome(), Outcome::Aborted, "{style}");
        assert_eq!(r.errno, None);
        assert_eq!(r.so_error, None, "{style}: the app gave up without asking");
        assert!(
            (300_000..400_000).contains(&r.elapsed_us),
            "{style}: aborted after {} µs",
            r.elapsed_us
        );
        assert_eq!(
            r.syn_retransmits, 0,
            "the first SYN retransmit is due at 1 s"
        );
    }
}

#[test]
fn privileged_ephemeral_ports_exhausted_is_addr_unavailable() {
    let (lab, mut t) = observed_lab(1);
    // This kernel (6.12 or later) needs no connect-return hook: sock_ops sees the failure.
    assert_eq!(
        t.observer.connect_exit_hook(),
        gateway::observer::STATE_CALLBACK
    );
    let up = lab.upstream(0).unwrap();
    let _srv = up.serve_hold(PORT).unwrap();
    let _range = lab
        .set_client_sysctl(ClientSysctl::LocalPortRange {
            low: 40000,
            high: 40001,
        })
        .unwrap();
    let probes = connect_probe!().run_in(
        &lab,
        "blocking",
        up.addr_v4(PORT),
        &["--count", "3", "--keep"],
    );
    assert_eq!(
        probes.iter().map(|p| p.result.as_str()).collect::<Vec<_>>(),
        ["ok", "ok", "EADDRNOTAVAIL"]
    );
    let r = t.record(probes[2].cookie, WAIT);
    assert_eq!(r.outcome(), Outcome::AddrUnavailable);
    assert_eq!(r.errno.as_deref(), Some("EADDRNOTAVAIL"));
    assert_eq!(r.src_port, 0);
    assert_eq!(r.pid, probes[2].pid);
    for p in &probes[..2] {
        assert_eq!(t.record(p.cookie, WAIT).outcome(), Outcome::Established);
    }
}

#[test]
fn privileged_kernel_aggregates_match_the_records() {
    let (lab, mut t) = observed_lab(2);
    let ok = lab.upstream(0).unwrap();
    let bad = lab.upstream(1).unwrap();
    let _srv = ok.serve_hold(PORT).unwrap();
    let _f = bad.apply(Fault::Refuse { port: PORT }).unwrap();
    let good = connect_probe!().run_in(&lab, "blocking", ok.addr_v4(PORT), &["--count", "5"]);
    let refused = connect_probe!().run_in(&lab, "blocking", bad.addr_v4(PORT), &["--count", "3"]);
    for p in good.iter().chain(&refused) {
        t.record(p.cookie, WAIT);
    }
    let stats = t.observer.dest_stats();
    let find = |addr| {
        let key = gateway::observer::records::socket_addr_to_key(addr);
        stats
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| *s)
            .expect("destination in DEST_STATS")
    };
    let s = find(ok.addr_v4(PORT));
    assert_eq!(s.attempts[Outcome::Established as usize], 5);
    assert_eq!(s.syn_rtt_hist.iter().sum::<u64>(), 5);
    let s = find(bad.addr_v4(PORT));
    assert_eq!(s.attempts[Outcome::Refused as usize], 3);
    assert_eq!(s.attempts[Outcome::Established as usize], 0);
    assert_eq!(t.observer.events_lost(), 0);
}
