//! How client connections are spread over worker threads (`[router] connection_balance`), on
//! the real binary with two workers.
//!
//! Each worker accepts on its own `SO_REUSEPORT` socket, where the kernel's hash of the
//! 4-tuple picks the worker: a random walk. With `"exact"` (the default) a worker hands a new
//! connection to the other one when that one has fewer open, so after every connection the
//! two are at most one apart; with `"kernel"` they drift apart. Both read
//! `gateway_worker_client_connections{worker}` after each of 40 keep-alive connections opened
//! one at a time and answered once. The chance that the kernel's split stays within one for
//! all 40 is 2^-20, so the second test shows what the first would see without the hand-over.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gateway_testkit::{admin::metrics, ports::free_port, tempdir::temp_dir};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
const CONNECTIONS: usize = 40;

/// An HTTP/1.1 upstream answering every request of a keep-alive connection with `200 ok`.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut s = s;
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}

struct Gateway {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(label: &str, balance: &str) -> Gateway {
    let dir = temp_dir(label);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[router]\nlisten = [\"{listen}\"]\nworkers = 2\ndrain_delay_ms = 0\n{balance}\n\
             [router.upstream]\nendpoints = [\"{}\"]\n\n\
             [admin]\nlisten = \"{admin}\"\n\n[access_log]\noutput = \"off\"\n\n\
             [observer]\nmode = \"off\"\n",
            upstream()
        ),
    )
    .unwrap();
    let child = Command::new(GATEWAY)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.err")).unwrap())
        .spawn()
        .unwrap();
    let gw = Gateway {
        child,
        listen,
        admin,
    };
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() || TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < end, "the gateway did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw
}

/// `gateway_worker_client_connections` of workers 0 and 1.
fn per_worker(admin: SocketAddr) -> [u64; 2] {
    let text = metrics(admin);
    [0, 1].map(|w| {
        let prefix = format!("gateway_worker_client_connections{{worker=\"{w}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}in:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    })
}

/// Opens the connections one at a time, each answered once and kept open; the split after each.
fn open_one_at_a_time(gw: &Gateway) -> (Vec<TcpStream>, Vec<[u64; 2]>) {
    let mut held = Vec::new();
    let mut splits = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut s = TcpStream::connect(gw.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
        splits.push(per_worker(gw.admin));
    }
    (held, splits)
}

#[test]
fn exact_balance_keeps_two_workers_within_one_connection_and_counts_them_down() {
    let gw = start("workers-exact", "");
    let (held, splits) = open_one_at_a_time(&gw);
    eprintln!("exact: {splits:?}");
    for (i, [a, b]) in splits.iter().enumerate() {
        assert_eq!(a + b, i as u64 + 1, "every connection counted: {splits:?}");
        assert!(
            a.abs_diff(*b) <= 1,
            "after {} connections: {splits:?}",
            i + 1
        );
    }
    // The connections the other worker took over are served there: each one answers again.
    for mut s in &held {
        s.write_all(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    drop(held);
    let end = Instant::now() + Duration::from_secs(5);
    while per_worker(gw.admin) != [0, 0] {
        assert!(
            Instant::now() < end,
            "closed connections still counted: {:?}",
            per_worker(gw.admin)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_kernels_split_alone_drifts_apart() {
    let gw = start("workers-kernel", "connection_balance = \"kernel\"\n");
    let (_held, splits) = open_one_at_a_time(&gw);
    eprintln!("kernel: {splits:?}");
    assert!(
        splits.iter().any(|[a, b]| a.abs_diff(*b) > 1),
        "SO_REUSEPORT kept the workers within one connection for all {CONNECTIONS}: {splits:?}"
    );
}
