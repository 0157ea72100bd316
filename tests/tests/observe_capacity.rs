//! Privileged tests of the kernel side's limits through `gateway observe`, each in a cgroup
//! of its own (so other processes on the host do not count):
//!
//! - more destinations than the kernel's LRU table holds: it evicts, and the counts stay
//!   consistent (every destination inserted once = held + evicted; every connect is a record
//!   or a counted loss), exported as metrics;
//! - a ring buffer overrun under a connect storm is counted, logged and exported, and the
//!   drain goes on (a connect after the storm is still reported);
//! - connects in flight that lose their record, because more connects started meanwhile than
//!   the kernel's table of records holds (`--max-connections`), are reported by the kernel
//!   through aya-log, naming the map and the socket, rate-limited, and every one is counted:
//!   each connect is a record or a counted loss.
//!
//! The long version (1,000,000 destinations, RSS at 100,000) is `cargo xtask capacity`.
//! Loopback and test-made namespaces only; never skipped without root (they fail).

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use gateway_testkit::root::require_root;

fn gateway_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_connect-probe")).with_file_name("gateway");
    assert!(
        bin.exists(),
        "{} is missing: cargo build --all-targets",
        bin.display()
    );
    bin
}

/// A cgroup v2 directory of the test's own, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn create(label: &str) -> TestCgroup {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let root = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .min_by_key(|p| p.as_os_str().len())
            .expect("cgroup v2 is mounted");
        let path = root.join(format!("gateway-test-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap();
        TestCgroup(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The spray processes have exited by now; retry briefly while the kernel reaps them.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `gateway observe --json` attached to a cgroup, with a metrics listener.
struct Observe {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    metrics: SocketAddr,
}

impl Observe {
    fn start(cgroup: &TestCgroup, extra: &[&str]) -> Observe {
        let metrics: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut child = Command::new(gateway_bin())
            .args(["observe", "--json", "--join-window-ms", "0", "--cgroup"])
            .arg(&cgroup.0)
            .args(["--metrics", &metrics.to_string()])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (err, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let obs = Observe {
            child,
            lines,
            stderr,
            metrics,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while !obs.stderr_text().contains("observer attached") {
            assert!(
                Instant::now() < end,
                "observe did not attach:\n{}",
                obs.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        obs
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The metric samples, by `name{labels}`.
    fn metrics(&self) -> HashMap<String, f64> {
        let Ok(mut s) = TcpStream::connect(self.metrics) else {
            return HashMap::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines()
            .filter(|l| l.starts_with("gateway_"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// Sum of every sample of a family.
    fn family_sum(m: &HashMap<String, f64>, family: &str) -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(family) && k[family.len()..].starts_with('{'))
            .map(|(_, v)| v)
            .sum()
    }

    /// Waits until `cond` holds for the metrics (the observer counts the kernel's table every
    /// few seconds in JSON mode).
    fn wait_metrics(
        &self,
        what: &str,
        cond: impl Fn(&HashMap<String, f64>) -> bool,
    ) -> HashMap<String, f64> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let m = self.metrics();
            if cond(&m) {
                return m;
            }
            assert!(
                Instant::now() < end,
                "{what}: never true; metrics: {:?}\nstderr:\n{}",
                m.iter()
                    .filter(|(k, _)| k.contains("observer"))
                    .collect::<Vec<_>>(),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Observe {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The kernel's table of connect records in the slot tests (`--max-connections`).
const SLOTS: u32 = 16;
/// Connects in flight whose record a later connect took.
const SLOT_REUSED: &str = "gateway_observer_kernel_anomalies_total{kind=\"slot_reused\"}";

fn spray(cgroup: &TestCgroup, args: &[&str]) -> u32 {
    let out = Command::new(env!("CARGO_BIN_EXE_connect-spray"))
        .arg("--cgroup")
        .arg(&cgroup.0)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "connect-spray: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn privileged_lru_evicts_and_the_counts_stay_consistent() {
    require_root();
    const TABLE: u32 = 1024;
    const DESTINATIONS: u32 = 20_000;
    let cg = TestCgroup::create("lru");
    let obs = Observe::start(&cg, &["--max-destinations", &TABLE.to_string()]);
    assert_eq!(
        spray(
            &cg,
            &["--first", "127.2.0.0", "--count", &DESTINATIONS.to_string()]
        ),
        DESTINATIONS
    );
    let m = obs.wait_metrics("every destination is held or evicted", |m| {
        m.get("gateway_observer_destinations_tracked")
            .copied()
            .unwrap_or(0.0)
            + m.get("gateway_observer_destinations_evicted_total")
                .copied()
                .unwrap_or(0.0)
            == f64::from(DESTINATIONS)
    });
    let tracked = m["gateway_observer_destinations_tracked"];
    let evicted = m["gateway_observer_destinations_evicted_total"];
    assert!(
        tracked > 0.0 && tracked <= f64::from(TABLE),
        "the LRU holds at most its {TABLE} entries: {tracked}"
    );
    assert!(
        evicted >= f64::from(DESTINATIONS - TABLE),
        "evicted {evicted}"
    );
    // Every connect is a record or a counted loss.
    let records = Observe::family_sum(&m, "gateway_connect_attempts_total");
    let lost = m["gateway_observer_events_lost_total"];
    assert_eq!(
        records + lost,
        f64::from(DESTINATIONS),
        "records {records} + lost {lost}"
    );
    let json = obs
        .lines
        .try_iter()
        .filter(|l| l.contains("\"dst\":\"127.2."))
        .count();
    assert_eq!(json as f64, records, "one JSON line per record");
    assert_eq!(
        m.get("gateway_observer_kernel_anomalies_total{kind=\"dest_insert_failed\"}"),
        Some(&0.0),
        "insert failures are exported (and there were none)"
    );
    eprintln!(
        "lru: {DESTINATIONS} destinations into a {TABLE}-entry table: {tracked} held, {evicted} evicted, {records} records, {lost} lost"
    );
}

#[test]
fn privileged_ring_buffer_overrun_is_reported_and_the_drain_goes_on() {
    require_root();
    const STORM: u32 = 20_000;
    let cg = TestCgroup::create("ring");
    // 4 KiB holds about 39 records; the storm makes thousands per 25 ms drain.
    let obs = Observe::start(&cg, &["--ring-buffer-kib", "4"]);
    assert_eq!(
        spray(
            &cg,
            &[
                "--same",
                "--first",
                "127.3.0.1",
                "--count",
                &STORM.to_string()
            ]
        ),
        STORM
    );
    let m = obs.wait_metrics(
        "every connect of the storm is a record or a counted loss",
        |m| {
            Observe::family_sum(m, "gateway_connect_attempts_total")
                + m.get("gateway_observer_events_lost_total")
                    .copied()
                    .unwrap_or(0.0)
                == f64::from(STORM)
        },
    );
    let lost = m["gateway_observer_events_lost_total"];
    assert!(
        lost > 0.0,
        "a 4 KiB ring must overflow under {STORM} connects"
    );
    assert!(
        obs.stderr_text()
            .contains("the kernel dropped connect records"),
        "the loss is logged:\n{}",
        obs.stderr_text()
    );
    // The drain is not wedged: a connect after the storm is still reported.
    let _ = obs.lines.try_iter().count();
    spray(&cg, &["--first", "127.3.0.2", "--count", "1"]);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if obs
            .lines
            .try_iter()
            .any(|l| l.contains("\"dst\":\"127.3.0.2:9\""))
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "no record of the connect after the storm"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "ring: {STORM} connects into a 4 KiB ring: {lost} records lost and counted, drain still running"
    );
}

/// A connect in flight keeps its record while later connects, on any CPU, land in its slot:
/// each record has four candidate slots, and a new one takes a candidate whose connect is done.
/// With one slot per cookie, the 48 connects below (three times around a table of 16) would
/// take the held connect's slot.
#[test]
fn privileged_a_connect_in_flight_keeps_its_record_while_later_connects_pass_its_slot() {
    require_root();
    const MEANWHILE: u32 = 3 * SLOTS;
    let cg = TestCgroup::create("ways");
    let obs = Observe::start(&cg, &["--max-connections", &SLOTS.to_string()]);
    let args = [
        "--in-flight",
        "--first",
        "127.4.0.2",
        "--count",
        "1",
        "--meanwhile",
        &MEANWHILE.to_string(),
    ];
    assert_eq!(spray(&cg, &args), 1);
    let (held, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let m = obs.wait_metrics(
        "the held connect and every refused one are accounted for",
        |m| {
            for l in obs.lines.try_iter() {
                if l.contains("\"dst\":\"127.4.0.2:9\"") && l.contains("\"refused\"") {
                    refused.set(refused.get() + 1);
                } else if l.contains("\"dst\":\"127.4.0.2:") && !l.contains("\"established\"") {
                    held.set(held.get() + 1);
                }
            }
            let lost = m.get(SLOT_REUSED).copied().unwrap_or(0.0);
            m.contains_key(SLOT_REUSED)
                && held.get() as f64 + lost >= 1.0
                && refused.get() >= MEANWHILE
        },
    );
    assert_eq!(
        (held.get(), refused.get(), m[SLOT_REUSED]),
        (1, MEANWHILE, 0.0),
        "records of the held connect and of the refused ones, and records lost"
    );
}

#[test]
fn privileged_connects_in_flight_that_lose_their_record_are_counted_and_logged_rate_limited() {
    require_root();
    const CONNECTS: u32 = 300;
    let cg = TestCgroup::create("slots");
    let obs = Observe::start(&cg, &["--max-connections", &SLOTS.to_string()]);
    let started = Instant::now();
    // 300 connects unanswered at once, into a table of 16 records: once every slot holds a
    // connect in flight, each new connect takes one of them, so all but at most 16 lose their
    // record while in flight.
    assert_eq!(
        spray(
            &cg,
            &[
                "--in-flight",
                "--first",
                "127.4.0.1",
                "--count",
                &CONNECTS.to_string()
            ]
        ),
        CONNECTS
    );
    // The others are reported: closed while in SYN_SENT. Each connect is a record or a loss.
    let records = std::cell::Cell::new(0u32);
    let m = obs.wait_metrics("every connect is a record or a counted loss", |m| {
        let new = obs
            .lines
            .try_iter()
            .filter(|l| l.contains("\"dst\":\"127.4.0.1:") && !l.contains("\"established\""))
            .count() as u32;
        records.set(records.get() + new);
        m.get(SLOT_REUSED)
            .is_some_and(|&n| n + f64::from(records.get()) >= f64::from(CONNECTS))
    });
    let (reused, records) = (m[SLOT_REUSED], records.get());
    assert_eq!(
        f64::from(records) + reused,
        f64::from(CONNECTS),
        "{records} records and {reused} counted losses for {CONNECTS} connects"
    );
    assert!(
        reused >= f64::from(CONNECTS - SLOTS),
        "at most one record per slot survives: {reused} lost of {CONNECTS}"
    );
    let elapsed = started.elapsed();
    let end = Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let lines: Vec<String> = obs
            .stderr_text()
            .lines()
            .filter(|l| l.contains("gateway::kernel") && l.contains("kernel anomaly"))
            .map(str::to_owned)
            .collect();
        if !lines.is_empty() || Instant::now() > end {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !logged.is_empty(),
        "the kernel logged the anomaly:\n{}",
        obs.stderr_text()
    );
    let line = &logged[0];
    assert!(
        line.contains("record of a connect in flight overwritten")
            && line.contains("map SOCK_STATE")
            && line.contains("socket cookie ")
            && line.contains("to [::ffff:127.4.0.1]:"),
        "the line names the map and the socket: {line}"
    );
    // At most one line per second per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let bound = (elapsed.as_secs() + 2) * cpus;
    assert!(
        (logged.len() as u64) <= bound,
        "{} lines for {reused} anomalies in {elapsed:?}: not rate-limited (bound {bound})",
        logged.len()
    );
    let suppressed = m["gateway_observer_kernel_anomaly_logs_suppressed_total"];
    assert!(
        suppressed >= reused - bound as f64,
        "the lines not written are counted: {suppressed}"
    );
    eprintln!(
        "slots: {CONNECTS} connects in flight, {SLOTS} records: {reused} lost and counted, {records} reported, {} logged, {suppressed} suppressed: {line}",
        logged.len()
    );
}
