//! The root-cause classifier: a pure function from what `gateway diagnose` measured of one
//! target ([`TargetMeasurements`]) to a ranked list of verdicts, each with a confidence (0–1),
//! the evidence lines behind it (counts and times) and next steps (what to check, which command
//! or setting). No I/O; `classify/tests.rs` feeds it measurements.
//!
//! Here: the verdicts, the ranking and merging, and the per-address `Facts` the rules read.
//! The rules live by what they look at: failed connects (`connect_failures`), handshakes that
//! completed badly (`handshakes`), the HTTP exchange (`backend`), name resolution (`dns`); the
//! words of the evidence are in `phrases`.
//!
//! Each verdict's rule looks at one address at a time; a target with several addresses keeps,
//! per verdict, the most confident address and the evidence of all of them. `healthy` is the
//! share of clean attempts, discounted by the most confident problem, so a real problem always
//! outranks it. Evidence lines end with where their facts come from: `[kernel]` (the eBPF
//! observer's record of the attempt, joined by `SO_COOKIE`) or `[userspace]` (`connect()`'s
//! errno, the probe's clock, `TCP_INFO`).

mod accepted;
mod backend;
mod connect_failures;
mod dns;
mod handshakes;
mod phrases;

use std::time::Duration;

use serde::Serialize;

pub use self::phrases::fmt_us;
use self::{
    backend::{healthy_part, slow_backend},
    connect_failures::{filtered, port_exhaustion, refused, unreachable},
    dns::dns_failure,
    handshakes::{deadline_too_short, lossy_path, overloaded},
};
use super::measure::{
    AddressMeasurements, Attempt, AttemptOutcome, HttpExchange, TargetMeasurements,
};

/// A name that takes longer than this to resolve is a `dns_failure`.
pub const SLOW_RESOLUTION: Duration = Duration::from_secs(1);
/// A first response byte later than this (or none within the response timeout) is late.
pub const SLOW_RESPONSE: Duration = Duration::from_secs(1);
/// Share of handshakes that needed SYN retransmits from which the pattern is "consistent"
/// (`overloaded`: the endpoint drops SYNs until it has room) rather than "intermittent"
/// (`lossy_path`).
pub const CONSISTENT_SHARE: f64 = 0.8;
/// Verdicts below this confidence are left out.
pub const MIN_CONFIDENCE: f64 = 0.05;

/// The verdicts. Their names are a contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictName {
    // Declaration order = tie-break order: the more specific cause first, `healthy` last.
    DnsFailure,
    PortExhaustion,
    Refused,
    Unreachable,
    Filtered,
    DeadlineTooShort,
    Overloaded,
    LossyPath,
    SlowBackend,
    Healthy,
}

impl VerdictName {
    pub const ALL: [VerdictName; 10] = [
        VerdictName::Healthy,
        VerdictName::Refused,
        VerdictName::Filtered,
        VerdictName::Unreachable,
        VerdictName::Overloaded,
        VerdictName::LossyPath,
        VerdictName::SlowBackend,
        VerdictName::DnsFailure,
        VerdictName::PortExhaustion,
        VerdictName::DeadlineTooShort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerdictName::Healthy => "healthy",
            VerdictName::Refused => "refused",
            VerdictName::Filtered => "filtered",
            VerdictName::Unreachable => "unreachable",
            VerdictName::Overloaded => "overloaded",
            VerdictName::LossyPath => "lossy_path",
            VerdictName::SlowBackend => "slow_backend",
            VerdictName::DnsFailure => "dns_failure",
            VerdictName::PortExhaustion => "port_exhaustion",
            VerdictName::DeadlineTooShort => "deadline_too_short",
        }
    }
}

impl std::fmt::Display for VerdictName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One possible cause, with what supports it and what to do.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub verdict: VerdictName,
    /// 0–1, two decimals.
    pub confidence: f64,
    pub evidence: Vec<String>,
    pub next_steps: Vec<String>,
}

impl Verdict {
    fn new(verdict: VerdictName, confidence: f64) -> Verdict {
        Verdict {
            verdict,
            confidence: confidence.clamp(0.0, 1.0),
            evidence: Vec::new(),
            next_steps: Vec::new(),
        }
    }
}

/// Ranks every verdict that applies to `m`, most confident first. Never empty when `m` has an
/// address or a resolution error.
pub fn classify(m: &TargetMeasurements) -> Vec<Verdict> {
    let mut problems: Vec<Verdict> = Vec::new();
    let mut clean_share: Option<f64> = None;
    let mut healthy = Verdict::new(VerdictName::Healthy, 0.0);
    for a in &m.addresses {
        let f = Facts::new(m, a);
        for v in [
            port_exhaustion(&f),
            refused(&f),
            unreachable(&f),
            filtered(&f),
            deadline_too_short(&f),
            overloaded(&f),
            lossy_path(&f),
            slow_backend(&f),
        ]
        .into_iter()
        .flatten()
        {
            merge(&mut problems, v);
        }
        let (share, evidence) = healthy_part(&f);
        clean_share = Some(clean_share.map_or(share, |s: f64| s.min(share)));
        healthy.evidence.extend(evidence);
    }
    if let Some(v) = dns_failure(m) {
        merge(&mut problems, v);
    }
    let worst = problems.iter().map(|v| v.confidence).fold(0.0, f64::max);
    if let Some(share) = clean_share {
        healthy.confidence = share * (1.0 - worst);
        healthy.next_steps.push(
            "nothing to fix at the TCP level; if clients still fail, look at the application \
             (status codes, logs) or at the client's own settings"
                .to_owned(),
        );
        problems.push(healthy);
    }
    if !m.kernel_signals {
        let why = m
            .kernel_signals_missing
            .as_deref()
            .unwrap_or("not requested");
        for v in &mut problems {
            v.evidence.push(format!(
                "kernel signals off ({why}): outcomes come from connect() errors, times from \
                 the probe's clock, retransmits from TCP_INFO"
            ));
        }
    }
    for v in &mut problems {
        v.confidence = (v.confidence * 100.0).round() / 100.0;
    }
    problems.retain(|v| v.confidence >= MIN_CONFIDENCE);
    problems.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then(a.verdict.cmp(&b.verdict))
    });
    problems
}

/// Keeps one entry per verdict: the highest confidence, every address's evidence.
fn merge(into: &mut Vec<Verdict>, v: Verdict) {
    match into.iter_mut().find(|x| x.verdict == v.verdict) {
        Some(x) => {
            x.confidence = x.confidence.max(v.confidence);
            x.evidence.extend(v.evidence);
            for s in v.next_steps {
                if !x.next_steps.contains(&s) {
                    x.next_steps.push(s);
                }
            }
        }
        None => into.push(v),
    }
}

/// What the rules look at for one address.
struct Facts<'a> {
    m: &'a TargetMeasurements,
    a: &'a AddressMeasurements,
    n: usize,
    addr: String,
    ip: String,
    port: u16,
}

impl<'a> Facts<'a> {
    fn new(m: &'a TargetMeasurements, a: &'a AddressMeasurements) -> Facts<'a> {
        Facts {
            m,
            a,
            n: a.attempts.len(),
            addr: a.address.to_string(),
            ip: a.address.ip().to_string(),
            port: a.address.port(),
        }
    }

    fn with(&self, o: AttemptOutcome) -> Vec<&'a Attempt> {
        self.a.attempts.iter().filter(|x| x.outcome == o).collect()
    }

    /// Established attempts, patient ones included.
    fn established(&self) -> Vec<&'a Attempt> {
        self.a
            .attempts
            .iter()
            .chain(&self.a.patient_attempts)
            .filter(|x| x.established())
            .collect()
    }

    fn patient_established(&self) -> usize {
        self.a
            .patient_attempts
            .iter()
            .filter(|x| x.established())
            .count()
    }

    /// Attempts that nothing answered and that a longer wait would not have rescued.
    fn unanswered(&self) -> Vec<&'a Attempt> {
        let deadline_explained = self.patient_established() > 0;
        self.a
            .attempts
            .iter()
            .filter(|x| {
                x.outcome == AttemptOutcome::Timeout
                    || (x.outcome == AttemptOutcome::Deadline && !deadline_explained)
            })
            .collect()
    }

    fn http(&self) -> Vec<&'a HttpExchange> {
        self.a
            .attempts
            .iter()
            .filter_map(|x| x.http.as_ref())
            .collect()
    }
}

/// More attempts, more confidence: 1 attempt weighs 0.76, 5 or more weigh 1.
fn weight(n: usize) -> f64 {
    (0.7 + 0.06 * n as f64).min(1.0)
}

fn confidence(share: f64, n: usize) -> f64 {
    (share * weight(n)).min(0.99)
}

#[cfg(test)]
mod tests;
