//! The fault scenarios: the real `gateway` binary (observer mode `auto`, so as root it moves
//! into its own cgroup and attaches the eBPF observer) runs inside the lab's client namespace
//! in front of three upstreams; an open-loop load generator sends requests at a fixed rate
//! from the same namespace; a fault is injected on one upstream mid-run, and [`Change`] records
//! when. Everything the gateway decided is read back from its own log and JSON access log.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use gateway_lab::{HttpBehaviour, HttpServer, Lab, LabSpec};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use crate::{
    admin, bins::GatewayBin, inprocess, process::GatewayProcess, root::require_root,
    tempdir::TempDir,
};

pub const PORT: u16 = 8080;
/// The gateway's admin listener, on the client namespace's own loopback.
pub const ADMIN: u16 = 19911;
/// A request not answered within this counts as a client-visible failure.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// One request's fate, as the client saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the run started, when the request was sent.
    pub at: f64,
    pub latency: Duration,
    pub status: u16,
    /// Which upstream answered (`upstream-k`), or the `x-gateway-error` reason.
    pub served_by: String,
    pub error: String,
}

/// Fields drop in order: the gateway first (SIGTERM, so that it detaches its observer and
/// removes its cgroup), then the servers, then the lab, whose drop SIGKILLs whatever still
/// runs in its namespaces.
pub struct Scenario {
    pub gateway: GatewayProcess,
    pub servers: Vec<HttpServer>,
    pub lab: Lab,
    pub addr: SocketAddr,
    pub access_log: PathBuf,
    pub started: SystemTime,
    /// The load generator sends POSTs with this body instead of GETs ([`Scenario::posting`]).
    pub post_body: Option<Bytes>,
    _dir: TempDir,
}

impl Scenario {
    /// Three upstreams serving HTTP and the gateway in front of them, keeping at most
    /// `max_idle` pooled connections per endpoint (0: a new connection per request). `extra` is
    /// appended to the config (TOML). Returns once `/readyz` answers; panics unless the kernel
    /// observer attached.
    pub fn start(
        bin: GatewayBin,
        name: &str,
        behaviour: HttpBehaviour,
        max_idle: usize,
        response_timeout_ms: u64,
        extra: &str,
    ) -> Scenario {
        Scenario::start_with(
            bin,
            name,
            behaviour,
            max_idle,
            response_timeout_ms,
            "",
            extra,
        )
    }

    /// As [`Scenario::start`], with `upstream` added to `[router.upstream]` (TOML keys, e.g.
    /// `lb_policy = "peak_ewma"`).
    pub fn start_with(
        bin: GatewayBin,
        name: &str,
        behaviour: HttpBehaviour,
        max_idle: usize,
        response_timeout_ms: u64,
        upstream: &str,
        extra: &str,
    ) -> Scenario {
        require_root();
        let lab = Lab::new(LabSpec {
            upstreams: 3,
            client_cgroup: false,
        })
        .expect("lab");
        let servers: Vec<HttpServer> = lab
            .upstreams()
            .iter()
            .map(|u| u.serve_http(PORT, behaviour.clone()).expect("http server"))
            .collect();
        let dir = TempDir::new(&format!("scenario-{name}"));
        let access_log = dir.path().join("access.log");
        let port = 18080;
        let endpoints: Vec<String> = lab
            .upstreams()
            .iter()
            .map(|u| format!("\"{}\"", u.addr_v4(PORT)))
            .collect();
        let config = format!(
            "[router]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 1\ndrain_delay_ms = 0\n\
             [router.upstream]\nendpoints = [{}]\n{upstream}\n\
             [router.upstream.timeouts]\nconnect_timeout_ms = 2000\nresponse_timeout_ms = {response_timeout_ms}\nrequest_timeout_ms = 10000\n\
             [router.upstream.limits]\nmax_idle_per_endpoint = {max_idle}\n\
             [router.upstream.retry]\nmax_retries = 2\n\
             [admin]\nlisten = \"127.0.0.1:{ADMIN}\"\n\
             [access_log]\nformat = \"json\"\noutput = \"{}\"\n\
             [observer]\ncgroup = \"gateway-scenario-{name}-{{pid}}\"\n{extra}",
            endpoints.join(", "),
            access_log.display()
        );
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config).unwrap();
        let gateway = GatewayProcess::spawn_in(bin.run(&config_path), lab.client());
        assert!(
            gateway.contains("kernel observer attached"),
            "the scenario needs kernel signals:\n{}",
            gateway.text()
        );
        Scenario {
            lab,
            servers,
            addr: gateway.addr,
            gateway,
            access_log,
            started: SystemTime::now(),
            post_body: None,
            _dir: dir,
        }
    }

    /// The load generator sends POSTs with a `len`-byte body: requests that are not
    /// idempotent, which the gateway may send again only when the kernel proves that the
    /// upstream never received them.
    pub fn posting(mut self, len: usize) -> Scenario {
        self.post_body = Some(Bytes::from(vec![b'p'; len]));
        self
    }

    /// The cgroup the gateway moved itself into (`gateway-scenario-NAME-PID`), which it
    /// removes when it stops.
    pub fn cgroup(&self) -> PathBuf {
        crate::service::cgroup_of(self.gateway.pid())
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.gateway.contains(needle)
    }

    /// Gateway log lines containing every needle, with when they were read.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<(SystemTime, String)> {
        self.gateway.lines_with(needles)
    }

    /// The gateway's `/status`, as JSON. Only from a thread in the client namespace, such as
    /// the one `run_load` calls its `at` on.
    pub fn status_here(&self) -> serde_json::Value {
        admin::status(SocketAddr::from(([127, 0, 0, 1], ADMIN)))
    }

    /// Whether `endpoint`'s connect deadline is measured (from at least 8 recent handshakes)
    /// rather than the configured timeout; see [`Scenario::status_here`].
    pub fn deadline_measured_here(&self, endpoint: &str) -> bool {
        let s = self.status_here();
        s["clusters"][0]["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["address"] == endpoint)
            .unwrap_or_else(|| panic!("no endpoint {endpoint}: {s:#}"))["connect_deadline_source"]
            == "measured"
    }

    /// The JSON access log so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        inprocess::read_access_log(&self.access_log)
    }

    /// Runs `rate` requests per second for at most `duration`, calling `at(t)` once per 100 ms
    /// tick (t in seconds since the start) so the test can inject and remove faults on
    /// schedule; the run stops early once `at` returns `false`. Every request sent has its
    /// sample: a load task that panicked fails the test, and so would a lost sample.
    pub fn run_load(
        &self,
        rate: u32,
        duration: Duration,
        mut at: impl FnMut(f64) -> bool + Send,
    ) -> Vec<Sample> {
        let addr = self.addr;
        let post_body = self.post_body.clone();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let sent = self
            .lab
            .client()
            .block_on(async move {
                // Idle client connections go before the gateway's 10 s keep-alive limit
                // (`header_read_timeout_ms`) closes them, so that no request races a close.
                let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(5))
                    .build_http();
                let start = tokio::time::Instant::now();
                let total = (rate as f64 * duration.as_secs_f64()) as u64;
                let mut tasks = Vec::with_capacity(total as usize);
                let mut next_tick = 0.0;
                'send: for i in 0..total {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due).await;
                    let t = (due - start).as_secs_f64();
                    while next_tick <= t {
                        if !at(next_tick) {
                            break 'send;
                        }
                        next_tick += 0.1;
                    }
                    let client = client.clone();
                    let out = out.clone();
                    let post_body = post_body.clone();
                    tasks.push(tokio::spawn(async move {
                        let sent = tokio::time::Instant::now();
                        let req =
                            match post_body {
                                Some(b) => hyper::Request::post(format!("http://{addr}/"))
                                    .body(Full::new(b)),
                                None => hyper::Request::get(format!("http://{addr}/"))
                                    .body(Full::default()),
                            }
                            .unwrap();
                        let r = tokio::time::timeout(CLIENT_TIMEOUT, async {
                            let resp = client.request(req).await?;
                            let status = resp.status().as_u16();
                            let error = resp
                                .headers()
                                .get("x-gateway-error")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let body = resp.into_body().collect().await?.to_bytes();
                            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, error, body))
                        })
                        .await;
                        let latency = sent.elapsed();
                        let s = match r {
                            Ok(Ok((status, error, body))) => Sample {
                                at: t,
                                latency,
                                status,
                                served_by: String::from_utf8_lossy(&body).trim().to_owned(),
                                error,
                            },
                            Ok(Err(e)) => Sample {
                                at: t,
                                latency,
                                status: 0,
                                served_by: String::new(),
                                error: format!("client error: {e}"),
                            },
                            Err(_) => Sample {
                                at: t,
                                latency,
                                status: 0,
                                served_by: String::new(),
                                error: "client timeout".into(),
                            },
                        };
                        out.lock().unwrap().push(s);
                    }));
                }
                let sent = tasks.len();
                for t in tasks {
                    t.await.expect("a load-generator task panicked");
                }
                sent
            })
            .expect("load generator in the client namespace");
        let mut v = samples.lock().unwrap().clone();
        assert_eq!(
            v.len(),
            sent,
            "every request sent has a sample ({sent} sent)"
        );
        v.sort_by(|a, b| a.at.total_cmp(&b.at));
        v
    }
}

/// When a fault went on or off: as wall-clock seconds (comparable with log-line times) taken
/// just before and just after the change, and as seconds since the start of the load run
/// (`t`: when the change was asked for; `t_done`: when it was complete).
#[derive(Clone, Copy, Debug, Default)]
pub struct Change {
    pub before: f64,
    pub after: f64,
    pub t: f64,
    pub t_done: f64,
}

impl Change {
    /// Runs `f` (which applies or removes a fault), asked for at run time `t`, and records
    /// when; `start` is the wall-clock time the load run started.
    pub fn record<T>(t: f64, start: f64, f: impl FnOnce() -> T) -> (Change, T) {
        let before = secs(SystemTime::now());
        let r = f();
        let after = secs(SystemTime::now());
        (
            Change {
                before,
                after,
                t,
                t_done: after - start,
            },
            r,
        )
    }
}

pub fn quantile(samples: &[&Sample], q: f64) -> Duration {
    let mut v: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

pub fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.status != 200).collect()
}

/// Seconds since the UNIX epoch of a log line read at `t`.
pub fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
