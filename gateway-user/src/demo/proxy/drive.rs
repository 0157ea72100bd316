//! The demo's run: steady load from the client namespace, the fault schedule applied and
//! repaired, and the live report read from `/status` and the JSON access log.

use super::{
    report::{AccessLogTail, clip, second_line},
    *,
};
use crate::proxy::admin::status::{ClusterStatus, EndpointStatus};

/// The load, the fault schedule and the live report, in the client namespace.
#[expect(
    clippy::too_many_arguments,
    reason = "the demo's pieces, borrowed from `run`"
)]
pub(super) async fn drive(
    rate: u32,
    total: f64,
    lab: &Lab,
    servers: &[HttpServer],
    names: &BTreeMap<SocketAddr, String>,
    by_index: &[SocketAddr],
    access_log: &Path,
    phases: &mut [Phase],
) -> anyhow::Result<Tally> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(lab, rate, total, started, stop.clone(), tx)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut live = Live {
        lab,
        servers,
        names,
        by_index,
        phases,
        tally: Tally::default(),
        seen_changes: HashSet::new(),
        deadlines_shown: false,
        log: AccessLogTail::new(access_log),
        second: Vec::new(),
        next_line: 1.0,
        failures_shown: 0,
    };
    let mut interrupted = false;
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = sigint.recv() => interrupted = true,
            _ = sigterm.recv() => interrupted = true,
        }
        if interrupted {
            println!("\ninterrupted: cleaning up the lab");
            break;
        }
        let t = started.elapsed().as_secs_f64();
        live.apply_schedule(t, started)?;
        live.take_outcomes(t, &mut rx);
        live.show_kept(t);
        if let Some(status) = fetch_status(&client).await
            && let Some(cluster) = status.clusters.first()
        {
            live.show_decisions(t, cluster);
        }
        if t >= total + 0.5 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // The requests still in flight: wait for them (at most the client timeout), until the
    // load thread and its requests have all hung up.
    let drain_until = Instant::now() + CLIENT_TIMEOUT + Duration::from_secs(1);
    while !interrupted && Instant::now() < drain_until {
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(o)) => live.tally.count(&o),
            _ => break,
        }
    }
    // Its last requests ended (or timed out) above.
    let _ = load.join();
    if interrupted {
        bail!("interrupted");
    }
    Ok(live.tally)
}

/// The load: `rate` GETs a second for `total` seconds (or until `stop`), each outcome sent on
/// `tx`. It runs on a thread of its own (in the client namespace), so that a slow fault
/// injection (iptables waits for the host-wide xtables lock, which other labs may hold) never
/// holds the requests back.
fn start_load(
    lab: &Lab,
    rate: u32,
    total: f64,
    started: Instant,
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::UnboundedSender<Outcome>,
) -> anyhow::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    lab.client()
        .spawn_thread("demo-load", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(5))
                    .build_http();
                let mut inflight = tokio::task::JoinSet::new();
                let mut tick =
                    tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while started.elapsed().as_secs_f64() < total && !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let (client, tx) = (client.clone(), tx.clone());
                    inflight.spawn(async move {
                        let _ = tx.send(one_request(&client).await);
                    });
                }
                // Every request sent gets its outcome (each ends within the client timeout).
                while inflight.join_next().await.is_some() {}
            });
            std::io::Result::Ok(())
        })
        .context("starting the load in the client namespace")
}

/// One GET through the gateway, as the client saw it.
async fn one_request(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
) -> Outcome {
    let t = Instant::now();
    let uri: hyper::Uri = format!("http://{LISTEN}/demo").parse().expect("a URI");
    match tokio::time::timeout(CLIENT_TIMEOUT, client.get(uri)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let error = resp
                .headers()
                .get("x-gateway-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Outcome {
                latency: t.elapsed(),
                status: Some(status),
                error,
                body: body.lines().next().unwrap_or("").to_owned(),
            }
        }
        Ok(Err(e)) => Outcome {
            latency: t.elapsed(),
            status: None,
            error: String::new(),
            body: format!("client error: {e}"),
        },
        Err(_) => Outcome {
            latency: t.elapsed(),
            status: None,
            error: String::new(),
            body: format!("no answer within {CLIENT_TIMEOUT:?}"),
        },
    }
}

impl Tally {
    /// One outcome: a 200, an answer of the gateway's with its reason, or neither.
    fn count(&mut self, o: &Outcome) {
        self.sent += 1;
        match (o.status, o.error.is_empty()) {
            (Some(200), _) => self.ok += 1,
            (Some(_), false) => self.explained += 1,
            _ => self.unexplained += 1,
        }
    }
}

/// What the live report has shown and counted so far.
struct Live<'a> {
    lab: &'a Lab,
    servers: &'a [HttpServer],
    names: &'a BTreeMap<SocketAddr, String>,
    by_index: &'a [SocketAddr],
    phases: &'a mut [Phase],
    tally: Tally,
    seen_changes: HashSet<(SocketAddr, u64, &'static str)>,
    deadlines_shown: bool,
    log: AccessLogTail,
    /// This second's outcomes, for its summary line.
    second: Vec<Outcome>,
    next_line: f64,
    failures_shown: usize,
}

impl Live<'_> {
    /// The fault schedule: each phase's fault put in place at its start and repaired at its
    /// stop.
    fn apply_schedule(&mut self, t: f64, started: Instant) -> anyhow::Result<()> {
        for p in self.phases.iter_mut() {
            if p.applied_unix_ms.is_none() && t >= p.start {
                let up = &self.lab.upstreams()[p.upstream];
                match p.fault {
                    DemoFault::SlowBackend => {
                        self.servers[p.upstream].set_behaviour(HttpBehaviour::slow(SLOW_BACKEND))
                    }
                    f => p.guard = Some(up.apply(net_fault(f)).context("injecting a fault")?),
                }
                // Time to eject counts from when the fault is in place.
                p.applied_unix_ms = Some(unix_ms());
                let t = started.elapsed().as_secs_f64();
                println!(
                    "\n{t:6.2} s  ✂  {} {}: {}\n           {}",
                    up.name(),
                    up.addr_v4(UPSTREAM_PORT),
                    p.fault,
                    p.fault.expectation()
                );
            }
            if p.applied_unix_ms.is_some() && p.cleared_unix_ms.is_none() && t >= p.stop {
                let up = &self.lab.upstreams()[p.upstream];
                p.cleared_unix_ms = Some(unix_ms());
                match p.fault {
                    DemoFault::SlowBackend => {
                        self.servers[p.upstream].set_behaviour(HttpBehaviour::immediate())
                    }
                    _ => {
                        if let Some(g) = p.guard.take() {
                            g.clear().context("removing a fault")?;
                        }
                    }
                }
                println!("{t:6.2} s  ✔  {} repaired", up.name());
            }
        }
        Ok(())
    }

    /// What the clients got: counted, and the first failures shown.
    fn take_outcomes(&mut self, t: f64, rx: &mut tokio::sync::mpsc::UnboundedReceiver<Outcome>) {
        while let Ok(o) = rx.try_recv() {
            self.tally.count(&o);
            match (o.status, o.error.is_empty()) {
                (Some(200), _) => {}
                (Some(_), false) => {
                    if self.failures_shown < 6 {
                        self.failures_shown += 1;
                        println!(
                            "{t:6.2} s  ✗  client got {} {}: {}",
                            o.status.unwrap_or(0),
                            o.error,
                            clip(&o.body, 200)
                        );
                    }
                }
                _ => println!(
                    "{t:6.2} s  ✗  UNEXPLAINED failure ({}): {}",
                    o.status.map_or("no status".to_owned(), |s| s.to_string()),
                    clip(&o.body, 200)
                ),
            }
            self.second.push(o);
        }
    }

    /// Requests that a failed attempt or a hedge kept from failing, from the access log.
    fn show_kept(&mut self, t: f64) {
        for line in self.log.new_lines() {
            if line["status"] != 200 {
                continue;
            }
            let errors: Vec<&str> = line["attempt_errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            let hedged = line["hedged"] == true;
            let failed: Vec<(usize, &str)> = errors
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, e)| *e != "-")
                .collect();
            if failed.is_empty() && !hedged {
                continue;
            }
            self.tally.kept += 1;
            let endpoints: Vec<String> = line["endpoints"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .map(|s| {
                            s.parse::<SocketAddr>()
                                .ok()
                                .and_then(|a| self.names.get(&a).cloned())
                                .unwrap_or_else(|| s.to_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            if let Some(p) = self
                .phases
                .iter_mut()
                .rev()
                .find(|p| p.applied_unix_ms.is_some())
                && p.kept_shown < KEPT_SHOWN
            {
                p.kept_shown += 1;
                let mut s = String::new();
                for (i, e) in &failed {
                    let _ = write!(s, "{} {e}, ", endpoints.get(*i).map_or("?", String::as_str));
                }
                let _ = write!(
                    s,
                    "{} → 200 from {}",
                    if hedged { "hedged" } else { "retried" },
                    endpoints.last().map_or("?", String::as_str)
                );
                println!("{t:6.2} s  ↻  request kept from failing: {s}");
            }
        }
    }

    /// What the gateway decided, from `/status`: the measured connect deadlines (once), each
    /// health change, the hedges of a broken endpoint, and a line a second.
    fn show_decisions(&mut self, t: f64, cluster: &ClusterStatus) {
        if !self.deadlines_shown
            && cluster.endpoints.iter().all(|e| {
                e.connect_deadline_source
                    == crate::proxy::admin::status::ConnectDeadlineSource::Measured
            })
        {
            self.deadlines_shown = true;
            let list: Vec<String> = cluster
                .endpoints
                .iter()
                .map(|e| {
                    format!(
                        "{} {:.0} ms (SYN-RTT p99 {})",
                        self.names.get(&e.address).map_or("?", String::as_str),
                        e.connect_deadline_ms,
                        e.syn_rtt
                            .p99_us
                            .map_or("-".to_owned(), |u| format!("{:.2} ms", u as f64 / 1e3))
                    )
                })
                .collect();
            println!(
                "{t:6.2} s  ⏱  connect deadlines measured from the kernel's SYN-RTT (instead of the {CONNECT_TIMEOUT_MS} ms timeout): {}",
                list.join(", ")
            );
        }
        for ep in &cluster.endpoints {
            self.show_changes(t, ep);
        }
        if t >= self.next_line {
            self.next_line += 1.0;
            println!("{}", second_line(t, &self.second, cluster, self.names));
            self.second.clear();
        }
    }

    /// One endpoint's new health changes, folded into its phase; and its phase's hedges.
    fn show_changes(&mut self, t: f64, ep: &EndpointStatus) {
        let name = self.names.get(&ep.address).map_or("?", String::as_str);
        let index = self.by_index.iter().position(|a| *a == ep.address);
        for c in &ep.history.changes {
            if !self
                .seen_changes
                .insert((ep.address, c.at_unix_ms, c.event.name()))
            {
                continue;
            }
            let phase = index.and_then(|i| self.phases.iter_mut().find(|p| p.upstream == i));
            let mark = match c.event {
                HealthEventKind::Ejected => "⛔",
                HealthEventKind::Recovered => "✅",
                HealthEventKind::Suspect => "⚠ ",
                _ => "· ",
            };
            if let Some(p) = phase {
                if let Some(applied) = p.applied_unix_ms {
                    record(p, applied, c.event, c.reason, c.at_unix_ms);
                } else if c.event == HealthEventKind::Ejected {
                    // An ejection of an endpoint nobody broke yet.
                    if let Some(r) = c.reason {
                        p.seen.wrong_reasons.push(r);
                    }
                }
            }
            if c.event == HealthEventKind::Probing {
                continue;
            }
            println!(
                "{t:6.2} s  {mark} {name} {}{}{}: {}",
                c.event.name(),
                c.reason.map_or(String::new(), |r| format!(" {}", r.name())),
                if c.event == HealthEventKind::Ejected {
                    ep.ejected_until_unix_ms
                        .map(|u| {
                            format!(" for {:.1} s", u.saturating_sub(c.at_unix_ms) as f64 / 1e3)
                        })
                        .unwrap_or_default()
                } else {
                    String::new()
                },
                clip(&c.detail, 240)
            );
        }
        if let Some(i) = index
            && let Some(p) = self.phases.iter_mut().find(|p| p.upstream == i)
            && let Some(applied) = p.applied_unix_ms
        {
            let from = applied / 1000;
            let s = &ep.history.series;
            p.seen.hedges = s
                .hedges
                .iter()
                .enumerate()
                .filter(|(k, _)| s.first_unix_s + *k as u64 >= from)
                .map(|(_, h)| u64::from(*h))
                .sum();
        }
    }
}

/// Folds one health change of a broken endpoint into its phase's observations.
pub(super) fn record(
    p: &mut Phase,
    applied_unix_ms: u64,
    event: HealthEventKind,
    reason: Option<Reason>,
    at_unix_ms: u64,
) {
    match event {
        HealthEventKind::Ejected => {
            if let Some(r) = reason {
                p.seen.ejected(
                    p.fault,
                    r,
                    at_unix_ms.saturating_sub(applied_unix_ms) as f64 / 1e3,
                );
            }
        }
        HealthEventKind::Recovered => {
            if let Some(cleared) = p.cleared_unix_ms
                && at_unix_ms >= cleared
            {
                p.seen.recovered_after = Some((at_unix_ms - cleared) as f64 / 1e3);
            }
        }
        _ => {}
    }
}

pub(super) fn net_fault(f: DemoFault) -> Fault {
    let port = UPSTREAM_PORT;
    match f {
        DemoFault::Blackhole => Fault::Blackhole { port },
        DemoFault::Refuse => Fault::Refuse { port },
        DemoFault::SlowAccept => Fault::SynAckDelay {
            port,
            delay: SYN_ACK_DELAY,
        },
        // Not a network fault: the server's behaviour changes.
        DemoFault::SlowBackend => Fault::Refuse { port },
    }
}

pub(super) async fn fetch_status(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
) -> Option<Status> {
    let uri: hyper::Uri = format!("http://{ADMIN}/status").parse().ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(1), client.get(uri))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}
