//! `[router.proxy_protocol]` end to end, with HAProxy as the load balancer in front (TCP mode,
//! `send-proxy`, `send-proxy-v2`, `send-proxy-v2-ssl`), nginx as the upstream (it answers with
//! the `X-Forwarded-For` and `X-Forwarded-Proto` it got), and curl as the client, bound to
//! 127.0.0.2 so that the client differs from the load balancer (127.0.0.1):
//!
//! - v1 and v2, HTTP/1.1 and HTTP/2 (prior knowledge): the upstream and the access log see the
//!   client, not the load balancer, and so does a route's `allow_clients`;
//! - HAProxy terminating TLS (`send-proxy-v2-ssl`): the client spoke HTTPS, so
//!   `X-Forwarded-Proto: https` on the plain listener, and `https_redirect` leaves it be;
//! - HAProxy passing TLS through to the HTTPS listener: the header comes before the TLS
//!   handshake;
//! - HAProxy without the PROXY protocol: the connection is closed, nothing goes upstream, and
//!   the metric says `missing`;
//! - a peer not in `from` is served as it comes: its own client, and a PROXY line it sends is
//!   no header (`400`), so it cannot name another client.
//!
//! Unprivileged: loopback only; HAProxy and nginx are Debian's (installed by `./dev`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{metrics, sample},
    inprocess::{gateway_with, log_lines},
    peers::nginx_listening,
    ports::free_port,
};
use rcgen::{CertificateParams, KeyPair};

/// HAProxy in the foreground, killed when dropped.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy's frontends, each forwarding TCP to the gateway its own way.
struct Balancer {
    v1: u16,
    v2: u16,
    /// Terminates TLS, then `send-proxy-v2-ssl` to the plain listener.
    tls_off: u16,
    /// TLS passed through to the HTTPS listener, after a v2 header.
    tls_through: u16,
    /// No PROXY protocol at all.
    none: u16,
    _process: Haproxy,
}

fn balancer(dir: &Path, plain: SocketAddr, https: SocketAddr) -> Balancer {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["lb.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = dir.join("lb.pem");
    std::fs::write(&pem, cert.pem() + &key.serialize_pem()).unwrap();
    let ports = [
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    ];
    let pair = |name: &str, port: u16, bind_extra: &str, to: SocketAddr, server_extra: &str| {
        format!(
            "frontend {name}\n  bind 127.0.0.1:{port}{bind_extra}\n  default_backend {name}\n\
             backend {name}\n  server gw {to}{server_extra}\n"
        )
    };
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        [
            "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n".to_owned(),
            pair("v1", ports[0], "", plain, " send-proxy"),
            pair("v2", ports[1], "", plain, " send-proxy-v2"),
            pair("tls_off", ports[2], &format!(" ssl crt {}", pem.display()), plain, " send-proxy-v2-ssl"),
            pair("tls_through", ports[3], "", https, " send-proxy-v2"),
            pair("none", ports[4], "", plain, ""),
        ]
        .concat(),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("HAProxy (Debian's, installed by ./dev) starts");
    let process = Haproxy(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    for p in ports {
        while TcpStream::connect(("127.0.0.1", p)).is_err() {
            assert!(Instant::now() < deadline, "HAProxy did not listen on {p}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Balancer {
        v1: ports[0],
        v2: ports[1],
        tls_off: ports[2],
        tls_through: ports[3],
        none: ports[4],
        _process: process,
    }
}

/// curl from `from` to `url` (`extra` before it): (exit code, body).
fn curl(from: &str, url: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "-k", "--max-time", "10", "--interface", from])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    s.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_a_load_balancer_names_is_the_client_and_no_one_else_can_name_one() {
    let nginx_dir = gateway_testkit::tempdir::temp_dir("pp-nginx");
    let up = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 64; }}\nhttp {{\n access_log {d}/access.log;\n\
             server {{ listen {up}; location / {{ return 200 \"xff=$http_x_forwarded_for proto=$http_x_forwarded_proto\\n\"; }} }}\n}}\n",
            d = nginx_dir.display()
        ),
    )
    .unwrap();
    let _nginx = nginx_listening(&nginx_dir, &conf, &[up]);

    let gw = gateway_with("proxy-protocol", |base| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["gw.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(nginx_dir.join("gw.pem"), cert.pem()).unwrap();
        std::fs::write(nginx_dir.join("gw.key"), key.serialize_pem()).unwrap();
        format!(
            "{}[router.tls]\ncert_file = \"{d}/gw.pem\"\nkey_file = \"{d}/gw.key\"\n\
             [router.proxy_protocol]\nenabled = true\nfrom = [\"127.0.0.1\"]\n\
             [router.upstream]\nendpoints = [\"{up}\"]\n\
             [[routes]]\ncluster = \"default\"\n\
             [[routes]]\npath_prefix = \"/internal/\"\ncluster = \"default\"\nallow_clients = [\"127.0.0.2\"]\n\
             [[routes]]\npath_prefix = \"/secure/\"\ncluster = \"default\"\nhttps_redirect = true\n",
            base.replacen(
                "listen = [\"127.0.0.1:0\"]\n",
                "listen = [\"127.0.0.1:0\"]\nhttps_listen = [\"127.0.0.1:0\"]\nhttps_redirect_port = 8443\n",
                1
            ),
            d = nginx_dir.display()
        )
    })
    .await;
    let (plain, https) = (gw.addr, gw.handle.https_addrs()[0]);
    let admin = gw.handle.admin_addr().unwrap();
    let log = gw.log.clone();
    let dir = gw.dir.clone();

    tokio::task::spawn_blocking(move || {
        let lb = balancer(&dir, plain, https);
        // Counted from here: the connections that found HAProxy listening reached the gateway
        // too.
        let count = |result: &str| {
            let m = metrics(admin);
            sample(
                &m,
                "gateway_client_proxy_protocol_total",
                &[("result", result)],
            )
            .unwrap_or(0.0)
        };
        let all = || {
            ["v1", "v2", "missing", "malformed", "closed"]
                .map(count)
                .to_vec()
        };
        // Settled: the same counts twice, 300 ms apart.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut before = all();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = all();
            if now == before || Instant::now() > deadline {
                break;
            }
            before = now;
        }
        let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");

        // v1 and v2: the client, not the load balancer.
        let client_says = "xff=127.0.0.2 proto=http\n";
        assert_eq!(
            curl("127.0.0.2", &url(lb.v1, "/a"), &[]),
            (0, client_says.into())
        );
        assert_eq!(
            curl("127.0.0.2", &url(lb.v2, "/b"), &[]),
            (0, client_says.into())
        );
        let h2 = curl(
            "127.0.0.2",
            &url(lb.v2, "/c"),
            &["--http2-prior-knowledge", "-w", "%{http_version}"],
        );
        assert_eq!(h2, (0, format!("{client_says}2")));
        let lines = log_lines(&log, 3);
        for l in &lines {
            let client = l["client"].as_str().unwrap();
            assert!(client.starts_with("127.0.0.2:"), "{l}");
        }

        // HAProxy terminated TLS and says so: the client spoke HTTPS.
        let tls_off = curl(
            "127.0.0.2",
            &format!("https://127.0.0.1:{}/d", lb.tls_off),
            &[],
        );
        assert_eq!(tls_off, (0, "xff=127.0.0.2 proto=https\n".into()));
        // ... so a route that redirects plain HTTP to HTTPS serves it, and redirects the others.
        let status = ["-o", "/dev/null", "-w", "%{http_code}"];
        let secure = format!("https://127.0.0.1:{}/secure/x", lb.tls_off);
        assert_eq!(curl("127.0.0.2", &secure, &status), (0, "200".into()));
        assert_eq!(
            curl("127.0.0.2", &url(lb.v2, "/secure/x"), &status),
            (0, "301".into())
        );
        // TLS passed through to the HTTPS listener: the header before the handshake.
        let through = curl(
            "127.0.0.2",
            &format!("https://127.0.0.1:{}/e", lb.tls_through),
            &[],
        );
        assert_eq!(through, (0, "xff=127.0.0.2 proto=https\n".into()));

        // allow_clients goes by the client the header names.
        assert_eq!(
            curl(
                "127.0.0.2",
                &url(lb.v2, "/internal/x"),
                &["-o", "/dev/null", "-w", "%{http_code}"]
            ),
            (0, "200".into())
        );
        assert_eq!(
            curl(
                "127.0.0.3",
                &url(lb.v2, "/internal/x"),
                &["-o", "/dev/null", "-w", "%{http_code}"]
            ),
            (0, "403".into())
        );

        // A load balancer that sends no header: closed, nothing reaches the upstream.
        let served_before = gateway_testkit::peers::settled_log(&nginx_dir.join("access.log"), 0)
            .lines()
            .count();
        let (code, body) = curl("127.0.0.2", &url(lb.none, "/f"), &[]);
        // curl: an empty reply (52), or a reset passed on by HAProxy (56).
        assert!(
            matches!(code, 52 | 56) && body.is_empty(),
            "{code} {body:?}"
        );

        // A peer not in `from`: served as it comes, and its PROXY line names no one.
        assert_eq!(
            curl("127.0.0.3", &format!("http://{plain}/g"), &[]),
            (0, "xff=127.0.0.3 proto=http\n".into())
        );
        let mut s = connect_from("127.0.0.3", plain);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PROXY TCP4 6.6.6.6 127.0.0.1 1000 80\r\nGET /h HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        let upstream_log =
            gateway_testkit::peers::settled_log(&nginx_dir.join("access.log"), served_before + 1);
        assert_eq!(
            upstream_log.lines().count(),
            served_before + 1,
            "only /g reached nginx after the closed connection: {upstream_log}"
        );
        assert!(
            !upstream_log.contains("/f ") && !upstream_log.contains("/h "),
            "{upstream_log}"
        );

        let after = all();
        let counted: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(
            counted[..4],
            [1.0, 8.0, 1.0, 0.0],
            "v1, v2, missing, malformed"
        );
    })
    .await
    .unwrap();
    drop(gw);
}
