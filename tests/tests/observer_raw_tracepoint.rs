//! Privileged: the connect-return hooks that see EADDRNOTAVAIL (the one connect failure that
//! never sends a SYN) on kernels older than 6.12, where connect4/6 cannot turn sock_ops'
//! state callback on themselves. Forced here: the classic `syscalls:sys_exit_connect`
//! tracepoint (root, tracefs), and the raw `sys_exit` tracepoint that a non-root observer
//! without tracefs gets (/sys/kernel/tracing is 0700). Each must catch EADDRNOTAVAIL,
//! attributed to the right process, while the connects around it are recorded as usual. Needs
//! root; run with `--test-threads=1`.

use std::time::Duration;

use gateway::observer::ConnectExitHook;
use gateway_common::Outcome;
use gateway_lab::ClientSysctl;
use gateway_testkit::{connect_probe, observer::observed_lab_with};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(5);

#[test]
fn privileged_raw_tracepoint_catches_addr_unavailable() {
    catches_addr_unavailable(ConnectExitHook::Raw, "raw tracepoint sys_exit");
}

#[test]
fn privileged_classic_tracepoint_catches_addr_unavailable() {
    catches_addr_unavailable(
        ConnectExitHook::Tracepoint,
        "tracepoint syscalls:sys_exit_connect",
    );
}

fn catches_addr_unavailable(hook: ConnectExitHook, name: &str) {
    let (lab, mut t) = observed_lab_with(1, hook);
    assert_eq!(t.observer.connect_exit_hook(), name);
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
    assert_eq!(r.pid, probes[2].pid);
    for p in &probes[..2] {
        assert_eq!(t.record(p.cookie, WAIT).outcome(), Outcome::Established);
    }
}
