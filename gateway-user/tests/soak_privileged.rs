//! The soak (issue 12), privileged: the real gateway with the kernel observer in the fault lab
//! (`gateway_testkit::scenario`: three upstreams, open-loop load from the client namespace)
//! at `SOAK_RATE` requests per second for `SOAK_MINUTES` while the faults below run. The
//! default, 2 minutes at 300 req/s, is the version `./dev test` runs: the debug build on a
//! shared two-core machine fell behind 1,000 req/s (client connections piled up to 19,000
//! within 80 s, healthy upstreams or not). `cargo xtask soak --minutes 30` runs the release
//! build at 1,000 req/s. Meanwhile:
//!
//! - upstream 2 flaps every fault cycle after [`WARM_UP`] ([`Schedule`]: 120 s, shorter in a
//!   short run): SYN blackhole for a third of it, refused for a third, healthy for the rest;
//! - the gateway gets SIGHUP (reload) every [`RELOAD_EVERY`];
//! - beside the load, long-lived traffic from the same namespace ([`side_traffic`]): one
//!   upgraded connection (a WebSocket handshake through the gateway, then a line echoed by the
//!   upstream every [`ECHO_EVERY`], reopened if it breaks) and, one after another, slow
//!   responses that trickle [`TRICKLE_CHUNKS`] chunks [`TRICKLE_EVERY`] apart, each read to
//!   its end.
//!
//! Every [`SAMPLE_EVERY`] it samples the gateway's RSS, open fds, threads, its established
//! upstream connections (pooled and in use, from `ss` in the client namespace), its client
//! connections and the number of metric series. It asserts RSS drift under 5 % after the
//! warm-up (over whole fault cycles when the run holds at least three: see [`cycle_drift`]),
//! fds and threads flat, series flat after the first faults (see [`LATE_SERIES`]), and
//! client-visible failures only while a fault is on
//! (or one client timeout after), each an answer of the gateway's with its reason
//! (`x-gateway-error`) and a line in its access log; never a reset or a timeout. The
//! long-lived traffic must keep flowing: no echo or trickle fails outside a fault.

use std::{
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{body::Bytes, header};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use gateway_lab::{Fault, FaultGuard, HttpBehaviour};
use gateway_testkit::{
    admin::{metrics, value},
    gateway_bin,
    scenario::{ADMIN, CLIENT_TIMEOUT, PORT, Scenario, failures},
};

/// Before the first fault: pools, deadlines and allocator arenas settle.
const WARM_UP: f64 = 20.0;
/// One flap of upstream 2 (blackhole, refuse, recover) in a long run; see [`Schedule`].
const CYCLE: f64 = 120.0;
/// The shortest fault cycle, for the short run.
const SHORT_CYCLE: f64 = 30.0;
const RELOAD_EVERY: f64 = 30.0;
const SAMPLE_EVERY: f64 = 5.0;
/// One line over the upgraded connection this often.
const ECHO_EVERY: Duration = Duration::from_secs(1);
/// Each slow response: this many chunks, this far apart (`/trickle/…` on the lab upstreams):
/// 4 s of body. The gap stays under the scenario's response timeout (1 s), which the gateway
/// applies between two reads of an upstream body: a 1 s gap failed most trickles midway
/// ("error reading a body from connection"), as configured.
const TRICKLE_CHUNKS: u32 = 9;
const TRICKLE_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Healthy,
    Blackhole,
    Refused,
}

/// The faults' clock. RSS is compared over whole fault cycles, at least three (see
/// [`cycle_drift`]): a single sample depends on where in a cycle it falls. So a run too short
/// for three 120 s cycles flaps faster, in cycles of whole tens of seconds down to 30 s: the
/// 2-minute run has three 30 s cycles. With one 120 s cycle in 2 minutes, RSS was compared
/// between a sample before the first fault and one after it, while the idle pool still held
/// the connections the faults and reloads had opened (9 -> 35 upstream connections): +3.3 %,
/// and +4.0 % with a release build running beside it, against the 5 % limit, the one thin
/// margin of this test. Stop 24's CI run failed the test; its message was cut from the log.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    cycle: f64,
}

impl Schedule {
    fn for_run(seconds: f64) -> Schedule {
        let fits = ((seconds - WARM_UP - SAMPLE_EVERY) / 3.0 / 10.0).floor() * 10.0;
        Schedule {
            cycle: fits.clamp(SHORT_CYCLE, CYCLE),
        }
    }

    /// What upstream 2 suffers at run time `t`.
    fn phase(self, t: f64) -> Phase {
        if t < WARM_UP {
            return Phase::Healthy;
        }
        let p = (t - WARM_UP) % self.cycle;
        if p < self.cycle / 3.0 {
            Phase::Blackhole
        } else if p < 2.0 * self.cycle / 3.0 {
            Phase::Refused
        } else {
            Phase::Healthy
        }
    }

    /// Whether a request sent at `t` may fail because of the fault: a fault is on, or went off
    /// less than a client timeout ago.
    fn fault_near(self, t: f64) -> bool {
        self.phase(t) != Phase::Healthy
            || self.phase((t - CLIENT_TIMEOUT.as_secs_f64()).max(0.0)) != Phase::Healthy
    }

    /// Whether a fault was on (or had just gone off) at some time in `from..=to`.
    fn fault_during(self, from: f64, to: f64) -> bool {
        let mut t = from;
        while t < to {
            if self.fault_near(t) {
                return true;
            }
            t += 0.25;
        }
        self.fault_near(to)
    }

    /// When the first faults count as seen, for the series: after the faults of the first
    /// cycle (80 s of them), or of the first two short ones (40 s). A 10 s fault may pass
    /// without the gateway opening a connection to the faulty upstream, as its pooled ones
    /// are not touched by a SYN fault: in one 2-minute run the ejection series first came in
    /// the second short cycle.
    fn first_faults_seen(self) -> f64 {
        let cycles = if self.cycle < CYCLE { 2.0 } else { 1.0 };
        WARM_UP + (cycles - 1.0) * self.cycle + 2.0 * self.cycle / 3.0 + SAMPLE_EVERY
    }

    /// Mean RSS (KiB) over the samples of each whole fault cycle after the warm-up: cycle k
    /// covers `WARM_UP + k * cycle ..  WARM_UP + (k + 1) * cycle`.
    fn rss_by_cycle(self, probes: &[Probe]) -> Vec<f64> {
        let Some(end) = probes.last().map(|p| p.t) else {
            return Vec::new();
        };
        let whole = ((end - WARM_UP) / self.cycle).floor().max(0.0) as usize;
        (0..whole)
            .map(|k| {
                let from = WARM_UP + k as f64 * self.cycle;
                let rss: Vec<f64> = probes
                    .iter()
                    .filter(|p| p.t >= from && p.t < from + self.cycle)
                    .map(|p| p.rss_kib as f64)
                    .collect();
                rss.iter().sum::<f64>() / rss.len().max(1) as f64
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
struct Probe {
    t: f64,
    phase: Phase,
    rss_kib: u64,
    fds: usize,
    threads: u64,
    upstream_conns: usize,
    client_conns: f64,
    series: Series,
}

impl Probe {
    /// Open fds that are not a connection the probe counts: listeners, the observer's maps
    /// and ring buffer, the access log, eventfds, connects under way. Client connections
    /// follow the load (a stall of the machine piles them up, and they close again) and
    /// upstream connections the pools; neither is a leak, so this is the count that must stay
    /// flat. The fd count and the two connection counts are read a few milliseconds apart.
    fn other_fds(&self) -> usize {
        self.fds
            .saturating_sub(self.upstream_conns + self.client_conns.max(0.0) as usize)
    }
}

/// The metric series (`name{labels}`) exported at one sample; shown as their number.
#[derive(Clone)]
struct Series(std::collections::BTreeSet<String>);

impl Series {
    fn of(metrics: &str) -> Series {
        Series(
            metrics
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| l.rsplit_once(' ').map_or(l, |(key, _)| key).to_owned())
                .collect(),
        )
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.len())
    }
}

/// At most this many series may first appear after the first faults
/// ([`Schedule::first_faults_seen`]). A label value that
/// a rare event brings late (a status or a reason the faults meet only now and then: one in
/// the 30-minute run of 2026-12-01, which came with its 2 failed requests) is bounded by its
/// enum; a leaking label grows with requests or connections, by the thousand here. The report
/// lists each late series.
const LATE_SERIES: usize = 8;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Established connections from the client namespace to the upstreams' port.
fn upstream_conns(s: &Scenario) -> usize {
    let out = s
        .lab
        .client()
        .exec(
            "ss",
            &[
                "-Htn",
                "state",
                "established",
                &format!("( dport = :{PORT} )"),
            ],
        )
        .unwrap_or_default();
    out.lines().filter(|l| !l.trim().is_empty()).count()
}

/// RSS drift as a leak shows it: the last whole fault cycle against the second, each
/// averaged over the same phases (blackhole, refused, healthy). A single sample depends on
/// where in a cycle it falls: after a fault the idle pool holds more connections (and their
/// buffers) until they idle out (`idle_timeout_ms`, 50 s), which is not growth. The first
/// cycle is part of the warm-up: it is the first time every fault path runs. `None` with
/// fewer than three whole cycles.
fn cycle_drift(cycles: &[f64]) -> Option<(f64, &'static str)> {
    if cycles.len() < 3 {
        return None;
    }
    let (second, last) = (cycles[1], cycles[cycles.len() - 1]);
    Some((
        (last - second) / second,
        "mean over the last whole fault cycle against the second",
    ))
}

/// What the long-lived traffic saw.
#[derive(Debug, Default)]
struct Side {
    /// Upgraded connections opened (101 through the gateway).
    upgrades: u64,
    /// Lines sent over them and echoed back intact.
    echoes: u64,
    /// Slow responses read to their end, every chunk there.
    trickles: u64,
    /// (from, to, what): run seconds of each failure's span, and what failed.
    failures: Vec<(f64, f64, String)>,
}

/// Runs the long-lived traffic through the gateway at `addr` until `stop`.
async fn side_traffic(addr: SocketAddr, stop: &AtomicBool, side: &Mutex<Side>) {
    let start = tokio::time::Instant::now();
    let failed = |from: f64, what: String| {
        let to = start.elapsed().as_secs_f64();
        side.lock().unwrap().failures.push((from, to, what));
    };
    let echo = async {
        while !stop.load(Ordering::Relaxed) {
            // When the step that failed began: the handshake, or the line that got no echo
            // (not when the connection opened, which may be many fault cycles earlier).
            let mut from = start.elapsed().as_secs_f64();
            if let Err(e) = echo_session(addr, stop, side, start, &mut from).await {
                failed(from, format!("upgraded connection: {e}"));
                tokio::time::sleep(ECHO_EVERY).await;
            }
        }
    };
    let trickle = async {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let uri = format!(
            "http://{addr}/trickle/{TRICKLE_CHUNKS}/{}",
            TRICKLE_EVERY.as_millis()
        );
        let limit = TRICKLE_EVERY * TRICKLE_CHUNKS + CLIENT_TIMEOUT;
        while !stop.load(Ordering::Relaxed) {
            let from = start.elapsed().as_secs_f64();
            let got = tokio::time::timeout(limit, async {
                let resp = client.get(uri.parse().unwrap()).await?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
            })
            .await;
            match got {
                Ok(Ok((200, body)))
                    if body.iter().filter(|&&b| b == b'\n').count() == TRICKLE_CHUNKS as usize =>
                {
                    side.lock().unwrap().trickles += 1;
                }
                Ok(Ok((status, body))) => failed(
                    from,
                    format!("trickle: {status}, {:?}", String::from_utf8_lossy(&body)),
                ),
                Ok(Err(e)) => failed(from, format!("trickle: {e}")),
                Err(_) => failed(from, format!("trickle: not done within {limit:?}")),
            }
        }
    };
    tokio::join!(echo, trickle);
}

/// One upgraded connection: the handshake, then a line every [`ECHO_EVERY`] that must come
/// back intact, until `stop`. `step` is set to when each line is sent (seconds since `start`).
async fn echo_session(
    addr: SocketAddr,
    stop: &AtomicBool,
    side: &Mutex<Side>,
    start: tokio::time::Instant,
    step: &mut f64,
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn.with_upgrades());
    let req = hyper::Request::get("/chat")
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, send.send_request(req))
        .await
        .map_err(|_| "no answer to the upgrade".to_owned())?
        .map_err(|e| format!("upgrade request: {e}"))?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!(
            "upgrade answered {} ({:?})",
            resp.status(),
            resp.headers().get("x-gateway-error")
        ));
    }
    let mut io = TokioIo::new(
        hyper::upgrade::on(resp)
            .await
            .map_err(|e| format!("upgrade: {e}"))?,
    );
    side.lock().unwrap().upgrades += 1;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let line = format!("message {n}\n");
        n += 1;
        *step = start.elapsed().as_secs_f64();
        let mut echo = vec![0u8; line.len()];
        tokio::time::timeout(CLIENT_TIMEOUT, async {
            io.write_all(line.as_bytes()).await?;
            io.read_exact(&mut echo).await
        })
        .await
        .map_err(|_| format!("no echo of {line:?} within {CLIENT_TIMEOUT:?}"))?
        .map_err(|e| format!("echo of {line:?}: {e}"))?;
        if echo != line.as_bytes() {
            return Err(format!(
                "echo of {line:?} came back as {:?}",
                String::from_utf8_lossy(&echo)
            ));
        }
        side.lock().unwrap().echoes += 1;
        tokio::time::sleep(ECHO_EVERY).await;
    }
    Ok(())
}

/// The load at `rate` for `minutes`, with upstream 2's faults, the reloads and the samples
/// on its clock.
///
/// The faults, reloads and samples run on a control thread of their own. The load's tick
/// runs on the sending thread of the client's runtime, and anything slow there (an `nft`
/// run, an HTTP fetch, `ss`, /proc) holds back every request due meanwhile and then sends
/// them at once: CI saw a tick of about 0.8 s open 240 client connections in one burst
/// (2026-12-03), and a 0.9 s sleep in the tick opens 325 here. The tick now only hands its
/// time to the control thread.
fn load(
    s: &Scenario,
    rate: u32,
    minutes: f64,
    schedule: Schedule,
    probes: &Mutex<Vec<Probe>>,
    reloads: &mut u32,
) -> Vec<gateway_testkit::scenario::Sample> {
    let behind = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tick, ticks) = std::sync::mpsc::channel::<f64>();
        scope.spawn(|| {
            s.lab
                .client()
                .run(|| control(s, rate, schedule, ticks, probes, reloads, &behind))
                .expect("the control thread in the client namespace");
        });
        let samples = s.run_load(rate, Duration::from_secs_f64(minutes * 60.0), |t| {
            // The control thread is gone only if it panicked: end the load, and the scope
            // below resumes its panic.
            if tick.send(t).is_err() {
                return false;
            }
            if behind.load(Ordering::Relaxed) {
                eprintln!("stopping: client connections piled up");
                return false;
            }
            true
        });
        drop(tick);
        samples
    })
}

/// The control thread of [`load`]: at each tick of the load's clock, upstream 2's fault as
/// the schedule has it, a SIGHUP every [`RELOAD_EVERY`] and a sample every
/// [`SAMPLE_EVERY`]. On a thread in the client namespace (the admin listener is its
/// loopback). Sets `behind` when client connections pile up.
fn control(
    s: &Scenario,
    rate: u32,
    schedule: Schedule,
    ticks: std::sync::mpsc::Receiver<f64>,
    probes: &Mutex<Vec<Probe>>,
    reloads: &mut u32,
    behind: &AtomicBool,
) {
    let bad = s.lab.upstream(1).unwrap();
    let mut fault: Option<(Phase, FaultGuard)> = None;
    let (mut next_reload, mut next_sample) = (RELOAD_EVERY, 0.0);
    for t in ticks {
        let want = schedule.phase(t);
        if fault.as_ref().map_or(Phase::Healthy, |(p, _)| *p) != want {
            if let Some((_, g)) = fault.take() {
                g.clear().expect("clearing the fault");
            }
            let port = PORT;
            fault = match want {
                Phase::Healthy => None,
                Phase::Blackhole => Some((want, bad.apply(Fault::SynBlackhole { port }).unwrap())),
                Phase::Refused => Some((want, bad.apply(Fault::Refuse { port }).unwrap())),
            };
        }
        if t >= next_reload {
            s.gateway.signal(libc::SIGHUP);
            *reloads += 1;
            next_reload += RELOAD_EVERY;
        }
        if t >= next_sample {
            let p = probe(s, t, want);
            if let Some(before) = probes.lock().unwrap().last() {
                for key in p.series.0.difference(&before.series.0) {
                    eprintln!("  new series: {key}");
                }
            }
            // Fallen far behind (the machine, the client or the gateway): stop before the
            // client runs out of descriptors; the assertions below say so with the figures.
            if p.client_conns > 4.0 * f64::from(rate) {
                behind.store(true, Ordering::Relaxed);
            }
            probes.lock().unwrap().push(p);
            next_sample += SAMPLE_EVERY;
        }
    }
}

/// One sample of the gateway's resources, in the client namespace.
fn probe(s: &Scenario, t: f64, phase: Phase) -> Probe {
    let m = metrics(SocketAddr::from(([127, 0, 0, 1], ADMIN)));
    let p = Probe {
        t,
        phase,
        rss_kib: s.gateway.rss_kib(),
        fds: s.gateway.open_fds(),
        threads: s.gateway.threads(),
        upstream_conns: upstream_conns(s),
        client_conns: value(&m, "gateway_client_connections", &[]),
        series: Series::of(&m),
    };
    eprintln!("{p:?}");
    p
}

#[test]
fn soak_privileged() {
    let minutes: f64 = env_or("SOAK_MINUTES", 2.0);
    let rate: u32 = env_or("SOAK_RATE", 300);
    let schedule = Schedule::for_run(minutes * 60.0);
    eprintln!("fault cycle: {} s", schedule.cycle);
    let s = Scenario::start(
        gateway_bin!(),
        "soak",
        HttpBehaviour::immediate(),
        32,
        1000,
        "",
    );
    let probes = Mutex::new(Vec::<Probe>::new());
    let mut reloads = 0;
    let start = Instant::now();
    let (stop, side) = (AtomicBool::new(false), Mutex::new(Side::default()));
    let samples = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            s.lab
                .client()
                .block_on(side_traffic(s.addr, &stop, &side))
                .expect("long-lived traffic in the client namespace")
        });
        let samples = load(&s, rate, minutes, schedule, &probes, &mut reloads);
        stop.store(true, Ordering::Relaxed);
        traffic.join().expect("the long-lived traffic panicked");
        samples
    });
    let elapsed = start.elapsed();
    let probes = probes.into_inner().unwrap();

    // Client-visible failures: each one during a fault, answered by the gateway with a reason.
    let failed = failures(&samples);
    let unexplained: Vec<_> = failed
        .iter()
        .filter(|f| f.status == 0 || f.error.is_empty() || !schedule.fault_near(f.at))
        .collect();
    let logged = s
        .access_log()
        .iter()
        // 101: the upgraded connections of the long-lived traffic.
        .filter(|l| {
            l["status"]
                .as_u64()
                .is_some_and(|st| st != 200 && st != 101)
        })
        .count();
    let reloaded = s.gateway.count("config reloaded");
    let first = probes
        .iter()
        .find(|p| p.t >= WARM_UP)
        .or(probes.last())
        .expect("at least one sample")
        .clone();
    let last = probes.last().unwrap().clone();
    let max = |f: fn(&Probe) -> f64| {
        probes
            .iter()
            .filter(|p| p.t >= WARM_UP)
            .map(f)
            .fold(0.0, f64::max)
    };
    // Series: the label values the faults bring appear with the first faults; few after, and
    // each named.
    let at_first_faults = probes
        .iter()
        .find(|p| p.t >= schedule.first_faults_seen())
        .map_or(&last.series, |p| &p.series);
    let series_after_first_faults = at_first_faults.len();
    let late: Vec<&String> = last.series.0.difference(&at_first_faults.0).collect();
    let point_drift = (last.rss_kib as f64 - first.rss_kib as f64) / first.rss_kib as f64;
    let cycles = schedule.rss_by_cycle(&probes);
    let (drift, drift_basis) = cycle_drift(&cycles).unwrap_or((
        point_drift,
        "first sample after warm-up -> last sample (fewer than 3 whole fault cycles)",
    ));
    // The long-lived traffic: a line a second, and a trickle every 4 s or so, near enough;
    // a failure only while a fault was on.
    let side = side.into_inner().unwrap();
    let side_unexplained: Vec<_> = side
        .failures
        .iter()
        .filter(|(from, to, _)| !schedule.fault_during(*from, *to))
        .collect();
    let seconds = elapsed.as_secs_f64();
    let (echoes_due, trickles_due) = (
        seconds / ECHO_EVERY.as_secs_f64(),
        seconds / (TRICKLE_EVERY * (TRICKLE_CHUNKS - 1)).as_secs_f64(),
    );
    let report = format!(
        "soak: {minutes} min at {rate} req/s in {elapsed:.0?}: {} requests, {} failed ({} \
         unexplained), {logged} access-log lines other than 200 and 101, {reloads} SIGHUPs \
         ({reloaded} reload log lines)\n\
         long-lived: {} upgraded connections opened, {} lines echoed over them (about \
         {echoes_due:.0} due), {} slow responses read to their end (about {trickles_due:.0} \
         due), {} failures ({} outside a fault)\n\
         RSS drift {:+.1} % ({drift_basis}); mean RSS per fault cycle {:?} KiB\n\
         after warm-up -> end: RSS {} -> {} KiB ({:+.1} %, max {} KiB), fds {} -> {} (max \
         {}; other than connections {} -> {}, max {}), threads {} -> {}, upstream connections {} -> {} (max {}), series {} -> {} \
         ({series_after_first_faults} once the first faults were seen), client connections \
         at most {} (a pile-up means the gateway fell behind), {} samples during faults",
        samples.len(),
        failed.len(),
        unexplained.len(),
        side.upgrades,
        side.echoes,
        side.trickles,
        side.failures.len(),
        side_unexplained.len(),
        drift * 100.0,
        cycles.iter().map(|m| m.round() as u64).collect::<Vec<_>>(),
        first.rss_kib,
        last.rss_kib,
        point_drift * 100.0,
        max(|p| p.rss_kib as f64),
        first.fds,
        last.fds,
        max(|p| p.fds as f64),
        first.other_fds(),
        last.other_fds(),
        max(|p| p.other_fds() as f64),
        first.threads,
        last.threads,
        first.upstream_conns,
        last.upstream_conns,
        max(|p| p.upstream_conns as f64),
        first.series.len(),
        last.series.len(),
        max(|p| p.client_conns),
        probes.iter().filter(|p| p.phase != Phase::Healthy).count(),
    );
    eprintln!("{report}");
    for f in unexplained.iter().take(10) {
        eprintln!("unexplained failure: {f:?}");
    }
    for (from, to, what) in side.failures.iter().take(10) {
        eprintln!("long-lived traffic failed between {from:.1} s and {to:.1} s: {what}");
    }
    assert!(unexplained.is_empty(), "{report}");
    assert!(
        side_unexplained.is_empty(),
        "long-lived traffic failed outside a fault: {report}"
    );
    assert!(
        side.upgrades >= 1 && side.echoes as f64 >= 0.7 * echoes_due,
        "the upgraded connection did not keep echoing: {report}"
    );
    assert!(
        side.trickles as f64 >= 0.7 * trickles_due,
        "slow responses did not keep coming: {report}"
    );
    assert!(
        logged >= failed.len(),
        "every failure has its access-log line: {report}"
    );
    assert!(drift < 0.05, "RSS drift: {report}");
    // Flat: the fds that are not a counted connection. Client connections are bounded below
    // (a pile-up fails there, not here) and upstream connections by the pools; a leak grows
    // with every cycle and request. The slack is connects under way (SYN_SENT while upstream
    // 2 blackholes SYNs) and connections closing between the reads.
    assert!(
        last.other_fds() <= first.other_fds() + 16,
        "fds other than connections grew: {report}"
    );
    assert!(
        (max(|p| p.other_fds() as f64) as usize) <= first.other_fds() + 48,
        "fds other than connections grew: {report}"
    );
    assert_eq!(first.threads, last.threads, "threads: {report}");
    assert!(
        max(|p| p.client_conns) <= f64::from(rate),
        "client connections piled up: {report}"
    );
    assert!(
        last.upstream_conns <= 3 * 32 + 16,
        "upstream connections: {report}"
    );
    for key in &late {
        eprintln!("series first seen after the first faults: {key}");
    }
    assert!(
        late.len() <= LATE_SERIES,
        "{} series appeared after the first faults: {late:?}\n{report}",
        late.len()
    );
    assert!(
        failed.len() * 100 <= samples.len(),
        "more than 1 % failed: {report}"
    );
}

/// The short run holds three whole fault cycles, so that its RSS drift is measured over cycles
/// and not between two samples; the 30-minute run keeps 120 s cycles.
#[test]
fn the_short_run_compares_rss_over_three_whole_cycles() {
    let probe = |t: f64| Probe {
        t,
        phase: Phase::Healthy,
        rss_kib: 1000,
        fds: 0,
        threads: 0,
        upstream_conns: 0,
        client_conns: 0.0,
        series: Series::of(""),
    };
    for (minutes, cycle, whole) in [(2.0, 30.0, 3), (5.0, 90.0, 3), (30.0, 120.0, 14)] {
        let schedule = Schedule::for_run(minutes * 60.0);
        assert_eq!(schedule.cycle, cycle, "{minutes} min");
        // Samples as load() takes them: from t = 0, every SAMPLE_EVERY, the last one before
        // the end of the run.
        let probes: Vec<Probe> = (0..)
            .map(|k| k as f64 * SAMPLE_EVERY + 0.1)
            .take_while(|t| *t < minutes * 60.0)
            .map(probe)
            .collect();
        let cycles = schedule.rss_by_cycle(&probes);
        assert_eq!(cycles.len(), whole, "{minutes} min");
        assert!(cycle_drift(&cycles).is_some(), "{minutes} min");
    }
    assert_eq!(Schedule::for_run(1800.0).first_faults_seen(), 105.0);
    let short = Schedule::for_run(120.0);
    assert_eq!(short.first_faults_seen(), 75.0);
    let phases: Vec<Phase> = [10.0, 25.0, 35.0, 45.0, 55.0]
        .map(|t| short.phase(t))
        .to_vec();
    assert_eq!(
        phases,
        [
            Phase::Healthy,
            Phase::Blackhole,
            Phase::Refused,
            Phase::Healthy,
            Phase::Blackhole
        ]
    );
}
