//! What the demo prints: the once-a-second line, the access-log tail it reads decisions from,
//! and the judged summary.

use super::*;

/// The once-a-second line: the clients' last second and each endpoint's state and deadline.
pub(super) fn second_line(
    t: f64,
    last: &[Outcome],
    cluster: &crate::proxy::admin::status::ClusterStatus,
    names: &BTreeMap<SocketAddr, String>,
) -> String {
    let ok = last.iter().filter(|o| o.status == Some(200)).count();
    let mut lat: Vec<Duration> = last.iter().map(|o| o.latency).collect();
    lat.sort();
    let p99 = lat
        .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .map_or("-".to_owned(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        });
    let mut s = format!(
        "{t:6.2} s  │ {:>3} req  {:>3} ok  {:>2} failed  p99 {p99:>8} │",
        last.len(),
        ok,
        last.len() - ok
    );
    for e in &cluster.endpoints {
        let name = names
            .get(&e.address)
            .map_or("?", String::as_str)
            .trim_start_matches("upstream-");
        let state = match e.state {
            State::Healthy => "ok",
            State::Slow => "SLOW",
            State::Suspect => "suspect",
            State::Ejected => "EJECTED",
            State::Probing => "probing",
        };
        let _ = write!(s, " u{name} {state} {:.0}ms", e.connect_deadline_ms);
    }
    s
}

pub(super) fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut c: String = s.chars().take(n).collect();
        c.push('…');
        c
    }
}

/// The JSON access log, read from where the last read stopped.
pub(super) struct AccessLogTail {
    path: PathBuf,
    offset: u64,
}

impl AccessLogTail {
    pub(super) fn new(path: &Path) -> AccessLogTail {
        AccessLogTail {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    pub(super) fn new_lines(&mut self) -> Vec<serde_json::Value> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut reader = BufReader::new(f);
        let mut line = String::new();
        while let Ok(n) = reader.read_line(&mut line) {
            // A partial last line is read again next time.
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            self.offset += n as u64;
            if let Ok(v) = serde_json::from_str(&line) {
                out.push(v);
            }
            line.clear();
        }
        out
    }
}

pub(super) fn summary(
    tally: &Tally,
    phases: &[Phase],
    names: &BTreeMap<SocketAddr, String>,
    by_index: &[SocketAddr],
    kernel: bool,
) -> ExitCode {
    println!("\nSummary");
    println!(
        "  requests: {} sent, {} answered 200 ({} of them kept from failing by a retry or a hedge)",
        tally.sent, tally.ok, tally.kept
    );
    println!(
        "  failures the clients saw: {} — {} explained by the gateway (x-gateway-error with the kernel's evidence), {} unexplained",
        tally.failed(),
        tally.explained,
        tally.unexplained
    );
    println!(
        "\n  {:<14} {:<11} {:<25} {:<11} gateway's decision",
        "fault", "upstream", "time to eject", "back after"
    );
    let mut missed = 0;
    for p in phases {
        let name = names.get(&by_index[p.upstream]).map_or("?", String::as_str);
        let verdict = judge(p.fault, &p.seen);
        let eject = p.seen.first_ejection.map_or("-".to_owned(), |(s, r)| {
            format!("{:.2} s ({})", s, r.name())
        });
        let back = p
            .seen
            .recovered_after
            .map_or("-".to_owned(), |s| format!("{s:.2} s"));
        missed += usize::from(!verdict.explained());
        let (mark, words) = match &verdict {
            Verdict::Explained(w) => ("✓", w.clone()),
            Verdict::Missed(w) => ("✗", format!("MISSED: {w}")),
        };
        println!(
            "  {mark} {:<12} {:<11} {:<25} {:<11} {words}",
            p.fault.short(),
            name,
            eject,
            back
        );
    }
    if !kernel {
        println!("\n  (no kernel signals: the gateway decided on userspace timing alone)");
    }
    if missed > 0 || tally.unexplained > 0 {
        println!(
            "\n{missed} fault(s) missed, {} unexplained failure(s)",
            tally.unexplained
        );
        return ExitCode::FAILURE;
    }
    println!("\nEvery fault was explained by the gateway's decisions.");
    ExitCode::SUCCESS
}
