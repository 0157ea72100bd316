//! `gateway run` in the fault lab: the real binary in the lab's client namespace with the
//! eBPF observer required (`[observer] mode = "kernel"`), in front of the lab's upstreams, and
//! clients that reach it from inside that namespace.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{bins::GatewayBin, process::GatewayProcess, tempdir::TempDir};

/// The real `gateway run` binary inside the fault lab's client namespace, with the eBPF
/// observer required (`[observer] mode = "kernel"`): as root it moves into a cgroup of its own
/// and attaches there. Its listener and admin API are on the namespace's own loopback; reach
/// them through [`LabGateway::admin`] and [`LabGateway::get`]. Dropping it drops the
/// [`GatewayProcess`]: SIGTERM, so the gateway detaches and removes its cgroup itself.
pub struct LabGateway<'a> {
    pub lab: &'a gateway_lab::Lab,
    pub process: GatewayProcess,
    /// The client listener, on the client namespace's loopback.
    pub addr: SocketAddr,
    /// The admin listener, on the client namespace's loopback.
    pub admin: SocketAddr,
    _dir: TempDir,
}

/// Client and admin ports inside the lab's client namespace (its own loopback: no clash).
pub const LAB_LISTEN: u16 = 18090;
pub const LAB_ADMIN: u16 = 19901;

impl<'a> LabGateway<'a> {
    /// `extra`: the clusters (TOML), appended to a config with the listener, the admin API,
    /// no access log and a required kernel observer. One worker thread, so that a test's
    /// successive requests find the same idle-pool shard (pools are per worker). Returns once
    /// `/readyz` answers; panics unless the kernel observer attached.
    pub fn start(
        bin: GatewayBin,
        lab: &'a gateway_lab::Lab,
        name: &str,
        extra: &str,
    ) -> LabGateway<'a> {
        let dir = TempDir::new(&format!("lab-{name}"));
        let config = format!(
            "[router]\nlisten = [\"127.0.0.1:{LAB_LISTEN}\"]\nworkers = 1\ndrain_delay_ms = 0\n\n\
             [admin]\nlisten = \"127.0.0.1:{LAB_ADMIN}\"\n\n\
             [access_log]\noutput = \"off\"\n\n\
             [observer]\nmode = \"kernel\"\ncgroup = \"gateway-admin-{name}-{{pid}}\"\n\n{extra}"
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &config).unwrap();
        let process = GatewayProcess::spawn_in(bin.run(&path), lab.client());
        assert!(
            process.contains("kernel observer attached"),
            "the test needs kernel signals:\n{}\nconfig:\n{config}",
            process.text()
        );
        LabGateway {
            lab,
            addr: process.addr,
            admin: process.admin,
            process,
            _dir: dir,
        }
    }

    /// What the gateway printed so far.
    pub fn log(&self) -> String {
        self.process.text()
    }

    /// Waits for a line of the gateway's log with every one of `needles` (see
    /// [`expect_line`](crate::process::ChildProcess::expect_line): a CI-like run found the
    /// ejected endpoint in `/status` and not yet the line that logged it).
    pub fn expect_log_line(&self, needles: &[&str], limit: Duration) -> String {
        self.process.expect_line(needles, limit)
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
