//! `retry.status_codes` end to end, with nginx as the upstreams (one of three answering every
//! request with its own `503` page) and curl as the client:
//!
//! - a GET that met the `503` is sent to another endpoint, and the client sees only `200`s;
//!   the access log says `http_503` for the attempt given up;
//! - a POST is never sent again for its status: the client gets nginx's `503` as it came,
//!   and nginx saw each POST once;
//! - a route's `status_codes = []` turns it off for that route;
//! - when every attempt is answered `503` (one endpoint), the client gets the last answer,
//!   nginx's page, after `max_retries`, not an error of the gateway's;
//! - the given-up responses' bodies are read, so their HTTP/1.1 connections are reused, and
//!   an HTTP/2 upstream's connection serves every attempt;
//! - `health.error_statuses_to_eject`: the endpoint answering `503` is ejected after 5 in a
//!   row (`/status`, the metric), kept out while its probe's `GET` is answered `503`, and back
//!   once nginx, reloaded, answers `200`.
//!
//! Unprivileged: loopback only; nginx is Debian's (installed by `./dev`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{endpoint, metrics, sample, status},
    http::{client, get},
    inprocess::{gateway, log_lines},
    peers::{NginxProcess, nginx_h2c, nginx_listening},
    ports::free_port,
    tempdir::temp_dir,
};

/// nginx on three loopback ports: the first answers `503` (nginx's own error page), the
/// others `200`. Its access log is `port connection connection_requests method status`.
struct Pool {
    addrs: Vec<SocketAddr>,
    log: PathBuf,
    dir: PathBuf,
    _process: NginxProcess,
}

const DOWN: &str = "return 503;";
const UP: &str = "return 200 \"ok\\n\";";

/// nginx's config for `ports`, the first answering with `first`.
fn nginx_conf(dir: &Path, ports: &[u16], first: &str) -> PathBuf {
    let server = |port: u16, answer: &str| {
        format!(" server {{ listen 127.0.0.1:{port}; location / {{ {answer} }} }}\n")
    };
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n\
             log_format p '$server_port $connection $connection_requests $request_method $status';\n\
             access_log {d}/nginx-access.log p;\n{}{}{}}}\n",
            server(ports[0], first),
            server(ports[1], UP),
            server(ports[2], UP),
            d = dir.display(),
        ),
    )
    .unwrap();
    conf
}

impl Pool {
    /// The first endpoint answers `200` from now on: nginx reloads its config (SIGHUP).
    fn heal(&self) {
        let ports: Vec<u16> = self.addrs.iter().map(|a| a.port()).collect();
        nginx_conf(&self.dir, &ports, UP);
        let pid = std::fs::read_to_string(self.dir.join("nginx.pid")).unwrap();
        let pid: libc::pid_t = pid.trim().parse().unwrap();
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }
}

fn pool(dir: &Path) -> Pool {
    let ports = [free_port(), free_port(), free_port()];
    let conf = nginx_conf(dir, &ports, DOWN);
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let process = nginx_listening(dir, &conf, &addrs);
    Pool {
        addrs,
        log: dir.join("nginx-access.log"),
        dir: dir.to_owned(),
        _process: process,
    }
}

/// curl: `n` requests (`method`) to `url` on one connection; each one's status.
fn curl(url: &str, method: &str, n: usize) -> Vec<String> {
    let mut c = Command::new("curl");
    c.args(["-s", "-X", method, "-H", "Host: test.local"]);
    if method == "POST" {
        c.args(["-d", "x"]);
    }
    for _ in 0..n {
        c.args(["-o", "/dev/null"]).arg(url);
    }
    let out = c.args(["-w", "%{http_code} "]).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// nginx's access log lines for `port`: (connection, requests on it, method, status).
fn served(log: &Path, port: u16) -> Vec<(u64, u64, String, u16)> {
    tokio::task::block_in_place(|| gateway_testkit::peers::settled_log(log, 0))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0] == port.to_string()).then(|| {
                (
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].to_owned(),
                    f[4].parse().unwrap(),
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_status_is_retried_elsewhere_for_idempotent_requests_only() {
    let dir = temp_dir("retry-status-nginx");
    let up = pool(&dir);
    let h2 = nginx_h2c(&dir, "location /fail/ { return 503; }");
    let [down, ..] = up.addrs[..] else {
        unreachable!()
    };
    let gw = gateway(
        "retry-status",
        &format!(
            r#"
[[routes]]
path_prefix = "/r/"
cluster = "pool"

[[routes]]
path_prefix = "/p/"
cluster = "pool"
[routes.retry]
status_codes = []

[[routes]]
path_prefix = "/all/"
cluster = "down"

[[routes]]
path_prefix = "/h2/"
rewrite_prefix = "/fail/"
cluster = "h2"

[clusters.pool]
endpoints = ["{}", "{}", "{}"]
[clusters.pool.retry]
status_codes = [502, 503]
[clusters.pool.health]
error_statuses_to_eject = 0

[clusters.down]
endpoints = ["{down}"]
[clusters.down.retry]
status_codes = [503]

[clusters.h2]
endpoints = ["{}"]
protocol = "h2c"
[clusters.h2.retry]
status_codes = [503]
"#,
            up.addrs[0], up.addrs[1], up.addrs[2], h2.addr
        ),
    )
    .await;
    let base = format!("http://{}", gw.addr);
    let run = |path: &'static str, method: &'static str, n: usize| {
        let url = format!("{base}{path}");
        tokio::task::spawn_blocking(move || curl(&url, method, n))
    };

    // GETs: the 503 is retried on another endpoint; the client sees none.
    let got = run("/r/x", "GET", 30).await.unwrap();
    assert_eq!(got, vec!["200"; 30], "{got:?}");
    let at_down = served(&up.log, down.port());
    assert!(
        at_down.len() >= 5 && at_down.iter().all(|s| s.2 == "GET" && s.3 == 503),
        "round robin sends a third of the GETs to the 503 first: {at_down:?}"
    );
    let lines = log_lines(&gw.log, 30);
    let retried: Vec<_> = lines.iter().filter(|l| l["retries"] == 1).collect();
    assert_eq!(retried.len(), at_down.len(), "{lines:?}");
    for l in &retried {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(
            l["attempt_errors"],
            serde_json::json!(["http_503", "-"]),
            "{l}"
        );
        assert_eq!(l["endpoints"][0], down.to_string(), "{l}");
    }
    // The given-up 503 pages were read to their end, so their connections served again.
    assert!(
        at_down.iter().any(|s| s.1 >= 2),
        "a connection that carried a given-up 503 carried another request: {at_down:?}"
    );

    // POSTs: the upstream had the request; the 503 goes to the client as it came, and nginx
    // saw each POST once.
    let got = run("/r/x", "POST", 30).await.unwrap();
    let refused = got.iter().filter(|s| *s == "503").count();
    assert!(
        refused >= 5 && got.iter().all(|s| s == "200" || s == "503"),
        "{got:?}"
    );
    let posts_down = served(&up.log, down.port())
        .into_iter()
        .filter(|s| s.2 == "POST")
        .count();
    assert_eq!(posts_down, refused, "no POST sent twice");

    // A route that turns it off.
    let got = run("/p/x", "GET", 30).await.unwrap();
    assert!(got.iter().filter(|s| *s == "503").count() >= 5, "{got:?}");

    // Every attempt answered 503: the client gets nginx's page after max_retries (2), with the
    // upstream's status, not an error of the gateway's.
    let c = client();
    let last = get(&c, gw.addr, "/all/x").await;
    assert_eq!(last.status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        last.body.contains("503 Service Temporarily Unavailable") && last.body.contains("nginx"),
        "{}",
        last.body
    );
    assert!(
        last.headers.get("x-gateway-error").is_none(),
        "{:?}",
        last.headers
    );
    let line = log_lines(&gw.log, 91)
        .into_iter()
        .rev()
        .find(|l| l["path"] == "/all/x")
        .expect("the /all/ line");
    assert_eq!(line["upstream_status"], 503, "{line}");
    assert_eq!(line["retries"], 2, "{line}");
    assert_eq!(
        line["attempt_errors"],
        serde_json::json!(["http_503", "http_503", "-"]),
        "{line}"
    );
    assert_eq!(line["error"], serde_json::Value::Null, "{line}");

    // HTTP/2: each given-up stream is read to its end, and the connection serves the next
    // attempt.
    let h2_got = run("/h2/x", "GET", 1).await.unwrap();
    assert_eq!(h2_got, ["503"]);
    let h2_log = wait_lines(&h2.log, 3);
    let conns: std::collections::BTreeSet<&str> = h2_log
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap())
        .collect();
    assert!(
        h2_log.iter().all(|l| l.contains(" 503 /fail/x")) && conns.len() == 1,
        "three attempts, each a 503, on one HTTP/2 connection: {h2_log:?}"
    );

    let admin = gw.handle.admin_addr().unwrap();
    let m = tokio::task::spawn_blocking(move || metrics(admin))
        .await
        .unwrap();
    let retries = sample(
        &m,
        "gateway_retries_total",
        &[("cluster", "pool"), ("reason", "upstream_status")],
    );
    assert_eq!(retries, Some(at_down.len() as f64), "{m}");
}

/// `health.error_statuses_to_eject` (default 5): the endpoint answering `503` is ejected
/// after 5 in a row, each retried so the client sees none; its probe's `GET /` keeps it out
/// while nginx answers `503`, and brings it back once nginx, reloaded, answers `200`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_503_is_ejected_until_its_probe_is_answered() {
    let dir = temp_dir("error-status-nginx");
    let up = pool(&dir);
    let down = up.addrs[0];
    let gw = gateway(
        "error-status",
        &format!(
            r#"
[router.upstream]
endpoints = ["{}", "{}", "{}"]
[router.upstream.retry]
status_codes = [503]
[router.upstream.health]
probe_path = "/"
ejection_ms = 5000
# No measuring probes: with probe_path they would GET / too, and a 503 to a probe ejects at
# once (as unexpected_status), before the requests' five.
[router.upstream.timeouts]
adaptive_connect_deadline = false
"#,
            up.addrs[0], up.addrs[1], up.addrs[2]
        ),
    )
    .await;
    let url = format!("http://{}/x", gw.addr);
    let get_n = |n: usize| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || curl(&url, "GET", n))
    };
    let got = get_n(40).await.unwrap();
    assert_eq!(got, vec!["200"; 40], "{got:?}");
    let lines = log_lines(&gw.log, 40);
    let retried = lines
        .iter()
        .filter(|l| l["attempt_errors"][0] == "http_503")
        .count();
    let ends: Vec<_> = lines.iter().map(|l| &l["attempt_errors"]).collect();
    assert_eq!(retried, 5, "ejected after 5 in a row: {ends:?}");

    let admin = gw.handle.admin_addr().unwrap();
    let s = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    let ep = endpoint(&s, "default", down);
    assert_eq!(ep["state"], "ejected", "{ep:#}");
    assert_eq!(ep["reason"], "error_status", "{ep:#}");
    let event = ep["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "ejected")
        .unwrap_or_else(|| panic!("an ejection event: {ep:#}"));
    assert!(
        event["detail"].as_str().unwrap().contains("503"),
        "{event:#}"
    );
    let m = tokio::task::spawn_blocking(move || metrics(admin))
        .await
        .unwrap();
    let down_label = down.to_string();
    let ejections = sample(
        &m,
        "gateway_endpoint_ejections_total",
        &[("endpoint", &down_label), ("reason", "error_status")],
    );
    assert_eq!(ejections, Some(1.0), "{m}");

    // Fixed: once the ejection ran out, its probes' GET / is answered 200, and it is back.
    up.heal();
    // The ejection's 5 s, then two probes 500 ms apart, on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = tokio::task::spawn_blocking(move || status(admin))
            .await
            .unwrap();
        let ep = endpoint(&s, "default", down).clone();
        if ep["state"] == "healthy" {
            break;
        }
        assert!(Instant::now() < deadline, "not back: {ep:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = served(&up.log, down.port()).len();
    let got = get_n(30).await.unwrap();
    assert_eq!(got, vec!["200"; 30], "{got:?}");
    let after = served(&up.log, down.port());
    assert!(
        after.len() - before >= 5 && after[before..].iter().all(|s| s.3 == 200),
        "it takes its share again: {after:?}"
    );
}

/// The first `n` lines of the file at `path`, waiting up to 5 s for them.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
