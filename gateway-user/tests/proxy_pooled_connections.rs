//! Pooled (keep-alive) upstream connections never fail a request that could be retried.
//!
//! - An upstream that resets the n-th request of every connection (after reading it): every
//!   GET still succeeds (retried on a fresh connection, `stale_connection`), and a POST that
//!   the upstream read is never sent twice.
//! - nginx, as an upstream that closes idle keep-alive connections, under bursts timed to meet
//!   its close: no request fails.
//! - An upstream's `Keep-Alive: timeout=N` is honoured: the gateway gives the connection up
//!   before the upstream's timer would.
//!
//! Unprivileged: loopback only; nginx is Debian's (installed by `./dev`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use gateway_testkit::{
    http::{client, full, get, read_message, send},
    inprocess::gateway,
    peers::{NginxProcess, spawn_nginx},
    tempdir::temp_dir,
};
use http::{Request, StatusCode};
use tokio::{io::AsyncWriteExt as _, net::TcpListener};

/// What the scripted upstream saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    resets: AtomicUsize,
    connections: AtomicUsize,
    /// POST ids (the request path), with how often each arrived.
    posts: Mutex<HashMap<String, usize>>,
}

/// An HTTP/1.1 upstream that answers each connection's first `n - 1` requests and, on the
/// n-th, reads it whole and closes the connection with an RST (SO_LINGER 0), answering
/// nothing.
async fn reset_every_nth(n: usize) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for k in 1.. {
                    let Some(head) = read_message(&mut stream, &mut buf).await else {
                        return;
                    };
                    s.requests.fetch_add(1, Ordering::SeqCst);
                    if let Some(path) = head.strip_prefix("POST ") {
                        let id = path.split(' ').next().unwrap_or("").to_owned();
                        *s.posts.lock().unwrap().entry(id).or_default() += 1;
                    }
                    if k == n {
                        s.resets.fetch_add(1, Ordering::SeqCst);
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn cluster_config(upstream: SocketAddr) -> String {
    format!(
        r#"
[router.upstream]
endpoints = ["{upstream}"]

[router.upstream.timeouts]
connect_timeout_ms = 1000
response_timeout_ms = 5000
"#
    )
}

/// Sends `total` GETs, `concurrency` at a time; returns the statuses that were not 200.
async fn load(addr: SocketAddr, total: usize, concurrency: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, failures) = (next.clone(), failures.clone());
            tokio::spawn(async move {
                let c = client();
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let got = get(&c, addr, "/get").await;
                    if got.status != StatusCode::OK {
                        failures.lock().unwrap().push(format!(
                            "{} {} {}",
                            got.status,
                            got.header("x-gateway-error"),
                            got.body.trim()
                        ));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a load task panicked");
    }
    Arc::try_unwrap(failures).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_on_connections_the_upstream_resets_never_fail() {
    const N: usize = 50;
    const TOTAL: usize = 100_000;
    let (up, seen) = reset_every_nth(N).await;
    let gw = gateway("pooled-reset", &cluster_config(up)).await;
    let started = Instant::now();
    let failures = load(gw.addr, TOTAL, 32).await;
    let took = started.elapsed();
    let resets = seen.resets.load(Ordering::SeqCst);
    eprintln!(
        "{TOTAL} GETs in {took:?}: {resets} reset by the upstream, {} connections, {} failures",
        seen.connections.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(
        resets >= TOTAL / N / 2,
        "the upstream reset too few requests ({resets}) for the test to mean anything"
    );
    assert!(
        failures.is_empty(),
        "{} of {TOTAL} GETs failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Each reset GET was sent once more: what the upstream saw is what the clients sent plus
    // one per reset.
    assert_eq!(seen.requests.load(Ordering::SeqCst), TOTAL + resets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_upstream_read_is_never_sent_twice() {
    const N: usize = 5;
    let (up, seen) = reset_every_nth(N).await;
    let gw = gateway("pooled-post", &cluster_config(up)).await;
    let c = client();
    let mut failed = 0;
    for i in 0..200 {
        let req = Request::post(format!("http://{}/post-{i}", gw.addr))
            .header("host", "test.local")
            .body(full(format!("order {i}")))
            .unwrap();
        let got = send(&c, req).await;
        match got.status {
            StatusCode::OK => {}
            StatusCode::BAD_GATEWAY => {
                assert_eq!(
                    got.header("x-gateway-error"),
                    "upstream_reset",
                    "{}",
                    got.body
                );
                failed += 1;
            }
            other => panic!("POST {i}: unexpected {other}: {}", got.body),
        }
    }
    let posts = seen.posts.lock().unwrap();
    let twice: Vec<_> = posts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "POSTs sent twice: {twice:?}");
    assert_eq!(posts.len(), 200, "every POST reached the upstream once");
    // The upstream read each reset POST (its kernel ACKed it): those fail, and only those.
    assert_eq!(failed, seen.resets.load(Ordering::SeqCst));
    assert!(failed > 0, "the upstream reset no POST");
}

/// nginx on loopback, serving `return 200`, with the given keep-alive directives.
struct Nginx {
    child: Option<NginxProcess>,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        drop(self.child.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx(label: &str, keepalive: &str) -> Nginx {
    let dir = temp_dir(label);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\nerror_log {dir}/error.log;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; {keepalive} keepalive_requests 1000000;\n\
             client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};\n\
             uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
             server {{ listen {addr}; location / {{ return 200 \"ok\"; }} }} }}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let child = spawn_nginx(
        Command::new("/usr/sbin/nginx")
            .args(["-c"])
            .arg(&conf)
            .args(["-p"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        child: Some(child),
        addr,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_closing_idle_keep_alive_connections_never_fails_a_request() {
    // nginx closes a connection `keepalive_timeout` after its last response. Bursts of
    // requests every ~100 ms, with a jitter around that timeout, keep meeting its close: the
    // pool's connections are exactly that old when the next burst takes them.
    let nginx = nginx("pooled-nginx", "keepalive_timeout 100ms;");
    let gw = gateway("pooled-nginx", &cluster_config(nginx.addr)).await;
    const CLIENTS: usize = 250;
    const BURSTS: usize = 400;
    let failures = Arc::new(Mutex::new(Vec::new()));
    let t0 = tokio::time::Instant::now() + Duration::from_millis(200);
    // The same pseudo-random schedule for every client: 90..=110 ms apart.
    let schedule: Arc<Vec<Duration>> = Arc::new(
        (0..BURSTS)
            .scan(
                (t0 - tokio::time::Instant::now(), 12345u64),
                |(at, x), _| {
                    *x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *at += Duration::from_millis(90 + (*x >> 33) % 21);
                    Some(*at)
                },
            )
            .collect(),
    );
    let now = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (failures, schedule, addr) = (failures.clone(), schedule.clone(), gw.addr);
            tokio::spawn(async move {
                let c = client();
                for at in schedule.iter() {
                    tokio::time::sleep_until(now + *at).await;
                    let got = get(&c, addr, "/").await;
                    if got.status != StatusCode::OK {
                        failures.lock().unwrap().push(format!(
                            "{} {} {}",
                            got.status,
                            got.header("x-gateway-error"),
                            got.body.trim()
                        ));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client task panicked");
    }
    let failures = failures.lock().unwrap();
    eprintln!(
        "{} requests through nginx closing idle connections: {} failures",
        CLIENTS * BURSTS,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        CLIENTS * BURSTS,
        &failures[..failures.len().min(5)]
    );
}
