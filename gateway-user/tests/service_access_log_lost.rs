//! An access log whose output refuses its lines (a full disk: `/dev/full` answers every write
//! with ENOSPC): the requests are served as ever, the lost lines are counted in
//! `gateway_access_log_lines_lost_total{reason="write_error"}`, and the gateway says so in its
//! own log, once, not once per line. curl as the client, the real binary. Unprivileged:
//! `[observer] mode = "off"`, loopback only.

use std::{process::Command, time::Duration};

use gateway_testkit::{
    admin::metrics, config, gateway_bin, process::GatewayProcess, tempdir::temp_dir,
    upstream::BlockingUpstream,
};

#[test]
fn lines_a_full_disk_refuses_are_counted_and_said_once_while_requests_are_served() {
    let up = BlockingUpstream::start();
    let dir = temp_dir("access-log-full");
    let cfg = config::loopback(&dir, &[up.addr], "[access_log]\noutput = \"/dev/full\"\n");
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let url = format!("http://{}/", gw.addr);
    let mut curl = Command::new("curl");
    curl.args(["-s", "-w", " %{http_code}\n"]);
    for _ in 0..20 {
        curl.arg(&url);
    }
    let out = curl.output().expect("curl");
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|c| c.ends_with(" 200")).count(),
        20,
        "every request is served: {codes}"
    );

    let lost = || {
        let m = metrics(gw.admin);
        m.lines()
            .find_map(|l| {
                l.strip_prefix("gateway_access_log_lines_lost_total{reason=\"write_error\"} ")
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lost() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 20 lost lines counted",
            lost()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    gw.expect_log("cannot write the access log", Duration::from_secs(5));
    let said = gw
        .lines()
        .iter()
        .filter(|l| l.contains("cannot write the access log"))
        .count();
    assert_eq!(said, 1, "said once per 10 s, not once per line");
}
