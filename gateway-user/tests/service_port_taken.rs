//! A second `gateway run` on an address a running gateway listens on is refused, with the
//! process that holds the address named, and the running one keeps every connection. The
//! client sockets set `SO_REUSEPORT`, so before the check the second one started and the
//! kernel gave it a share of the address's new connections (a config tried out by hand on a
//! host whose service runs would have taken live traffic). A restart on the same address right
//! after the first one stopped, with connections of its in `TIME_WAIT`, still starts.
//! curl as the client, the real binary. Unprivileged: `[observer] mode = "off"`, loopback only.

use std::{net::SocketAddr, path::Path, time::Duration};

use gateway_testkit::{
    gateway_bin,
    peers::curl_codes,
    process::{GatewayProcess, run_to_exit},
    tempdir::temp_dir,
    upstream::BlockingUpstream,
};

fn config(dir: &Path, name: &str, listen: &str, up: SocketAddr) -> std::path::PathBuf {
    let cfg = dir.join(name);
    std::fs::write(
        &cfg,
        format!(
            "[router]\nlisten = [\"{listen}\"]\ndrain_delay_ms = 0\n\n\
             [router.upstream]\nendpoints = [\"{up}\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [access_log]\noutput = \"off\"\n\n[observer]\nmode = \"off\"\n"
        ),
    )
    .unwrap();
    cfg
}

/// `n` GETs, each on a connection of its own that the gateway closes first (`Connection:
/// close`), leaving it in `TIME_WAIT` on the gateway's side; their status codes.
fn codes(addr: SocketAddr, n: usize) -> Vec<String> {
    curl_codes(&format!("http://{addr}/"), n, &["-H", "Connection: close"])
}

#[test]
fn a_second_gateway_on_a_taken_address_is_refused_and_a_restart_is_not() {
    let up = BlockingUpstream::start();
    let dir = temp_dir("port-taken");
    let first =
        GatewayProcess::spawn(gateway_bin!().run(&config(&dir, "a.toml", "127.0.0.1:0", up.addr)));
    let addr = first.addr;
    assert_eq!(codes(addr, 3), ["200"; 3]);

    let second = config(&dir, "b.toml", &addr.to_string(), up.addr);
    let (status, out) = run_to_exit(gateway_bin!().run(&second), Duration::from_secs(10));
    assert!(
        !status.success(),
        "the second gateway must not start: {out}"
    );
    let named = format!(
        "cannot listen on {addr}: another socket already listens there (pid {}, gateway)",
        first.pid()
    );
    assert!(out.contains(&named), "{named:?} in:\n{out}");
    assert!(
        !out.contains("(os error 98): "),
        "the cause is said once, not repeated after the message: {out}"
    );
    assert_eq!(codes(addr, 20), ["200"; 20], "the first one still serves");
    let served_before = up.hits.load(std::sync::atomic::Ordering::Relaxed);

    // The first one stops, its side of those connections in TIME_WAIT. The same address
    // starts at once.
    drop(first);
    assert!(
        time_wait_on(addr.port()),
        "no connection of the first gateway's port in TIME_WAIT: the restart would prove nothing"
    );
    let again = GatewayProcess::spawn(gateway_bin!().run(&second));
    assert_eq!(again.addr, addr);
    assert_eq!(codes(addr, 3), ["200"; 3]);
    assert!(up.hits.load(std::sync::atomic::Ordering::Relaxed) > served_before);
}

/// Whether a connection whose local port is `port` is in TIME_WAIT (`/proc/net/tcp`, state 06).
fn time_wait_on(port: u16) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&local) && f[3] == "06"
    })
}
