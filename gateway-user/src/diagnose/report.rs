//! What `gateway diagnose` prints for one target: a human-readable block, or with `--json` one
//! object per line. The JSON fields `target`, `verdict`, `confidence`, `evidence`,
//! `measurements` and `next_steps` are a contract; `alternatives` holds the other verdicts
//! that applied, ranked, in the same shape:
//!
//! ```text
//! {"target": "10.77.1.2:8080", "verdict": "filtered", "confidence": 0.99,
//!  "evidence": ["5/5 SYNs to 10.77.1.2:8080 unanswered after 1 SYN retransmit each: no SYN-ACK,
//!               no RST, no ICMP; the kernel gave up with ETIMEDOUT after a median 3.04 s … [kernel]"],
//!  "next_steps": ["look for a DROP on tcp/8080: …", …],
//!  "alternatives": [{"verdict": …, "confidence": …, "evidence": […], "next_steps": […]}],
//!  "measurements": {"kernel_signals": true, "resolution": {…}, "count": 5,
//!                   "connect_deadline_ms": 3300, "connect_deadline_source": "kernel",
//!                   "syn_budget": {…}, "local_port_range": [32768, 60999], "http_path": null,
//!                   "addresses": [{"address": …, "summary": {…}, "attempts": [{"cookie": …,
//!                   "outcome": "timeout", "source": "kernel", "errno": "ETIMEDOUT",
//!                   "elapsed_us": …, "syn_retransmits": 1, "syn_rtt_us": null}, …]}], …},
//!  "elapsed_ms": 3410}
//! ```
//!
//! `measurements` is [`TargetMeasurements`], described field by field in [`super::measure`].

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    classify::{Verdict, VerdictName, fmt_us},
    measure::{DeadlineSource, TargetMeasurements},
};

/// One target's result.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    pub target: String,
    pub verdict: VerdictName,
    pub confidence: f64,
    pub evidence: Vec<String>,
    pub next_steps: Vec<String>,
    /// The other verdicts that applied, most confident first.
    pub alternatives: Vec<Verdict>,
    pub measurements: TargetMeasurements,
    /// Wall time spent on this target, resolution included.
    pub elapsed_ms: u64,
}

impl TargetReport {
    /// `ranked` is [`super::classify::classify`]'s output; an empty list (nothing measured)
    /// reads as unhealthy with no confidence.
    pub fn new(
        target: String,
        mut ranked: Vec<Verdict>,
        measurements: TargetMeasurements,
        elapsed: Duration,
    ) -> TargetReport {
        let top = if ranked.is_empty() {
            Verdict {
                verdict: VerdictName::Unreachable,
                confidence: 0.0,
                evidence: vec!["nothing could be measured".to_owned()],
                next_steps: Vec::new(),
            }
        } else {
            ranked.remove(0)
        };
        TargetReport {
            target,
            verdict: top.verdict,
            confidence: top.confidence,
            evidence: top.evidence,
            next_steps: top.next_steps,
            alternatives: ranked,
            measurements,
            elapsed_ms: elapsed.as_millis() as u64,
        }
    }

    pub fn healthy(&self) -> bool {
        self.verdict == VerdictName::Healthy
    }

    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("reports always serialise")
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} (confidence {:.2})",
            self.target, self.verdict, self.confidence
        );
        let _ = writeln!(s, "  evidence:");
        for e in &self.evidence {
            let _ = writeln!(s, "    - {e}");
        }
        if !self.next_steps.is_empty() {
            let _ = writeln!(s, "  next steps:");
            for n in &self.next_steps {
                let _ = writeln!(s, "    - {n}");
            }
        }
        if !self.alternatives.is_empty() {
            let _ = writeln!(s, "  also considered:");
            for a in &self.alternatives {
                let _ = writeln!(
                    s,
                    "    - {} ({:.2}): {}",
                    a.verdict,
                    a.confidence,
                    a.evidence.first().map(String::as_str).unwrap_or("")
                );
            }
        }
        let _ = writeln!(s, "  measured: {}", self.measured_line());
        // Where the kernel measured enough handshakes, their spread at a glance.
        for a in &self.measurements.addresses {
            let samples: Vec<u64> = a
                .attempts
                .iter()
                .chain(&a.patient_attempts)
                .filter_map(|t| t.syn_rtt_us)
                .collect();
            if let Some(h) = super::histogram::render(&samples) {
                let _ = writeln!(
                    s,
                    "  SYN-RTT of {} ({} handshakes, {}):",
                    a.address,
                    samples.len(),
                    if self.measurements.kernel_signals {
                        "SYN to SYN-ACK, kernel"
                    } else {
                        "connect() to writable, userspace"
                    }
                );
                s.push_str(&h);
            }
        }
        s
    }

    fn measured_line(&self) -> String {
        let m = &self.measurements;
        let r = &m.resolution;
        let mut parts = Vec::new();
        if let Some(err) = &r.error {
            parts.push(format!(
                "resolving {} failed after {}: {err}",
                r.host,
                fmt_us(r.elapsed_us)
            ));
        } else if r.elapsed_us > 0 {
            parts.push(format!(
                "{} resolved in {} to {}",
                r.host,
                fmt_us(r.elapsed_us),
                r.addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !m.addresses.is_empty() {
            parts.push(format!(
                "{} connects to each of {} in {:.1} s",
                m.count,
                m.addresses
                    .iter()
                    .map(|a| a.address.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.elapsed_ms as f64 / 1000.0
            ));
            let b = &m.syn_budget;
            parts.push(match m.connect_deadline_source {
                DeadlineSource::Configured => {
                    format!("connect deadline {} ms (configured)", m.connect_deadline_ms)
                }
                DeadlineSource::Kernel => format!(
                    "connect deadline {} ms (the kernel's SYN budget: tcp_syn_retries={}, \
                     tcp_syn_linear_timeouts={})",
                    m.connect_deadline_ms, b.tcp_syn_retries, b.tcp_syn_linear_timeouts
                ),
            });
        }
        if let Some(path) = &m.http_path {
            parts.push(format!(
                "GET {path} with a {} ms response timeout",
                m.response_timeout_ms.unwrap_or(0)
            ));
        }
        parts.push(if m.kernel_signals {
            "kernel signals on".to_owned()
        } else {
            "kernel signals OFF (why: see evidence)".to_owned()
        });
        parts.join("; ")
    }
}

/// What the probes are doing, as the progress line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `--count` connects to every address.
    Connects,
    /// The few connects with the kernel's own budget, after a configured deadline cut some
    /// short.
    PatientConnects,
    /// The few connects to another port of a host that answered nothing.
    OtherPort,
}

impl Phase {
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Connects => "connects",
            Phase::PatientConnects => "patient connects",
            Phase::OtherPort => "connects to another port",
        }
    }
}

/// A one-line progress indicator on stderr, drawn only when stderr is a terminal.
pub struct Progress {
    tty: bool,
    total: usize,
    done: usize,
    phase: Option<Phase>,
    start: Instant,
    drawn: Instant,
}

/// How often [`Progress::tick`] redraws (the elapsed time moves on while probes wait).
const REDRAW_EVERY: Duration = Duration::from_millis(200);

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            total: 0,
            done: 0,
            phase: None,
            start: Instant::now(),
            drawn: Instant::now(),
        }
    }

    /// Starts a phase of `total` steps.
    pub fn phase(&mut self, phase: Phase, total: usize) {
        self.phase = Some(phase);
        self.total = total;
        self.done = 0;
        self.draw();
    }

    pub fn step(&mut self) {
        self.done += 1;
        self.draw();
    }

    /// Redraws now and then, so a terminal sees time pass while probes wait.
    pub fn tick(&mut self) {
        if self.drawn.elapsed() >= REDRAW_EVERY {
            self.draw();
        }
    }

    fn draw(&mut self) {
        if !self.tty {
            return;
        }
        self.drawn = Instant::now();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2Kdiagnose: {} {}/{} ({:.1} s)",
            self.phase.map_or("", Phase::name),
            self.done,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
        let _ = err.flush();
    }

    /// Erases the line.
    pub fn clear(&self) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}
