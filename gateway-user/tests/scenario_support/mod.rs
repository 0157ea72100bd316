//! The issue-4 scenario harness: the real `gateway` binary (observer mode `auto`, so as root it
//! moves into its own cgroup and attaches the eBPF observer) runs inside the lab's client
//! namespace in front of three upstreams; an open-loop load generator sends requests at a fixed
//! rate from the same namespace; a fault is injected on one upstream mid-run. Everything the
//! gateway decided is read back from its own stderr log and JSON access log.
#![allow(dead_code, reason = "each scenario uses a different part")]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use gateway_lab::{HttpBehaviour, HttpServer, Lab, LabSpec, NetnsCommandExt};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

pub const PORT: u16 = 8080;
/// A request not answered within this counts as a client-visible failure.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "scenario tests are privileged (network namespaces, eBPF): run them as root via ./dev test"
    );
}

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

pub struct Scenario {
    pub lab: Lab,
    pub servers: Vec<HttpServer>,
    pub gateway: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<Vec<(SystemTime, String)>>>,
    pub access_log: PathBuf,
    pub started: SystemTime,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // SIGTERM, so that the gateway detaches and removes its cgroup itself.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.gateway.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.gateway.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.gateway.kill();
        let _ = self.gateway.wait();
    }
}

impl Scenario {
    /// Three upstreams serving HTTP and the gateway in front of them, keeping at most
    /// `max_idle` pooled connections per endpoint (0: a new connection per request). `extra` is
    /// appended to the config (TOML).
    pub fn start(
        name: &str,
        behaviour: HttpBehaviour,
        max_idle: usize,
        response_timeout_ms: u64,
        extra: &str,
    ) -> Scenario {
        Scenario::start_with(name, behaviour, max_idle, response_timeout_ms, "", extra)
    }

    /// As [`Scenario::start`], with `upstream` added to `[router.upstream]` (TOML keys, e.g.
    /// `lb_policy = "peak_ewma"`).
    pub fn start_with(
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
        let dir = std::env::temp_dir().join(format!("gw-scenario-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let access_log = dir.join("access.log");
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
             [admin]\nenabled = false\n\
             [access_log]\nformat = \"json\"\noutput = \"{}\"\n\
             [observer]\ncgroup = \"gateway-scenario-{name}-{{pid}}\"\n{extra}",
            endpoints.join(", "),
            access_log.display()
        );
        let config_path = dir.join("gateway.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut gateway = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .in_netns(lab.client())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = gateway.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push((SystemTime::now(), line));
            }
        });
        let s = Scenario {
            lab,
            servers,
            gateway,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stderr,
            access_log,
            started: SystemTime::now(),
            _dir: tempdir::Dir(dir),
        };
        s.wait_for_log("listening", Duration::from_secs(20));
        assert!(
            s.log_contains("kernel observer attached"),
            "the scenario needs kernel signals: {:?}",
            s.stderr.lock().unwrap()
        );
        s
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|(_, l)| l.contains(needle))
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log_contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "gateway never logged {needle:?}: {:?}",
            self.stderr.lock().unwrap()
        );
    }

    /// Log lines containing every needle, with when they were read.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<(SystemTime, String)> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    pub fn access_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs `rate` requests per second for `duration`, calling `at(t)` once per 100 ms tick
    /// (t in seconds since the start) so the test can inject and remove faults on schedule.
    pub fn run_load(
        &self,
        rate: u32,
        duration: Duration,
        mut at: impl FnMut(f64) + Send,
    ) -> Vec<Sample> {
        let addr = self.addr;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        self.lab
            .client()
            .block_on(async move {
                let client: Client<_, Empty<Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                let start = tokio::time::Instant::now();
                let total = (rate as f64 * duration.as_secs_f64()) as u64;
                let mut tasks = Vec::with_capacity(total as usize);
                let mut next_tick = 0.0;
                for i in 0..total {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due).await;
                    let t = (due - start).as_secs_f64();
                    while next_tick <= t {
                        at(next_tick);
                        next_tick += 0.1;
                    }
                    let client = client.clone();
                    let out = out.clone();
                    tasks.push(tokio::spawn(async move {
                        let sent = tokio::time::Instant::now();
                        let req = hyper::Request::get(format!("http://{addr}/"))
                            .body(Empty::new())
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
                for t in tasks {
                    let _ = t.await;
                }
            })
            .expect("load generator in the client namespace");
        let mut v = samples.lock().unwrap().clone();
        v.sort_by(|a, b| a.at.total_cmp(&b.at));
        v
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
