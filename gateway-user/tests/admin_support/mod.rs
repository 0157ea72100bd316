//! Shared by the `admin_*` tests: reading the admin API of a running gateway (in-process or the
//! built binary) and picking values out of its OpenMetrics text. Loopback only.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// How long a test waits for a value that the gateway updates asynchronously.
pub const SETTLE: Duration = Duration::from_secs(10);

/// One admin response.
#[derive(Debug)]
pub struct AdminReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `METHOD path` on the admin listener, with a blocking socket and `Connection: close` (no
/// client pool in the way), within 5 s.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str) -> AdminReply {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to the admin listener {admin}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("reading {path} from {admin}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    AdminReply {
        status,
        content_type,
        body,
    }
}

pub fn admin_get(admin: SocketAddr, path: &str) -> AdminReply {
    admin_request(admin, "GET", path)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `/status` as JSON.
pub fn status(admin: SocketAddr) -> serde_json::Value {
    let r = admin_get(admin, "/status");
    assert_eq!(r.status, 200, "/status: {}", r.body);
    assert_eq!(r.content_type, "application/json");
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", r.body))
}

/// The endpoint object of `addr` in cluster `cluster` of a `/status` document.
pub fn endpoint<'a>(
    status: &'a serde_json::Value,
    cluster: &str,
    addr: SocketAddr,
) -> &'a serde_json::Value {
    let c = status["clusters"]
        .as_array()
        .expect("clusters is a list")
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {status:#}"));
    c["endpoints"]
        .as_array()
        .expect("endpoints is a list")
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("no endpoint {addr} in cluster {cluster}: {c:#}"))
}

/// `/metrics` text.
pub fn metrics(admin: SocketAddr) -> String {
    let r = admin_get(admin, "/metrics");
    assert_eq!(r.status, 200, "/metrics: {}", r.body);
    assert!(
        r.content_type.starts_with("application/openmetrics-text"),
        "{}",
        r.content_type
    );
    assert!(r.body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    r.body
}

/// The value of the sample `name{labels…}` (every given label must match, others may be
/// there too); `None` when there is no such sample.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return false;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The catalogue entry (`gateway::metrics::CATALOGUE`, the source of METRICS.md) of the
/// family that sample name `name` belongs to: counters are exposed as `NAME_total`, histograms
/// as `NAME_count`, `NAME_sum` and `NAME_bucket`.
pub fn catalogued(name: &str) -> Option<&'static gateway::metrics::MetricDoc> {
    gateway::metrics::CATALOGUE.iter().find(|d| {
        name == d.name
            || (d.kind == "counter" && name.strip_suffix("_total") == Some(d.name))
            || (d.kind == "histogram"
                && ["_count", "_sum", "_bucket"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(d.name)))
    })
}

/// [`sample`], 0 when a counter or histogram has no such sample yet (a family whose labels
/// never took these values has none). What a test asks for must exist, though: the family in
/// the catalogue, with every label the test names, and a gauge's sample itself. So a renamed
/// metric or label fails the test instead of reading as 0.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let doc = catalogued(name)
        .unwrap_or_else(|| panic!("{name} is not a metric of gateway run (METRICS.md)"));
    for (k, _) in labels {
        assert!(
            doc.labels.contains(k),
            "{} has no label {k} (it has {:?})",
            doc.name,
            doc.labels
        );
    }
    match sample(text, name, labels) {
        Some(v) => v,
        None if doc.kind == "gauge" => {
            panic!("no sample {name} {labels:?} of the gauge in /metrics:\n{text}")
        }
        None => 0.0,
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` and the last `/metrics`
/// or `/status` text `last` returned.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last seen:\n{last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Whether this process runs as root (privileged tests say so, and fail without it).
pub fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} is a privileged test: it runs `gateway run` with the eBPF observer attached, \
         which needs root (run the suite with ./dev test)"
    );
}

/// The real `gateway run` binary inside the fault lab's client namespace, with the eBPF
/// observer required (`[observer] mode = "kernel"`): as root it moves into a cgroup of its own
/// and attaches there. Its listener and admin API are on the namespace's own loopback; reach
/// them through [`LabGateway::admin`] and [`LabGateway::get`]. Dropping it sends SIGTERM, so the
/// gateway detaches and removes its cgroup itself.
pub struct LabGateway<'a> {
    pub lab: &'a gateway_lab::Lab,
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// Removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Client and admin ports inside the lab's client namespace (its own loopback: no clash).
pub const LAB_LISTEN: u16 = 18090;
pub const LAB_ADMIN: u16 = 19901;

impl<'a> LabGateway<'a> {
    /// `extra`: the clusters (TOML), appended to a config with the listener, the admin API,
    /// no access log and a required kernel observer. One worker thread, so that a test's
    /// successive requests find the same idle-pool shard (pools are per worker).
    pub fn start(lab: &'a gateway_lab::Lab, name: &str, extra: &str) -> LabGateway<'a> {
        use std::io::BufRead as _;

        use gateway_lab::NetnsCommandExt as _;
        let dir = std::env::temp_dir().join(format!("gw-admin-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "[router]\nlisten = [\"127.0.0.1:{LAB_LISTEN}\"]\nworkers = 1\ndrain_delay_ms = 0\n\n\
             [admin]\nlisten = \"127.0.0.1:{LAB_ADMIN}\"\n\n\
             [access_log]\noutput = \"off\"\n\n\
             [observer]\nmode = \"kernel\"\ncgroup = \"gateway-admin-{name}-{{pid}}\"\n\n{extra}"
        );
        let path = dir.join("gateway.toml");
        std::fs::write(&path, &config).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .in_netns(lab.client())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning gateway run");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let gw = LabGateway {
            lab,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], LAB_LISTEN)),
            admin: SocketAddr::from(([127, 0, 0, 1], LAB_ADMIN)),
            stderr,
            _dir: TempDir(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gw.log().contains("admin listening") {
            assert!(
                Instant::now() < deadline,
                "gateway run did not start its admin listener:\n{}\nconfig:\n{config}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            gw.log().contains("kernel observer attached"),
            "the test needs kernel signals:\n{}",
            gw.log()
        );
        gw
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// `f(admin address)`, run on a thread inside the client namespace.
    pub fn admin<T: Send>(&self, f: impl FnOnce(SocketAddr) -> T + Send) -> T {
        let admin = self.admin;
        self.lab
            .client()
            .run(move || f(admin))
            .expect("a thread in the client namespace")
    }

    /// `n` GETs of `path`, `concurrency` at a time, from the client namespace: each one's status
    /// and `x-gateway-error`.
    pub fn get(&self, path: &str, n: usize, concurrency: usize) -> Vec<(u16, String)> {
        self.get_bodies(path, n, concurrency)
            .into_iter()
            .map(|(s, e, _)| (s, e))
            .collect()
    }

    /// [`LabGateway::get`], with each response's body.
    pub fn get_bodies(
        &self,
        path: &str,
        n: usize,
        concurrency: usize,
    ) -> Vec<(u16, String, String)> {
        self.send("GET", path, n, concurrency)
            .into_iter()
            .map(|r| {
                let error = r.header("x-gateway-error").to_owned();
                (r.status, error, r.body)
            })
            .collect()
    }

    /// `n` bodiless `method` requests for `path`, `concurrency` at a time, from the client
    /// namespace: each response, headers included.
    pub fn send(&self, method: &str, path: &str, n: usize, concurrency: usize) -> Vec<Reply> {
        use http_body_util::{BodyExt as _, Empty};
        use hyper::body::Bytes;
        use hyper_util::{client::legacy::Client, rt::TokioExecutor};
        let url = format!("http://{}{path}", self.addr);
        let method: hyper::Method = method.parse().expect("an HTTP method");
        self.lab
            .client()
            .block_on(async move {
                let client: Client<_, Empty<Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
                let mut tasks = Vec::new();
                for _ in 0..n {
                    let (client, url, sem, method) =
                        (client.clone(), url.clone(), sem.clone(), method.clone());
                    tasks.push(tokio::spawn(async move {
                        let _permit = sem.acquire_owned().await.unwrap();
                        let req = hyper::Request::builder()
                            .method(method)
                            .uri(url)
                            .body(Empty::new())
                            .unwrap();
                        let sent = Instant::now();
                        let resp =
                            tokio::time::timeout(Duration::from_secs(20), client.request(req))
                                .await
                                .expect("a response within 20 s")
                                .expect("a response from the gateway");
                        let status = resp.status().as_u16();
                        let headers = resp.headers().clone();
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                            .unwrap_or_default();
                        Reply {
                            status,
                            headers,
                            body,
                            took: sent.elapsed(),
                        }
                    }));
                }
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap());
                }
                out
            })
            .expect("a client in the client namespace")
    }
}

/// One response through the gateway, as a client got it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    /// From sending the request to the response head.
    pub took: Duration,
}

impl Reply {
    /// A header's value, `""` when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// `x-gateway-evidence` as key=value pairs; panics when the header is absent.
    pub fn evidence(&self) -> std::collections::BTreeMap<String, String> {
        let h = self.header("x-gateway-evidence");
        assert!(!h.is_empty(), "no x-gateway-evidence: {self:?}");
        h.split(' ')
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| panic!("not key=value: {kv} in {h}"));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }
}

impl Drop for LabGateway<'_> {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
