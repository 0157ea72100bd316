//! Privileged (root: the kernel observer attaches, cgroups): records that stop coming are
//! noticed. The gateway is moved out of its observer cgroup (as a tool that rearranges
//! cgroups would), so its connects are no longer seen: after 32 connects in a row without a
//! record, `/healthz`, `/status` and `gateway_observer_kernel_signals` say userspace timing
//! with the reason, the log says it once, and requests are served throughout. Moved back,
//! the next record turns kernel signals on again. Before, the gateway went on saying
//! `kernel`, and deciding on the word of a kernel that no longer watched (a response
//! timeout taken for a slow backend, "the kernel saw no stall"). curl as the client; every
//! request makes a fresh connect (`max_idle_per_endpoint = 0`). Panics without root.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{admin_get, metrics, value},
    config, gateway_bin,
    peers::curl_codes,
    process::GatewayProcess,
    root::require_root,
    service::cgroup_of,
    tempdir::temp_dir,
    upstream::BlockingUpstream,
};

/// `n` GETs through the gateway with curl, each on a fresh upstream connection; all 200.
fn requests(addr: std::net::SocketAddr, n: usize) {
    let codes = curl_codes(&format!("http://{addr}/"), n, &[]);
    assert!(
        codes.len() == n && codes.iter().all(|c| c == "200"),
        "{codes:?}"
    );
}

fn move_into(cgroup: &Path, pid: u32) {
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
        .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", cgroup.display()));
}

/// Waits until `/healthz` contains `want` (the mode is read per request) and the metric says
/// `kernel` (refreshed every second).
fn wait_mode(admin: std::net::SocketAddr, want: &str, kernel: f64) -> String {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let health = admin_get(admin, "/healthz").body;
        let m = value(&metrics(admin), "gateway_observer_kernel_signals", &[]);
        if health.contains(want) && m == kernel {
            return health;
        }
        assert!(
            Instant::now() < until,
            "/healthz {health:?} and gateway_observer_kernel_signals {m}, want {want:?} and {kernel}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn privileged_records_that_stop_coming_turn_decisions_to_userspace_timing_and_back() {
    require_root();
    let up = BlockingUpstream::start();
    let dir = temp_dir("observer-detached");
    let cfg = config::loopback(
        &dir,
        &[up.addr],
        "[router.upstream.limits]\nmax_idle_per_endpoint = 0\n\n[observer]\nmode = \"kernel\"\n",
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let pid = gw.pid();
    let observed = cgroup_of(pid);
    assert!(
        observed.file_name().unwrap().to_string_lossy() == format!("gateway-{pid}"),
        "the gateway runs in its observer cgroup: {}",
        observed.display()
    );
    requests(gw.addr, 5);
    wait_mode(gw.admin, "signals: kernel", 1.0);

    // Out of the observer's cgroup: its connects are no longer seen.
    move_into(observed.parent().unwrap(), pid);
    requests(gw.addr, 40);
    let health = wait_mode(
        gw.admin,
        "userspace-only (no kernel record of the last 32 upstream connects",
        0.0,
    );
    eprintln!("{health}");
    gw.expect_log(
        "kernel observer: no record of the last upstream connects",
        Duration::from_secs(5),
    );
    requests(gw.addr, 10);
    assert_eq!(
        gw.count("kernel observer: no record of the last upstream connects"),
        1,
        "said once"
    );

    // Back in: the next record turns kernel signals on again.
    move_into(&observed, pid);
    requests(gw.addr, 3);
    wait_mode(gw.admin, "signals: kernel", 1.0);
    gw.expect_log(
        "records of upstream connects come again",
        Duration::from_secs(5),
    );
}
