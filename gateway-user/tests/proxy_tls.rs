//! HTTPS in and TLS out, end to end with real third-party programs: curl and `openssl
//! s_client` against the HTTPS listener (ALPN h2 and http/1.1, SNI choosing the certificate,
//! plain HTTP on the HTTPS port, a client stalling its handshake closed at the downstream
//! `tls_handshake_timeout_ms`), nginx with TLS and a CA of its own as the upstream (name
//! mismatch and unknown CA answered 502 `tls_error`), a TLS upstream that accepts TCP and
//! never answers the ClientHello (504 `tls_handshake_timeout` within the configured time, with
//! the kernel's view of the TCP connection: privileged), and certificates reloaded by SIGHUP
//! under load with no failed request; client certificates both ways (mTLS); an unknown SNI
//! with no default certificate, `min_version`, and `gateway_host`; a WebSocket over TLS keeps
//! its place in `max_client_connections`. Certificates are generated
//! at test time (rcgen).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use gateway_testkit::{
    config::{base_config, write_config},
    gateway_bin,
    peers::{NginxProcess, spawn_nginx},
    process::GatewayProcess,
    tempdir::temp_dir,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA and the leaves it signs, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    ca: (CertificateParams, KeyPair),
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            ca: (p, key),
        }
    }

    /// A leaf for `names` (ECDSA P-256), written as `{file}.pem` / `{file}.key`.
    fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let mut p =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = p
            .signed_by(&key, &Issuer::from_params(&self.ca.0, &self.ca.1))
            .unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx serving TLS with `cert`, answering what it was asked and how.
struct Nginx {
    addr: SocketAddr,
    _child: NginxProcess,
}

impl Nginx {
    fn start(dir: &Path, cert: &Path, key: &Path) -> Nginx {
        Nginx::start_with(dir, cert, key, "")
    }

    /// With `extra` directives in its server block.
    fn start_with(dir: &Path, cert: &Path, key: &Path, extra: &str) -> Nginx {
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx.err;\n\
                 events {{}}\nhttp {{ access_log off;\n server {{ listen 127.0.0.1:{port} ssl;\n\
                 ssl_certificate {c}; ssl_certificate_key {k}; {extra}\n\
                 location / {{ return 200 \"tls-upstream proto=$http_x_forwarded_proto sni=$ssl_server_name client=$ssl_client_s_dn\\n\"; }} }} }}\n",
                d = dir.display(),
                c = cert.display(),
                k = key.display()
            ),
        )
        .unwrap();
        let child = spawn_nginx(
            Command::new("nginx")
                .args(["-e", "stderr", "-c"])
                .arg(&conf)
                .stdout(Stdio::null()),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            addr,
            _child: child,
        }
    }
}

/// The HTTPS address the gateway logged.
fn https_addr(gw: &GatewayProcess) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gw.text();
        if let Some(a) = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("https_listener="))
        {
            return a.parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no HTTPS listener logged:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// curl against the HTTPS listener as `host`; returns (status, http version, headers+body).
fn curl(
    addr: SocketAddr,
    ca: &Path,
    host: &str,
    path: &str,
    extra: &[&str],
) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{}:{}", addr.port(), addr.ip()))
        .args(extra)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("https://{host}:{}{path}", addr.port()))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text.lines().last().unwrap_or("").to_owned();
    let mut it = last.split(' ');
    let code = it.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, it.next().unwrap_or("").to_owned(), text)
}

/// `openssl s_client` with `sni` and `alpn`: its report of the handshake.
fn s_client(addr: SocketAddr, sni: &str, alpn: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
            "-alpn",
            alpn,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `openssl s_client` limited to TLS 1.2: its report of the handshake.
fn s_client_tls12(addr: SocketAddr, sni: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_2",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// DIR/gateway.toml: the test header with an HTTPS listener too, `a.pem` as the default
/// certificate, no observer, and `extra`.
fn https_base(dir: &Path, extra: &str) -> PathBuf {
    let base = base_config(&dir.join("access.log")).replacen(
        "listen = [\"127.0.0.1:0\"]\n",
        "listen = [\"127.0.0.1:0\"]\nhttps_listen = [\"127.0.0.1:0\"]\n",
        1,
    );
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        base + "[router.tls]\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n[observer]\nmode = \"off\"\n"
            + extra,
    )
    .unwrap();
    path
}

/// DIR/gateway.toml: a plain and an HTTPS listener, the certificate `a.test` and client
/// certificates required from `ca.pem` (`[router.tls]` open for `extra`'s keys first).
fn mtls_config(dir: &Path, extra: &str) -> PathBuf {
    let base = base_config(&dir.join("access.log")).replacen(
        "listen = [\"127.0.0.1:0\"]\n",
        "listen = [\"127.0.0.1:0\"]\nhttps_listen = [\"127.0.0.1:0\"]\n",
        1,
    );
    let cfg = dir.join("gateway.toml");
    let tls =
        "[router.tls]\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\nclient_ca_file = \"ca.pem\"\n";
    std::fs::write(&cfg, base + tls + extra).unwrap();
    cfg
}

fn https_config(dir: &Path, upstream: SocketAddr, ca: &Path) -> PathBuf {
    https_base(
        dir,
        &format!(
            "[[router.tls.certificates]]\nserver_names = [\"b.test\"]\ncert_file = \"b.pem\"\nkey_file = \"b.key\"\n\
             [router.upstream]\nendpoints = [\"{upstream}\"]\n\
             [router.upstream.tls]\nca_file = \"{}\"\nserver_name = \"up.test\"\n",
            ca.display()
        ),
    )
}

#[test]
fn curl_and_openssl_against_the_https_listener_alpn_sni_and_plain_http() {
    let dir = temp_dir("tls-in");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    pki.leaf("b", &["b.test"]);
    let (uc, uk) = pki.leaf("up", &["up.test"]);
    let nginx = Nginx::start(&dir, &uc, &uk);
    let gw = GatewayProcess::spawn(gateway_bin!().run(&https_config(
        &dir,
        nginx.addr,
        &dir.join("ca.pem"),
    )));
    let addr = https_addr(&gw);
    let ca = dir.join("ca.pem");

    let (code, version, text) = curl(addr, &ca, "a.test", "/", &["--http2"]);
    assert_eq!((code, version.as_str()), (200, "2"), "{text}");
    assert!(
        text.contains("tls-upstream proto=https sni=up.test"),
        "{text}"
    );
    let (code, version, _) = curl(addr, &ca, "b.test", "/", &["--http1.1"]);
    assert_eq!((code, version.as_str()), (200, "1.1"));

    let h2 = s_client(addr, "b.test", "h2,http/1.1");
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    assert!(
        h2.contains("CN = b.test"),
        "SNI b.test gets its certificate: {h2}"
    );
    let tls12 = s_client_tls12(addr, "a.test");
    assert!(
        tls12.contains("New, TLSv1.2"),
        "TLS 1.2 is accepted by default: {tls12}"
    );
    let h1 = s_client(addr, "elsewhere.test", "http/1.1");
    assert!(h1.contains("ALPN protocol: http/1.1"), "{h1}");
    assert!(
        h1.contains("CN = a.test"),
        "unknown SNI gets the default: {h1}"
    );

    // The plain listener serves beside the HTTPS one, with X-Forwarded-Proto http.
    assert_ne!(
        gw.addr, addr,
        "listener= and https_listener= are told apart"
    );
    let plain = Command::new("curl")
        .args(["-s", "-i", "--max-time", "5"])
        .arg(format!("http://{}/", gw.addr))
        .output()
        .unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.starts_with("HTTP/1.1 200") && plain.contains("proto=http sni=up.test"),
        "{plain}"
    );
    let plain = Command::new("curl")
        .args(["-s", "-i", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/", addr.port()))
        .output()
        .unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    assert!(plain.contains("this port speaks HTTPS"), "{plain}");

    let metrics = http_get_text(gw.admin, "/metrics");
    for line in [
        "gateway_tls_handshakes_total{side=\"downstream\",result=\"ok\",version=\"TLSv1.3\"}",
        "gateway_tls_handshake_errors_total{side=\"downstream\",reason=\"plain_http\"} 1",
        "gateway_tls_handshakes_total{side=\"upstream\",result=\"ok\"",
        "gateway_tls_certificate_expiry_timestamp_seconds{role=\"server\"",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    // Handshake durations, both sides: one observation per successful handshake.
    let value = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    for side in ["downstream", "upstream"] {
        let ok = value(&format!(
            "gateway_tls_handshakes_total{{side=\"{side}\",result=\"ok\""
        ));
        let timed = value(&format!(
            "gateway_tls_handshake_duration_seconds_count{{side=\"{side}\"}}"
        ));
        // (±1: a warm probe's handshake may land between the counter and the histogram.)
        assert!(
            ok > 0 && timed > 0 && ok.abs_diff(timed) <= 1,
            "{side}: {ok} handshakes, {timed} timed"
        );
    }
}

/// A client that opens a connection to the HTTPS port and stalls its handshake (sends nothing,
/// or a ClientHello cut short) is closed at `[router.downstream] tls_handshake_timeout_ms`,
/// counted by reason, and holds up no other client meanwhile.
#[test]
fn a_stalled_client_handshake_is_closed_at_its_timeout_and_holds_up_no_one() {
    use std::io::{Read as _, Write as _};
    let dir = temp_dir("tls-in-stall");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    pki.leaf("b", &["b.test"]);
    let (uc, uk) = pki.leaf("up", &["up.test"]);
    let nginx = Nginx::start(&dir, &uc, &uk);
    let cfg = https_config(&dir, nginx.addr, &dir.join("ca.pem"));
    let text = std::fs::read_to_string(&cfg).unwrap()
        + "[router.downstream]\ntls_handshake_timeout_ms = 3000\n";
    std::fs::write(&cfg, text).unwrap();
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);
    let ca = dir.join("ca.pem");
    // Long enough that the other client (a curl process, its own handshake) is served within
    // it on a loaded machine too.
    let limit = Duration::from_millis(3000);
    // A TLS record header announcing 512 bytes of handshake, and one byte of it.
    let cut_short: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    for (what, sent) in [("nothing", &[][..]), ("a ClientHello cut short", cut_short)] {
        let t = Instant::now();
        let mut stalled = std::net::TcpStream::connect(addr).unwrap();
        stalled.write_all(sent).unwrap();
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Meanwhile another client is served, on the same (single) worker.
        let (code, _, text) = curl(addr, &ca, "a.test", "/", &[]);
        assert_eq!(code, 200, "{what}: {text}");
        let served = t.elapsed();
        let mut buf = [0u8; 64];
        let end = stalled.read(&mut buf);
        let closed = t.elapsed();
        assert!(
            matches!(end, Ok(0))
                || end
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{what}: the gateway closes the connection: {end:?} after {closed:?}"
        );
        assert!(
            served < closed,
            "{what}: another client was served ({served:?}) before the stalled one was closed"
        );
        assert!(
            closed >= limit * 9 / 10 && closed <= limit + Duration::from_millis(1000),
            "{what}: closed after {closed:?}, the timeout is {limit:?} (-10 %, +1 s)"
        );
    }
    let metrics = http_get_text(gw.admin, "/metrics");
    let line = "gateway_tls_handshake_errors_total{side=\"downstream\",reason=\"timeout\"} 2";
    assert!(metrics.contains(line), "{line} missing:\n{metrics}");
}

/// Waits until `n` stderr lines contain `needle`.
fn wait_for_count(gw: &GatewayProcess, needle: &str, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if gw.count(needle) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn http_get_text(addr: SocketAddr, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_upstream_with_the_wrong_name_or_an_unknown_ca_is_a_documented_502() {
    let dir = temp_dir("tls-out");
    let pki = Pki::new(&dir, "ca");
    let (uc, uk) = pki.leaf("up", &["up.test"]);
    let nginx = Nginx::start(&dir, &uc, &uk);
    let ca = dir.join("ca.pem");
    let cfg = write_config(
        &dir,
        &format!(
            "[clusters.good]\nendpoints = [\"{u}\"]\n[clusters.good.tls]\nca_file = \"{ca}\"\nserver_name = \"up.test\"\n\
             [clusters.mismatch]\nendpoints = [\"{u}\"]\n[clusters.mismatch.tls]\nca_file = \"{ca}\"\nserver_name = \"other.test\"\n\
             [clusters.unknown]\nendpoints = [\"{u}\"]\n[clusters.unknown.tls]\nserver_name = \"up.test\"\n\
             [clusters.unknown.health]\nprobe_interval_ms = 100\n\
             [[routes]]\npath_prefix = \"/\"\ncluster = \"good\"\n\
             [[routes]]\npath_prefix = \"/mismatch\"\ncluster = \"mismatch\"\n\
             [[routes]]\npath_prefix = \"/unknown\"\ncluster = \"unknown\"\n\
             [observer]\nmode = \"off\"\n",
            u = nginx.addr,
            ca = ca.display()
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let plain = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-i", "--max-time", "10"])
            .arg(format!("http://{}{path}", gw.addr))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ok = plain("/");
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("proto=http sni=up.test"),
        "{ok}"
    );
    // Pooled TLS connections are reused like plain ones: one upstream handshake for many (at
    // most one per worker: the idle lists are sharded by worker, and there are two).
    for _ in 0..5 {
        assert!(plain("/").starts_with("HTTP/1.1 200"));
    }
    // The upstream connections the six requests went on (SO_COOKIE, from the access log).
    let deadline = Instant::now() + Duration::from_secs(5);
    let cookies = loop {
        let log = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
        let cookies: Vec<u64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["cluster"] == "good")
            .filter_map(|v| v["cookies"][0].as_u64())
            .collect();
        if cookies.len() >= 6 || Instant::now() >= deadline {
            break cookies;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut distinct = cookies.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(cookies.len(), 6, "six requests logged: {cookies:?}");
    assert!(
        distinct.len() <= 2,
        "6 requests took {} upstream TLS connections: {cookies:?}",
        distinct.len()
    );
    for (path, reason) in [("/mismatch", "name_mismatch"), ("/unknown", "unknown_ca")] {
        let r = plain(path);
        assert!(r.starts_with("HTTP/1.1 502"), "{path}: {r}");
        assert!(r.contains("x-gateway-error: tls_error"), "{r}");
        assert!(r.contains(&format!("failed ({reason})")), "{r}");
        assert!(r.contains("TCP established in"), "{r}");
    }
    let metrics = http_get_text(gw.admin, "/metrics");
    assert!(
        metrics.contains(
            "gateway_tls_handshake_errors_total{side=\"upstream\",reason=\"name_mismatch\"}"
        ),
        "{metrics}"
    );

    // Health: TLS failures on a healthy TCP connection strike as tls_failure, from requests
    // and from probes alike, never as a network failure. The cluster's one endpoint cannot
    // be ejected (max_ejected_percent 50): it turns suspect, and is probed every 100 ms.
    for _ in 0..3 {
        plain("/unknown");
    }
    let unknown_ca = |m: &str| -> u64 {
        m.lines()
            .find_map(|l| {
                l.strip_prefix(
                    "gateway_tls_handshake_errors_total{side=\"upstream\",reason=\"unknown_ca\"} ",
                )
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = unknown_ca(&http_get_text(gw.admin, "/metrics"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while unknown_ca(&http_get_text(gw.admin, "/metrics")) < before + 2 {
        assert!(
            Instant::now() < deadline,
            "no probe of the suspect endpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status: serde_json::Value =
        serde_json::from_str(&http_get_text(gw.admin, "/status")).unwrap();
    let ep = status["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "unknown")
        .map(|c| &c["endpoints"][0])
        .unwrap_or_else(|| panic!("cluster unknown in /status: {status}"));
    assert_eq!(
        (ep["state"].as_str(), ep["reason"].as_str()),
        (Some("suspect"), Some("tls_failure")),
        "after two probes: {ep}"
    );
    // One refused ejection, no flapping: the TCP handshake under each TLS attempt does not
    // bring the endpoint back (only a TCP and TLS handshake, or a response, do).
    let events = ep["recent"].as_array().unwrap();
    let transitions: Vec<_> = events.iter().filter(|e| e["event"] != "failure").collect();
    assert_eq!(transitions.len(), 1, "{ep}");
    assert_eq!(
        (
            transitions[0]["event"].as_str(),
            transitions[0]["reason"].as_str()
        ),
        (Some("ejection_refused"), Some("tls_failure")),
        "only ever a TLS failure: {ep}"
    );
}

/// A cluster of two `host:port` entries on one port: each address is verified by the name it
/// came from. Before, the name was used only when one entry had the port, so
/// `api-1.internal:443` and `api-2.internal:443` were each verified as an IP address and every
/// request failed `name_mismatch` (a black-box audit found it). Here the two entries are two
/// spellings of `localhost`, which every machine resolves, both to 127.0.0.1.
#[test]
fn two_host_entries_on_one_port_are_each_verified_by_their_name() {
    let dir = temp_dir("tls-two-names");
    let pki = Pki::new(&dir, "ca");
    let (uc, uk) = pki.leaf("up", &["localhost"]);
    let nginx = Nginx::start(&dir, &uc, &uk);
    let port = nginx.addr.port();
    let cfg = write_config(
        &dir,
        &format!(
            "[router.upstream]\nendpoints = [\"localhost:{port}\", \"LOCALHOST:{port}\"]\n\
             [router.upstream.tls]\nca_file = \"{ca}\"\n[observer]\nmode = \"off\"\n",
            ca = dir.join("ca.pem").display()
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .arg(format!("http://{}/", gw.addr))
        .output()
        .unwrap();
    let r = String::from_utf8_lossy(&out.stdout);
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("sni=localhost"),
        "{r}"
    );
}

#[test]
fn a_stalled_tls_upstream_is_a_504_tls_handshake_timeout_on_time_with_kernel_evidence_privileged() {
    // Accepts TCP (the kernel completes the handshake and ACKs the ClientHello) and never
    // answers: the listener is never accepted from.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = silent.local_addr().unwrap();
    let dir = temp_dir("tls-stall");
    let cfg = write_config(
        &dir,
        &format!(
            "[router.upstream]\nendpoints = [\"{up}\"]\n[router.upstream.tls]\ninsecure_skip_verify = true\n\
             [router.upstream.timeouts]\ntls_handshake_timeout_ms = 800\n\
             [router.upstream.retry]\nmax_retries = 0\n[observer]\nmode = \"kernel\"\n"
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let t = Instant::now();
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .arg(format!("http://{}/", gw.addr))
        .output()
        .unwrap();
    let took = t.elapsed();
    let r = String::from_utf8_lossy(&out.stdout);
    assert!(r.starts_with("HTTP/1.1 504"), "{r}");
    assert!(r.contains("x-gateway-error: tls_handshake_timeout"), "{r}");
    assert!(
        took >= Duration::from_millis(720) && took <= Duration::from_millis(800 + 1000),
        "800 ms, -10 % and at most 1 s late (curl's own start-up, a loaded machine): took {took:?}"
    );
    assert!(r.contains("got no ServerHello within 800 ms"), "{r}");
    assert!(
        r.contains("(kernel)"),
        "the kernel measured the TCP handshake: {r}"
    );
    let ev = r
        .lines()
        .find(|l| l.starts_with("x-gateway-evidence:"))
        .unwrap_or_else(|| panic!("kernel evidence header: {r}"));
    assert!(
        ev.contains("server_bytes=0") && ev.contains("rtos=0"),
        "{ev}"
    );
    let acked: u64 = ev
        .split_whitespace()
        .find_map(|w| w.strip_prefix("client_bytes_acked="))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        acked > 0,
        "the upstream's kernel ACKed the ClientHello: {ev}"
    );
    drop(silent);
}

#[test]
fn certificates_reload_on_sighup_under_load_with_no_failed_request() {
    let dir = temp_dir("tls-reload");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    pki.leaf("b", &["b.test"]);
    let (uc, uk) = pki.leaf("up", &["up.test"]);
    let nginx = Nginx::start(&dir, &uc, &uk);
    let gw = GatewayProcess::spawn(gateway_bin!().run(&https_config(
        &dir,
        nginx.addr,
        &dir.join("ca.pem"),
    )));
    let addr = https_addr(&gw);
    let ca = dir.join("ca.pem");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..3)
        .map(|i| {
            let (stop, ok, failed, ca) = (stop.clone(), ok.clone(), failed.clone(), ca.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Ten requests on one keep-alive connection, then a new connection.
                    let mut args: Vec<String> =
                        ["-s", "-o", "/dev/null", "--max-time", "10", "--cacert"]
                            .map(String::from)
                            .to_vec();
                    args.push(ca.display().to_string());
                    args.push("--resolve".into());
                    args.push(format!("a.test:{}:127.0.0.1", addr.port()));
                    if i == 0 {
                        args.push("--http1.1".into());
                    }
                    for _ in 0..10 {
                        args.push("-w".into());
                        args.push("%{http_code}\n".into());
                        args.push(format!("https://a.test:{}/", addr.port()));
                    }
                    let out = Command::new("curl").args(&args).output().unwrap();
                    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
                    let good = codes.lines().filter(|c| *c == "200").count();
                    ok.fetch_add(good, Ordering::Relaxed);
                    failed.fetch_add(10 - good, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Until the load has been served this many more requests (by progress, not by the clock:
    // a loaded machine runs the curl processes slower).
    let served_more = |n: usize| {
        let (from, deadline) = (
            ok.load(Ordering::Relaxed),
            Instant::now() + Duration::from_secs(20),
        );
        while ok.load(Ordering::Relaxed) < from + n {
            assert!(
                Instant::now() < deadline,
                "the load stalled: {} more served",
                ok.load(Ordering::Relaxed) - from
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    served_more(30);
    for round in 0..3 {
        // A new certificate for a.test, with a serial-distinct subject alternative.
        pki.leaf("a", &["a.test", &format!("round{round}.a.test")]);
        gw.signal(libc::SIGHUP);
        assert!(
            wait_for_count(&gw, "config reloaded", round + 1),
            "reload {round}"
        );
        served_more(30);
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "load ran: {ok} requests");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across 3 reloads",
        ok + failed
    );
    let served = s_client(addr, "a.test", "http/1.1");
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            let pem = served
                .split("-----BEGIN CERTIFICATE-----")
                .nth(1)
                .and_then(|s| s.split("-----END CERTIFICATE-----").next())
                .unwrap_or("");
            c.stdin.take().unwrap().write_all(
                format!("-----BEGIN CERTIFICATE-----{pem}-----END CERTIFICATE-----\n").as_bytes(),
            )?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("round2.a.test"),
        "the last certificate serves new connections: {text}"
    );
    // A bad certificate is refused and the running one kept.
    std::fs::write(dir.join("a.pem"), "not a certificate\n").unwrap();
    gw.signal(libc::SIGHUP);
    gw.expect_log("reload refused", Duration::from_secs(5));
    let (code, _, _) = curl(addr, &ca, "a.test", "/", &[]);
    assert_eq!(code, 200, "the running certificate still serves");
}

/// A session resumes across a SIGHUP: the tickets' keys and the session cache carry over to
/// the reloaded config. Before, every reload made each client's next connection a full
/// handshake (a black-box audit found it). openssl `s_client -sess_out` / `-sess_in`, TLS 1.2
/// (a session id or a ticket) and TLS 1.3 (a ticket).
#[test]
fn sessions_resume_across_a_sighup() {
    let dir = temp_dir("tls-resume");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    // Handshakes only: no request reaches this endpoint.
    let cfg = https_base(&dir, "[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n");
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);
    // s_client's input is held open until the session is in: `-sess_out` writes its file when
    // a session arrives (a TLS 1.3 ticket comes after the handshake), and a resumption is
    // reported with the handshake. At most 5 s.
    let s_client = |args: &[&str], sess: &Path, resume: bool| {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                "a.test",
            ])
            .args(args)
            .arg(if resume { "-sess_in" } else { "-sess_out" })
            .arg(sess)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                if line.contains("Verify return code") {
                    let _ = tx.send(());
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let _ = rx.recv_timeout(Duration::from_secs(5));
        while !resume && !sess.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(child.stdin.take());
        let _ = child.wait();
        reader.join().unwrap()
    };
    let mut reloads = 0;
    // TLS 1.2 by ticket and by session id (the session cache), TLS 1.3 by ticket.
    for (name, args) in [
        ("TLS 1.2, ticket", &["-tls1_2"][..]),
        ("TLS 1.2, session id", &["-tls1_2", "-no_ticket"][..]),
        ("TLS 1.3, ticket", &["-tls1_3"][..]),
    ] {
        let sess = dir.join(format!("session-{reloads}.pem"));
        let first = s_client(args, &sess, false);
        assert!(first.contains("New, TLSv1."), "{name}: {first}");
        let again = s_client(args, &sess, true);
        assert!(
            again.contains("Reused, TLSv1."),
            "{name}, before a SIGHUP: {again}"
        );
        gw.signal(libc::SIGHUP);
        reloads += 1;
        assert!(
            wait_for_count(&gw, "config reloaded", reloads),
            "{name}: reload {reloads}"
        );
        let after = s_client(args, &sess, true);
        assert!(
            after.contains("Reused, TLSv1."),
            "{name}, after a SIGHUP: {after}"
        );
    }
}

/// Client certificates both ways: the HTTPS listener with `client_ca_file` refuses a client
/// without a certificate from that CA and serves one with it; a cluster with `cert_file` /
/// `key_file` presents its certificate to an upstream that requires one (nginx
/// `ssl_verify_client on`), and a cluster without them is refused by that upstream.
#[test]
fn client_certificates_both_ways_mtls() {
    let dir = temp_dir("tls-mtls");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let (uc, uk) = pki.leaf("up", &["up.test"]);
    let (cc, ck) = pki.leaf("client", &["client.test"]);
    let ca = dir.join("ca.pem");
    let nginx = Nginx::start_with(
        &dir,
        &uc,
        &uk,
        &format!(
            "ssl_verify_client on; ssl_client_certificate {};",
            ca.display()
        ),
    );
    let cfg = mtls_config(
        &dir,
        &format!(
            "[clusters.withcert]\nendpoints = [\"{u}\"]\n[clusters.withcert.tls]\nca_file = \"ca.pem\"\n\
             server_name = \"up.test\"\ncert_file = \"{c}\"\nkey_file = \"{k}\"\n\
             [clusters.nocert]\nendpoints = [\"{u}\"]\n[clusters.nocert.tls]\nca_file = \"ca.pem\"\n\
             server_name = \"up.test\"\n\
             [[routes]]\npath_prefix = \"/\"\ncluster = \"withcert\"\n\
             [[routes]]\npath_prefix = \"/nocert\"\ncluster = \"nocert\"\n\
             [observer]\nmode = \"off\"\n",
            u = nginx.addr,
            c = cc.display(),
            k = ck.display(),
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);

    let (code, _, text) = curl(addr, &ca, "a.test", "/", &[]);
    assert_eq!(
        code, 0,
        "no client certificate: the handshake fails: {text}"
    );
    let (code, _, text) = curl(
        addr,
        &ca,
        "a.test",
        "/",
        &[
            "--cert",
            &cc.display().to_string(),
            "--key",
            &ck.display().to_string(),
        ],
    );
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("proto=https sni=up.test client=CN=client.test"),
        "the upstream saw the gateway's client certificate: {text}"
    );
    let with_cert = [
        "--cert".to_owned(),
        cc.display().to_string(),
        "--key".to_owned(),
        ck.display().to_string(),
    ];
    let with_cert: Vec<&str> = with_cert.iter().map(String::as_str).collect();
    let (code, _, text) = curl(addr, &ca, "a.test", "/nocert", &with_cert);
    assert_eq!(
        code, 400,
        "nginx refuses a cluster without a client certificate: {text}"
    );
    let metrics = http_get_text(gw.admin, "/metrics");
    let refused: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("gateway_tls_handshake_errors_total{side=\"downstream\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        refused >= 1,
        "the client without a certificate is counted:\n{metrics}"
    );
}

/// With only `[[router.tls.certificates]]` (no default certificate) and `min_version = "1.3"`
/// (a TLS 1.2 client is refused), a client naming another
/// host fails its handshake, counted as `unknown_sni`, and the listener goes on serving; and
/// `gateway_host = "*.example.test"` serves requests for those hosts only (others 404), on
/// either listener.
#[test]
fn unknown_sni_without_a_default_fails_the_handshake_and_gateway_host_filters_hosts() {
    let dir = temp_dir("tls-unknown-sni");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.example.test", "b.example.test"]);
    let (uc, uk) = pki.leaf("up", &["up.test"]);
    let nginx = Nginx::start(&dir, &uc, &uk);
    let ca = dir.join("ca.pem");
    let base = base_config(&dir.join("access.log")).replacen(
        "listen = [\"127.0.0.1:0\"]\n",
        "listen = [\"127.0.0.1:0\"]\nhttps_listen = [\"127.0.0.1:0\"]\ngateway_host = \"*.example.test\"\n",
        1,
    );
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        base + &format!(
            "[router.tls]\nmin_version = \"1.3\"\n\
             [[router.tls.certificates]]\nserver_names = [\"a.example.test\", \"b.example.test\"]\n\
             cert_file = \"a.pem\"\nkey_file = \"a.key\"\n\
             [router.upstream]\nendpoints = [\"{}\"]\n\
             [router.upstream.tls]\nca_file = \"ca.pem\"\nserver_name = \"up.test\"\n\
             [observer]\nmode = \"off\"\n",
            nginx.addr
        ),
    )
    .unwrap();
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);

    let (code, _, text) = curl(addr, &ca, "other.test", "/", &["-k"]);
    assert_eq!(code, 0, "no certificate for other.test: {text}");
    let out = s_client(addr, "a.example.test", "http/1.1");
    assert!(out.contains("CN = a.example.test"), "{out}");
    let tls12 = s_client_tls12(addr, "a.example.test");
    assert!(
        !tls12.contains("New, TLSv1.2"),
        "min_version = \"1.3\" refuses TLS 1.2: {tls12}"
    );
    for (host, want) in [("a.example.test", 200), ("b.example.test", 200)] {
        let (code, _, text) = curl(addr, &ca, host, "/", &[]);
        assert_eq!(code, want, "{host}: {text}");
    }
    // On the plain listener, by Host header.
    for (host, want) in [
        ("a.example.test", "200"),
        ("example.test", "404"),
        ("other.test", "404"),
    ] {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .args(["-H", &format!("Host: {host}")])
            .arg(format!("http://{}/", gw.addr))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "Host: {host}");
    }
    let metrics = http_get_text(gw.admin, "/metrics");
    let line = "gateway_tls_handshake_errors_total{side=\"downstream\",reason=\"unknown_sni\"} 1";
    assert!(metrics.contains(line), "{line} missing:\n{metrics}");
}

/// An upgraded HTTPS connection (a WebSocket over TLS, opened by `openssl s_client`) keeps its
/// place in `max_client_connections` while its tunnel is open: hyper's connection has ended by
/// then, and the tunnel holds the TLS stream. A second client is turned away (on the plain
/// listener: the limit is process-wide) until the tunnel ends.
#[test]
fn an_upgraded_https_connection_keeps_its_place_in_max_client_connections() {
    use std::io::{BufRead as _, BufReader, Write as _};

    use gateway_testkit::peers::{WS_ECHO_SERVER, serve_python};

    let dir = temp_dir("tls-upgrade");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let ws = serve_python(&dir, "ws_server.py", WS_ECHO_SERVER, &[]);
    let cfg = https_base(
        &dir,
        &format!(
            "[router.downstream]\nmax_client_connections = 1\n\
             [router.upstream]\nendpoints = [\"{}\"]\n",
            ws.addr()
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);
    let mut client = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &addr.to_string()])
        .args(["-servername", "a.test", "-alpn", "http/1.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    let mut stdin = client.stdin.take().unwrap();
    stdin
        .write_all(
            b"GET /ws HTTP/1.1\r\nhost: a.test\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        )
        .unwrap();
    let mut status = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut status)
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status:?}");
    let open = |m: &str| -> Option<f64> {
        m.lines()
            .find_map(|l| l.strip_prefix("gateway_client_connections "))
            .and_then(|v| v.trim().parse().ok())
    };
    let metrics = http_get_text(gw.admin, "/metrics");
    assert_eq!(open(&metrics), Some(1.0), "{metrics}");
    let second = http_get_text(gw.addr, "/");
    assert!(
        second.starts_with("503 Service Unavailable") && second.contains("max_client_connections"),
        "the tunnel holds the only place: {second}"
    );
    // The client closes: the tunnel ends and its place is free again.
    drop(stdin);
    let _ = client.kill();
    let _ = client.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while open(&http_get_text(gw.admin, "/metrics")) != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the tunnel's place was not freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that completes the TLS handshake and then sends nothing, or only part of the
/// HTTP/2 preface, is closed at the header-read timeout (hyper has no timer while it waits to
/// tell HTTP/1 from HTTP/2), so it holds no place until the gateway stops. `openssl s_client`
/// is the client; its exit is the close.
#[test]
fn a_client_silent_after_the_handshake_is_closed_at_the_header_read_timeout() {
    use std::io::Write as _;

    const TIMEOUT: Duration = Duration::from_millis(500);
    let dir = temp_dir("tls-silent");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let cfg = https_base(
        &dir,
        &format!(
            "[router.downstream]\nheader_read_timeout_ms = {}\n\
             [router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n",
            TIMEOUT.as_millis()
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);
    for (what, alpn, send) in [
        ("nothing", "http/1.1", &b""[..]),
        (
            "part of the HTTP/2 preface",
            "h2",
            &b"PRI * HTTP/2.0\r\n"[..],
        ),
    ] {
        let start = Instant::now();
        let mut client = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", &addr.to_string()])
            .args(["-servername", "a.test", "-alpn", alpn])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl");
        let mut stdin = client.stdin.take().unwrap();
        stdin.write_all(send).unwrap();
        stdin.flush().unwrap();
        let deadline = start + TIMEOUT * 10;
        let closed = loop {
            if client.try_wait().unwrap().is_some() {
                break Some(start.elapsed());
            }
            if Instant::now() > deadline {
                let _ = client.kill();
                let _ = client.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = closed.unwrap_or_else(|| {
            panic!("a client that sent {what} after its handshake was still open after 5 s")
        });
        assert!(
            took >= TIMEOUT && took < TIMEOUT * 3,
            "a client that sent {what} was closed after {took:?}; the timeout is {TIMEOUT:?}"
        );
        drop(stdin);
    }
}

/// HTTP/2 rapid reset over HTTPS (ALPN `h2`), the listener such clients reach in production:
/// Python's `h2` opens 5,000 streams in batches of 50 and resets each batch 30 ms later; the
/// connection is closed once half of its first 500 streams were reset early, and counted
/// (`security_http2.rs` has the plain listener, a client that is not closed, and why the
/// bound is 500 streams rather than the 300 of an idle machine).
#[test]
fn an_https_http2_client_that_resets_its_streams_early_is_closed() {
    let (_rt, up, dir, gw) = https_before_upstream("tls-rapid-reset");
    let port = https_addr(&gw).port().to_string();
    let out = gateway_testkit::peers::run_python(
        &dir,
        "rapid_reset.py",
        gateway_testkit::peers::H2_RESET_CLIENT,
        &["127.0.0.1", &port, "5000", "50", "0.03", "1", "a.test"],
        Duration::from_secs(60),
    );
    let opened = out["opened"].as_u64().unwrap();
    assert!(
        out["ended"].is_string() && opened <= 500,
        "the connection was not closed in time: {out}"
    );
    let metrics = http_get_text(gw.admin, "/metrics");
    assert!(
        metrics.contains("gateway_client_http2_reset_floods_total 1"),
        "{out}\n{metrics}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(up.hits() <= 500, "{} requests upstream: {out}", up.hits());
}

/// HTTP/2 over TLS needs ALPN (RFC 9113 section 3.2). A client that sends the HTTP/2 preface
/// on an HTTPS connection where ALPN did not choose `h2` was served HTTP/2 all the same, with
/// none of the limits of a connection known to speak it (rapid reset, the stream watchdog):
/// each such request is a 400 now, and nothing reaches the upstream. Python's `h2` over `ssl`
/// without ALPN.
#[test]
fn http2_without_alpn_on_an_https_connection_is_not_served() {
    const CLIENT: &str = r#"
import json, socket, ssl, sys
import h2.config, h2.connection, h2.events
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="a.test")
s.settimeout(5)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
c.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "a.test"), (":path", "/")], end_stream=True)
s.sendall(c.data_to_send())
got = b""
try:
    while len(got) < 65536:
        d = s.recv(65536)
        if not d:
            break
        got += d
except (OSError, ssl.SSLError):
    pass
status = None
try:
    for e in c.receive_data(got):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
except Exception:
    pass
print(json.dumps({"status": status}))
"#;
    let (_rt, up, dir, gw) = https_before_upstream("tls-no-alpn");
    let port = https_addr(&gw).port().to_string();
    let out = gateway_testkit::peers::run_python(
        &dir,
        "no_alpn.py",
        CLIENT,
        &[&port],
        Duration::from_secs(30),
    );
    assert_eq!(out["status"], "400", "{out}");
    assert_eq!(up.hits(), 0, "{out}");
}

/// A request hyper refuses on an HTTPS connection (101 header fields, sent by curl over
/// HTTP/1.1; over HTTP/2 the gateway's own check answers) is
/// logged with its TLS version, as on a plain one (`proxy_limits`).
#[test]
fn a_request_refused_by_the_parser_over_https_is_logged() {
    let (_rt, up, dir, gw) = https_before_upstream("tls-parser");
    let addr = https_addr(&gw);
    let mut headers: Vec<String> = vec!["--http1.1".into()];
    headers.extend((0..101).flat_map(|i| ["-H".into(), format!("x-{i}: 1")]));
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let (code, _, text) = curl(addr, &dir.join("ca.pem"), "a.test", "/", &headers);
    assert_eq!(code, 431, "{text}");
    assert_eq!(up.hits(), 0);
    let log = dir.join("access.log");
    let line = wait_for_line(&log, "\"status\":431");
    let l: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(l["error"], "request_headers_too_large", "{l}");
    assert_eq!(l["path"], "-", "{l}");
    assert!(
        l["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1.")),
        "{l}"
    );
}

/// The first line of the file at `path` that contains `needle`, or panics after 5 s.
fn wait_for_line(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return l.to_owned();
        }
        assert!(Instant::now() < deadline, "no line with {needle} in {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTPS client that stops reading (curl writing the body into a pipe this test never
/// reads) is closed at the write timeout, and the response is cut short by
/// `client_write_timeout`: the stall comes up through TLS as it does on plain HTTP/1.
#[test]
fn an_https_client_that_stops_reading_is_cut_short_by_the_write_timeout() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(gateway_testkit::upstream::Upstream::start(
        "tls-stops-reading",
    ));
    let dir = temp_dir("tls-stops-reading");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let cfg = https_base(
        &dir,
        &format!(
            "[router.downstream]\nwrite_timeout_ms = 600\n[router.upstream]\nendpoints = [\"{}\"]\n",
            up.addr
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);
    let mut reader = Command::new("curl")
        .args(["-sS", "--http1.1", "--cacert"])
        .arg(dir.join("ca.pem"))
        .arg("--resolve")
        .arg(format!("a.test:{}:{}", addr.port(), addr.ip()))
        .arg(format!("https://a.test:{}/bytes/200000000", addr.port()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl");
    let log = std::panic::catch_unwind(|| {
        gateway_testkit::inprocess::log_lines(&dir.join("access.log"), 1)
    });
    let _ = reader.kill();
    let _ = reader.wait();
    let l = &log.expect("the response is logged once the gateway gives up on the client")[0];
    assert_eq!(
        (&l["status"], &l["aborted"], &l["incomplete"], &l["tls"]),
        (
            &serde_json::json!(200),
            &serde_json::json!(true),
            &serde_json::json!("client_write_timeout"),
            &serde_json::json!("TLSv1.3")
        ),
        "{l}"
    );
}

/// A testkit upstream (on a runtime of its own, returned to keep it serving) behind the
/// gateway's HTTPS listener, with the certificate `a.test` (`https_base`).
fn https_before_upstream(
    label: &str,
) -> (
    tokio::runtime::Runtime,
    gateway_testkit::upstream::Upstream,
    PathBuf,
    GatewayProcess,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(gateway_testkit::upstream::Upstream::start(label));
    let dir = temp_dir(label);
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let cfg = https_base(
        &dir,
        &format!("[router.upstream]\nendpoints = [\"{}\"]\n", up.addr),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    (rt, up, dir, gw)
}

/// curl over plain HTTP to the gateway at `plain`, as `a.example.test` (and `https` for the
/// name too, so that a redirect followed with `-L` reaches the HTTPS listener): the answer
/// with its headers, and the status of the last response.
fn curl_plain(
    plain: SocketAddr,
    https: SocketAddr,
    ca: &Path,
    path: &str,
    extra: &[&str],
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-i", "--max-time", "10", "--cacert"]).arg(ca);
    for a in [plain, https] {
        c.arg("--resolve")
            .arg(format!("a.example.test:{}:{}", a.port(), a.ip()));
    }
    let out = c
        .args(extra)
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://a.example.test:{}{path}", plain.port()))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text
        .lines()
        .last()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// `https_redirect`: plain HTTP is answered with the same URL on the HTTPS listener (`301`,
/// `308` for a POST), which curl follows to the upstream; a route with `https_redirect = false`
/// (an ACME HTTP-01 challenge path) stays on plain HTTP; a trusted proxy that says
/// `X-Forwarded-Proto: https` is not redirected (it terminated TLS), one that says `http` is.
#[test]
fn plain_http_is_redirected_to_https_but_where_a_route_or_a_trusted_proxy_says_not() {
    let dir = temp_dir("tls-redirect");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.example.test"]);
    let (uc, uk) = pki.leaf("up", &["up.test"]);
    let nginx = Nginx::start(&dir, &uc, &uk);
    let ca = dir.join("ca.pem");
    let cfg = https_base(
        &dir,
        &format!(
            "[router.upstream]\nendpoints = [\"{}\"]\n\
             [router.upstream.tls]\nca_file = \"ca.pem\"\nserver_name = \"up.test\"\n\
             [[routes]]\ncluster = \"default\"\n\
             [[routes]]\npath_prefix = \"/.well-known/acme-challenge/\"\ncluster = \"default\"\nhttps_redirect = false\n",
            nginx.addr
        ),
    );
    // A port of its own (not 0): the redirect names the HTTPS listener's configured port.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen("[router]\n", "[router]\nhttps_redirect = true\n", 1)
        .replacen(
            "https_listen = [\"127.0.0.1:0\"]",
            &format!("https_listen = [\"127.0.0.1:{}\"]", free_port()),
            1,
        )
        + "[router.forwarded]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    std::fs::write(&cfg, text).unwrap();
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let https = https_addr(&gw);
    let to = format!("https://a.example.test:{}/a/b?q=1", https.port());

    let (code, text) = curl_plain(gw.addr, https, &ca, "/a/b?q=1", &[]);
    assert_eq!(code, 301, "{text}");
    assert!(text.contains(&format!("location: {to}\r\n")), "{text}");
    let (code, text) = curl_plain(gw.addr, https, &ca, "/a/b?q=1", &["-d", "x=1"]);
    assert_eq!(code, 308, "a POST keeps its method: {text}");
    assert!(text.contains(&format!("location: {to}\r\n")), "{text}");
    // curl follows it to the HTTPS listener, and the upstream hears that it came over HTTPS.
    let (code, text) = curl_plain(gw.addr, https, &ca, "/a/b?q=1", &["-L"]);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("tls-upstream proto=https"), "{text}");
    // An ACME challenge stays on plain HTTP.
    let (code, text) = curl_plain(gw.addr, https, &ca, "/.well-known/acme-challenge/t", &[]);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("tls-upstream proto=http "), "{text}");
    // A trusted proxy in front that terminated TLS is believed; one that did not, redirected.
    let (code, text) = curl_plain(
        gw.addr,
        https,
        &ca,
        "/x",
        &["-H", "X-Forwarded-Proto: https"],
    );
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("tls-upstream proto=https"), "{text}");
    let (code, _) = curl_plain(
        gw.addr,
        https,
        &ca,
        "/x",
        &["-H", "X-Forwarded-Proto: http"],
    );
    assert_eq!(code, 301);

    let line = wait_for_line(&dir.join("access.log"), "\"status\":308");
    let l: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(l["route"], "*/", "{l}");
    assert_eq!(l["attempts"], 0, "nothing was sent upstream: {l}");
}

/// `forward_client_cert = true`: the upstream is told which certificate the client showed, as
/// Envoy's `X-Forwarded-Client-Cert` (curl with a client certificate, over HTTP/2 and
/// HTTP/1.1; the hash checked against openssl's), and a client's own
/// `X-Forwarded-Client-Cert` never reaches it, over either listener.
#[test]
fn the_client_certificate_goes_upstream_as_x_forwarded_client_cert() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(gateway_testkit::upstream::Upstream::start("xfcc"));
    let sec = rt.block_on(gateway_testkit::upstream::Upstream::start("sec"));
    let dir = temp_dir("tls-xfcc");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let (cc, ck) = pki.leaf("client", &["client.test"]);
    let cfg = mtls_config(
        &dir,
        &format!(
            "forward_client_cert = true\n[router.upstream]\nendpoints = [\"{}\"]\n\
             [clusters.sec]\nendpoints = [\"{}\"]\n\
             [[routes]]\npath_prefix = \"/sec/\"\ncluster = \"sec\"\n\
             headers = [{{ name = \"x-forwarded-client-cert\", present = true }}]\n\
             [[routes]]\ncluster = \"default\"\n[observer]\nmode = \"off\"\n",
            up.addr, sec.addr
        ),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);

    let der = dir.join("client.der");
    let out = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&cc)
        .arg("-out")
        .arg(&der)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .arg(&der)
        .output()
        .expect("openssl");
    let hash = String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(hash.len(), 64, "{out:?}");
    let want =
        format!("x-forwarded-client-cert: Hash={hash};Subject=\"CN=client.test\";DNS=client.test");
    let (cc, ck) = (cc.display().to_string(), ck.display().to_string());
    for version in ["--http2", "--http1.1"] {
        let (code, got_version, text) = curl(
            addr,
            &dir.join("ca.pem"),
            "a.test",
            "/headers",
            &[
                version,
                "--cert",
                &cc,
                "--key",
                &ck,
                "-H",
                "X-Forwarded-Client-Cert: Hash=00;Subject=\"CN=admin\"",
            ],
        );
        assert_eq!(code, 200, "{text}");
        assert_eq!(got_version, if version == "--http2" { "2" } else { "1.1" });
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("x-forwarded-client-cert:"))
            .collect();
        assert_eq!(lines, [want.as_str()], "{version}: {text}");
    }
    // A route for clients with a certificate: an mTLS client reaches it.
    let (code, _, text) = curl(
        addr,
        &dir.join("ca.pem"),
        "a.test",
        "/sec/x",
        &["--cert", &cc, "--key", &ck],
    );
    assert_eq!((code, sec.hits()), (200, 1), "{text}");
    // Over the plain listener, a client that names a certificate is not believed, by the
    // routes either.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg("X-Forwarded-Client-Cert: Hash=00")
        .arg(format!("http://{}/sec/x", gw.addr))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(
        sec.hits(),
        1,
        "a forged header reached the route of certified clients"
    );
    for forged in ["X-Forwarded-Client-Cert", "X_Forwarded_Client_Cert"] {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "-H"])
            .arg(format!("{forged}: Hash=00;URI=spiffe://admin"))
            .arg(format!("http://{}/headers", gw.addr))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("x-request-id: "), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("client_cert")
                && !text.to_ascii_lowercase().contains("client-cert"),
            "{forged} reached the upstream: {text}"
        );
    }
}

/// An HTTPS client still sending its body after the gateway answered early (its own `413`,
/// past `max_request_body_bytes`) is not reset: the connection lingers under TLS as a plain
/// one does (`proxy_early_response`), so the client's writes keep succeeding, and it reads the
/// answer and a clean end. Closed at once with bytes unread, the client's first write after
/// the answer failed.
#[test]
fn an_https_client_still_sending_after_an_early_answer_is_not_reset() {
    let dir = temp_dir("tls-linger");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let cfg = https_base(
        &dir,
        "[router.downstream]\nmax_request_body_bytes = 1000\nmax_request_header_bytes = 4096\n\
         [router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n",
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = gateway_testkit::http::upload_start();
    let head = rt.block_on(async {
        let mut s = tls_connect(&dir, addr).await;
        gateway_testkit::http::keep_sending_after_an_early_answer(&mut s, &start).await
    });
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // A first request whose head is too large: hyper answers `431` itself, before any request
    // told the connection speaks HTTP/1, and the rest of the head is still coming.
    let mut start = b"GET / HTTP/1.1\r\nhost: a.test\r\nx-big: ".to_vec();
    start.extend_from_slice(&[b'a'; 65536]);
    let head = rt.block_on(async {
        let mut s = tls_connect(&dir, addr).await;
        gateway_testkit::http::keep_sending_after_an_early_answer(&mut s, &start).await
    });
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

/// A rustls client of the gateway's HTTPS listener at `addr`, trusting DIR/ca.pem, for
/// `a.test` with ALPN `http/1.1`.
async fn tls_connect(
    dir: &Path,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .expect("the TLS handshake")
}

/// An upgraded HTTPS connection is the tunnel's: the lingering close that follows an HTTP/1
/// connection hyper ended must not touch its socket. The upgrade request has a body (a reason
/// to linger), and the client sends bytes for the tunnel right after it; they and the next
/// ones come back through a raw echo upstream. Lingering on it shut the tunnel's way back
/// down.
#[test]
fn an_upgraded_https_connection_is_not_lingered_on() {
    use tokio::io::AsyncWriteExt as _;

    let dir = temp_dir("tls-upgrade-linger");
    let pki = Pki::new(&dir, "ca");
    pki.leaf("a", &["a.test"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Answers the upgrade with `101`, then echoes.
    let echo = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let up = echo.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut rest = Vec::new();
                if gateway_testkit::http::read_message(&mut s, &mut rest)
                    .await
                    .is_none()
                {
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                          connection: upgrade\r\n\r\n",
                    )
                    .await;
                let _ = s.write_all(&rest).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let cfg = https_base(
        &dir,
        &format!("[router.upstream]\nendpoints = [\"{up}\"]\n"),
    );
    let gw = GatewayProcess::spawn(gateway_bin!().run(&cfg));
    let addr = https_addr(&gw);
    rt.block_on(async {
        let mut s = tls_connect(&dir, addr).await;
        s.write_all(
            b"GET /ws HTTP/1.1\r\nhost: a.test\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\
              content-length: 5\r\n\r\nhello",
        )
        .await
        .unwrap();
        s.flush().await.unwrap();
        // Bytes for the tunnel, in a write of their own: they reach the socket after hyper
        // read the request.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        s.write_all(b"first").await.unwrap();
        s.flush().await.unwrap();
        let got = read_until(&mut s, b"first").await;
        assert!(
            got.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        // Still both ways, after the moment a linger would have begun.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        s.write_all(b"second").await.unwrap();
        s.flush().await.unwrap();
        read_until(&mut s, b"second").await;
    });
}

/// What `s` gives until `needle` has come (within 5 s; panics if the stream ends first).
async fn read_until<S: tokio::io::AsyncRead + Unpin>(s: &mut S, needle: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;

    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("within 5 s")
            .unwrap();
        assert!(n > 0, "the tunnel ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}
