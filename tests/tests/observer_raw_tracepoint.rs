//! Privileged: the raw `sys_exit` tracepoint that watches connect() returns when tracefs is out
//! of reach (a non-root observer: /sys/kernel/tracing is 0700). Forced here as root, it must
//! catch what the classic `syscalls:sys_exit_connect` tracepoint catches: EADDRNOTAVAIL, the
//! one connect failure that never reaches TCP, attributed to the right process, while the
//! connects around it are recorded as usual. Needs root; run with `--test-threads=1`.

use std::time::Duration;

use gateway::observer::ConnectExitHook;
use gateway_common::Outcome;
use gateway_lab::ClientSysctl;
use gateway_testkit::{connect_probe, observer::observed_lab_with};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(5);

#[test]
fn privileged_raw_tracepoint_catches_addr_unavailable() {
    let (lab, mut t) = observed_lab_with(1, ConnectExitHook::Raw);
    assert_eq!(t.observer.connect_exit_hook(), "raw tracepoint sys_exit");
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
