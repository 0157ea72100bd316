//! The root-cause classifier: a pure function from what `gateway diagnose` measured of one
//! target ([`TargetMeasurements`]) to a ranked list of verdicts, each with a confidence (0–1),
//! the evidence lines behind it (counts and times) and next steps (what to check, which command
//! or setting). No I/O; `classify/tests.rs` feeds it measurements.
//!
//! Each verdict's rule looks at one address at a time; a target with several addresses keeps,
//! per verdict, the most confident address and the evidence of all of them. `healthy` is the
//! share of clean attempts, discounted by the most confident problem, so a real problem always
//! outranks it. Evidence lines end with where their facts come from: `[kernel]` (the eBPF
//! observer's record of the attempt, joined by `SO_COOKIE`) or `[userspace]` (`connect()`'s
//! errno, the probe's clock, `TCP_INFO`).

use std::{collections::BTreeSet, time::Duration};

use serde::Serialize;

use super::measure::{
    AddressMeasurements, Attempt, AttemptOutcome, DeadlineSource, HttpExchange, HttpOutcome,
    Percentiles, ResolutionMethod, Source, TargetMeasurements,
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
/// A configured connect deadline less than this multiple of the p99 handshake is tight.
const DEADLINE_HEADROOM: f64 = 1.25;
/// Suggested connect deadline = p99 SYN-RTT × this.
const DEADLINE_SUGGESTION_FACTOR: u64 = 2;

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

/// `0.05 ms`, `4.21 ms`, `201 ms`, `3.00 s`.
pub fn fmt_us(us: u64) -> String {
    if us < 10_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{} ms", us / 1000)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn median(values: impl IntoIterator<Item = u64>) -> Option<u64> {
    Percentiles::of(values).map(|p| p.p50)
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// "after 1 SYN retransmit each", "after 1–3 SYN retransmits", "" when unknown.
fn retransmit_phrase(attempts: &[&Attempt]) -> Option<String> {
    let known: Vec<u32> = attempts.iter().filter_map(|a| a.syn_retransmits).collect();
    let (min, max) = (known.iter().min()?, known.iter().max()?);
    Some(if *max == 0 && known.len() == attempts.len() {
        "before any SYN retransmit".to_owned()
    } else if min == max && known.len() == attempts.len() {
        if attempts.len() == 1 {
            format!(
                "after {}",
                plural(u64::from(*min), "SYN retransmit", "SYN retransmits")
            )
        } else {
            format!(
                "after {} each",
                plural(u64::from(*min), "SYN retransmit", "SYN retransmits")
            )
        }
    } else {
        format!("after {min}–{max} SYN retransmits")
    })
}

/// `[kernel]`, `[userspace]` or `[kernel 3/5, userspace 2/5]`.
fn source_tag(attempts: &[&Attempt]) -> String {
    let k = attempts
        .iter()
        .filter(|a| a.source == Source::Kernel)
        .count();
    let n = attempts.len();
    if k == n {
        "[kernel]".to_owned()
    } else if k == 0 {
        "[userspace]".to_owned()
    } else {
        format!("[kernel {k}/{n}, userspace {}/{n}]", n - k)
    }
}

fn errnos(attempts: &[&Attempt]) -> String {
    let set: BTreeSet<&str> = attempts.iter().filter_map(|a| a.errno.as_deref()).collect();
    if set.is_empty() {
        "an error".to_owned()
    } else {
        set.into_iter().collect::<Vec<_>>().join("/")
    }
}

fn port_exhaustion(f: &Facts) -> Option<Verdict> {
    let hit = f.with(AttemptOutcome::AddrUnavailable);
    if hit.is_empty() {
        return None;
    }
    let mut v = Verdict::new(
        VerdictName::PortExhaustion,
        confidence(hit.len() as f64 / f.n as f64, f.n),
    );
    v.evidence.push(format!(
        "{}/{} connects to {} failed at once with EADDRNOTAVAIL, before any SYN was sent: no \
         free local (ephemeral) port towards this destination {}",
        hit.len(),
        f.n,
        f.addr,
        source_tag(&hit)
    ));
    let range = f.m.local_port_range;
    if let Some([lo, hi]) = range {
        v.evidence.push(format!(
            "net.ipv4.ip_local_port_range is {lo}–{hi}: {} local ports for each destination \
             ip:port",
            u32::from(hi).saturating_sub(u32::from(lo)) + 1
        ));
    }
    let dst = ss_dst(f);
    v.next_steps = vec![
        format!(
            "ss -tan 'dst {dst}' | awk 'NR>1 {{print $1}}' | sort | uniq -c   # which sockets \
             hold the local ports towards {} (ESTAB, TIME-WAIT)",
            f.addr
        ),
        match range {
            Some([lo, hi]) => format!(
                "sysctl net.ipv4.ip_local_port_range   # now '{lo} {hi}'; widen it, e.g. sysctl \
                 -w net.ipv4.ip_local_port_range='1024 65535'"
            ),
            None => {
                "sysctl net.ipv4.ip_local_port_range   # widen it, e.g. '1024 65535'".to_owned()
            }
        },
        "reuse connections (HTTP keep-alive, a connection pool) instead of one connection per \
         request; sysctl net.ipv4.tcp_tw_reuse=1 lets new connects reuse TIME-WAIT ports"
            .to_owned(),
        "spread the load over more destination addresses or source IPs: a local port only has \
         to be unique per (source ip, destination ip:port)"
            .to_owned(),
    ];
    Some(v)
}

/// `ss` filter syntax for the address: `10.0.0.5:80`, `[fd00::5]:80`.
fn ss_dst(f: &Facts) -> String {
    f.addr.clone()
}

fn refused(f: &Facts) -> Option<Verdict> {
    let hit = f.with(AttemptOutcome::Refused);
    if hit.is_empty() {
        return None;
    }
    let mut v = Verdict::new(
        VerdictName::Refused,
        confidence(hit.len() as f64 / f.n as f64, f.n),
    );
    let t = median(hit.iter().map(|a| a.elapsed_us)).unwrap_or(0);
    let retx = retransmit_phrase(&hit)
        .filter(|p| !p.starts_with("before any"))
        .map(|p| format!(", {p}"))
        .unwrap_or_default();
    v.evidence.push(format!(
        "{}/{} connects to {} refused: an RST answered the SYN after a median {}{retx} \
         (ECONNREFUSED) {}",
        hit.len(),
        f.n,
        f.addr,
        fmt_us(t),
        source_tag(&hit)
    ));
    v.evidence.push(format!(
        "the host is up and its TCP stack answers, but nothing listens on port {} there, or a \
         firewall rejects the SYNs with tcp-reset",
        f.port
    ));
    v.next_steps = vec![
        format!(
            "on {}: ss -ltn 'sport = :{}'   # is anything listening on {}, and on which address \
             (127.0.0.1 only?)",
            f.ip, f.port, f.port
        ),
        format!(
            "on {}: is the service running? systemctl status <unit> and its logs (crashed, \
             restarting, bound to another port)",
            f.ip
        ),
        format!(
            "iptables -L -n -v | grep -i reject   # on {} and on firewalls in the path: a rule \
             answering tcp/{} with tcp-reset",
            f.ip, f.port
        ),
    ];
    Some(v)
}

fn unreachable(f: &Facts) -> Option<Verdict> {
    let icmp = f.with(AttemptOutcome::Unreachable);
    let other = f.with(AttemptOutcome::Error);
    if icmp.is_empty() && other.is_empty() {
        return None;
    }
    let k = icmp.len() + other.len();
    let mut v = Verdict::new(
        VerdictName::Unreachable,
        confidence(k as f64 / f.n as f64, f.n),
    );
    if !icmp.is_empty() {
        let t = median(icmp.iter().map(|a| a.elapsed_us)).unwrap_or(0);
        v.evidence.push(format!(
            "{}/{} connects to {} failed with {} after a median {}: a router, the host's \
             firewall (REJECT with icmp-host-unreachable) or this host's routing table says {} \
             cannot be reached {}",
            icmp.len(),
            f.n,
            f.addr,
            errnos(&icmp),
            fmt_us(t),
            f.ip,
            source_tag(&icmp)
        ));
    }
    if !other.is_empty() {
        v.evidence.push(format!(
            "{}/{} connects to {} failed with {} {}",
            other.len(),
            f.n,
            f.addr,
            errnos(&other),
            source_tag(&other)
        ));
    }
    v.next_steps = vec![
        format!(
            "ip route get {}   # which route and interface this host uses",
            f.ip
        ),
        format!(
            "traceroute -n -T -p {} {}   # where the path stops (or mtr -n -T -P {} {})",
            f.port, f.ip, f.port, f.ip
        ),
        format!(
            "ip neigh show {}   # on the same subnet: FAILED or INCOMPLETE means the host does \
             not answer ARP/ND (down?)",
            f.ip
        ),
        format!(
            "iptables -L -n -v | grep -i unreach   # on {}: a rule rejecting with \
             icmp-host-unreachable",
            f.ip
        ),
    ];
    Some(v)
}

fn filtered(f: &Facts) -> Option<Verdict> {
    let silent = f.unanswered();
    let denied = f.with(AttemptOutcome::Denied);
    let k = silent.len() + denied.len();
    if k == 0 {
        return None;
    }
    let mut c = confidence(k as f64 / f.n as f64, f.n);
    // Most connects completed: the silent ones are lost packets (lossy_path), not a filter.
    if f.established().len() * 2 >= f.n {
        c *= 0.5;
    }
    let mut v = Verdict::new(VerdictName::Filtered, c);
    if !silent.is_empty() {
        let timeouts: Vec<&Attempt> = silent
            .iter()
            .copied()
            .filter(|a| a.outcome == AttemptOutcome::Timeout)
            .collect();
        let cut = silent.len() - timeouts.len();
        let retx = retransmit_phrase(&silent).unwrap_or_else(|| "(SYN retransmits unknown)".into());
        let mut line = if silent.iter().all(|a| a.source == Source::Kernel) {
            format!(
                "{}/{} SYNs to {} unanswered {retx}: no SYN-ACK, no RST, no ICMP",
                silent.len(),
                f.n,
                f.addr
            )
        } else {
            format!(
                "{}/{} connects to {} got no answer {retx}: connect() neither completed nor \
                 failed with a refusal or an ICMP error",
                silent.len(),
                f.n,
                f.addr
            )
        };
        if !timeouts.is_empty() {
            let b = &f.m.syn_budget;
            line.push_str(&format!(
                "; the kernel gave up with ETIMEDOUT after a median {} (tcp_syn_retries={}, \
                 tcp_syn_linear_timeouts={})",
                fmt_us(median(timeouts.iter().map(|a| a.elapsed_us)).unwrap_or(0)),
                b.tcp_syn_retries,
                b.tcp_syn_linear_timeouts
            ));
        }
        if cut > 0 {
            line.push_str(&format!(
                "; {cut} given up at the {} ms connect deadline",
                f.m.connect_deadline_ms
            ));
        }
        line.push(' ');
        line.push_str(&source_tag(&silent));
        v.evidence.push(line);
        let p = &f.a.patient_attempts;
        if !p.is_empty() {
            let silent: Vec<&Attempt> = p.iter().filter(|a| a.outcome.unanswered()).collect();
            v.evidence.push(format!(
                "{}/{} patient connects with a {} ms deadline went unanswered too{} {}",
                silent.len(),
                p.len(),
                f.a.patient_deadline_ms.unwrap_or(0),
                retransmit_phrase(&silent)
                    .map(|r| format!(", {r}"))
                    .unwrap_or_default(),
                source_tag(&silent)
            ));
        }
    }
    if !denied.is_empty() {
        v.evidence.push(format!(
            "{}/{} connects to {} refused locally with {}: a firewall rule on this host (OUTPUT \
             chain) or a security policy blocks them {}",
            denied.len(),
            f.n,
            f.addr,
            errnos(&denied),
            source_tag(&denied)
        ));
    }
    v.next_steps = vec![
        format!(
            "look for a DROP on tcp/{}: on {} iptables -L INPUT -n -v (or nft list ruleset); in \
             a cloud, the security group and network ACL inbound rules",
            f.port, f.ip
        ),
        format!(
            "tcpdump -ni any 'host {} and tcp port {}'   # here and on {}: do the SYNs arrive, \
             does a SYN-ACK leave?",
            f.ip, f.port, f.ip
        ),
        format!(
            "is {} up? ip neigh show {} from its subnet, its console or its hypervisor",
            f.ip, f.ip
        ),
    ];
    if !denied.is_empty() {
        v.next_steps.push(
            "iptables -L OUTPUT -n -v   # on this host: a rule rejecting the connect locally"
                .to_owned(),
        );
    }
    Some(v)
}

fn deadline_too_short(f: &Facts) -> Option<Verdict> {
    if f.m.connect_deadline_source != DeadlineSource::Configured {
        return None;
    }
    let deadline_ms = f.m.connect_deadline_ms;
    let hits = f.with(AttemptOutcome::Deadline);
    let patient_ok = f.patient_established();
    let rtts = Percentiles::of(f.established().iter().filter_map(|a| a.syn_rtt_us))?;
    let mut v;
    if !hits.is_empty() && patient_ok > 0 {
        let share = hits.len() as f64 / f.n as f64;
        v = Verdict::new(
            VerdictName::DeadlineTooShort,
            ((0.55 + 0.4 * share) * weight(f.n)).min(0.99),
        );
        let retx = retransmit_phrase(&hits)
            .map(|p| format!(", {p}"))
            .unwrap_or_default();
        v.evidence.push(format!(
            "{}/{} connects to {} given up at the {deadline_ms} ms connect deadline with no RST \
             and no ICMP{retx} {}",
            hits.len(),
            f.n,
            f.addr,
            source_tag(&hits)
        ));
        let p: Vec<&Attempt> = f.a.patient_attempts.iter().collect();
        v.evidence.push(format!(
            "{patient_ok}/{} patient connects (deadline {} ms) completed, SYN-RTT {}–{} (p50 \
             {}, p99 {}): the handshake takes longer than the deadline allows {}",
            p.len(),
            f.a.patient_deadline_ms.unwrap_or(0),
            fmt_us(rtts.min),
            fmt_us(rtts.max),
            fmt_us(rtts.p50),
            fmt_us(rtts.p99),
            source_tag(&p)
        ));
    } else if rtts.p99 as f64 * DEADLINE_HEADROOM > deadline_ms as f64 * 1000.0 {
        v = Verdict::new(VerdictName::DeadlineTooShort, 0.4 * weight(f.n));
        v.evidence.push(format!(
            "p99 SYN-RTT to {} is {} (max {}), within {:.0}% of the {deadline_ms} ms connect \
             deadline: a little more latency and connects fail",
            f.addr,
            fmt_us(rtts.p99),
            fmt_us(rtts.max),
            (DEADLINE_HEADROOM - 1.0) * 100.0
        ));
    } else {
        return None;
    }
    let suggested = (rtts.p99 * DEADLINE_SUGGESTION_FACTOR).div_ceil(10_000) * 10;
    v.next_steps = vec![
        format!(
            "raise connect_timeout_ms to at least p99 SYN-RTT × {DEADLINE_SUGGESTION_FACTOR} = \
             {suggested} ms (check with: gateway diagnose {} --connect-timeout-ms {suggested})",
            f.addr
        ),
        format!(
            "or find out why the handshake takes {}: the round trip to {} (ping -c 20 {}), or a \
             server slow to answer SYNs (on {}: ss -ltn 'sport = :{}')",
            fmt_us(rtts.p50),
            f.ip,
            f.ip,
            f.ip,
            f.port
        ),
    ];
    Some(v)
}

/// Handshakes that needed SYN retransmits, and their share of all established handshakes.
fn retransmitted_handshakes<'a>(f: &Facts<'a>) -> (Vec<&'a Attempt>, usize, f64) {
    let est = f.established();
    let retx: Vec<&Attempt> = est
        .iter()
        .copied()
        .filter(|a| a.syn_retransmits.unwrap_or(0) > 0)
        .collect();
    let share = if est.is_empty() {
        0.0
    } else {
        retx.len() as f64 / est.len() as f64
    };
    (retx, est.len(), share)
}

fn overloaded(f: &Facts) -> Option<Verdict> {
    let (retx, est, share) = retransmitted_handshakes(f);
    if est < 2 || share < CONSISTENT_SHARE {
        return None;
    }
    let mut v = Verdict::new(VerdictName::Overloaded, confidence(share, est) * 0.95);
    let rtt = Percentiles::of(retx.iter().filter_map(|a| a.syn_rtt_us));
    v.evidence.push(format!(
        "{}/{est} handshakes with {} completed only {}: the first SYNs were dropped without RST \
         or ICMP, then a retransmit was answered{} {}",
        retx.len(),
        f.addr,
        retransmit_phrase(&retx).unwrap_or_default(),
        rtt.map(|p| format!(" (SYN-RTT p50 {}, max {})", fmt_us(p.p50), fmt_us(p.max)))
            .unwrap_or_default(),
        source_tag(&retx)
    ));
    v.evidence.push(
        "a consistent pattern: the endpoint answers SYNs only when it has room, as a full \
         accept queue or SYN backlog does"
            .to_owned(),
    );
    let silent = f.unanswered();
    if !silent.is_empty() {
        v.evidence.push(format!(
            "{}/{} more connects got no answer at all",
            silent.len(),
            f.n
        ));
    }
    v.next_steps = vec![
        format!(
            "on {}: ss -ltn 'sport = :{}'   # Recv-Q (connections waiting for accept()) at or \
             above Send-Q (the backlog) = accept queue full",
            f.ip, f.port
        ),
        format!(
            "on {}: nstat -az TcpExtListenOverflows TcpExtListenDrops   # growing while you \
             probe = SYNs dropped for a full queue",
            f.ip
        ),
        "let the server accept faster (more workers, an accept loop that is never blocked) or \
         raise its listen backlog: listen(fd, N) with net.core.somaxconn and \
         net.ipv4.tcp_max_syn_backlog at least N"
            .to_owned(),
    ];
    Some(v)
}

fn lossy_path(f: &Facts) -> Option<Verdict> {
    let (retx, est, share) = retransmitted_handshakes(f);
    let consistent = est >= 2 && share >= CONSISTENT_SHARE;
    let silent = f.unanswered();
    let mostly_answered = est * 2 >= f.n;
    let http = f.http();
    let data_loss: Vec<&HttpExchange> = http
        .iter()
        .copied()
        .filter(|h| h.saw_loss() || h.request_acked == Some(false))
        .collect();
    // Distinct attempts that lost a packet somewhere.
    let affected =
        f.a.attempts
            .iter()
            .filter(|a| {
                (!consistent && a.established() && a.syn_retransmits.unwrap_or(0) > 0)
                    || (mostly_answered && silent.iter().any(|s| std::ptr::eq(*s, *a)))
                    || a.http
                        .as_ref()
                        .is_some_and(|h| h.saw_loss() || h.request_acked == Some(false))
            })
            .count();
    let mut v;
    if affected > 0 {
        v = Verdict::new(
            VerdictName::LossyPath,
            ((0.3 + 0.15 * affected as f64).min(0.9) * weight(f.n)).min(0.9),
        );
    } else if consistent {
        // The overloaded pattern; loss that hits every handshake is the less likely reading.
        v = Verdict::new(VerdictName::LossyPath, 0.25);
        v.evidence.push(format!(
            "random loss could also drop SYNs or SYN-ACKs, but {}/{est} handshakes with {} \
             needed retransmits: too consistent for loss",
            retx.len(),
            f.addr
        ));
    } else {
        return None;
    }
    if !consistent && !retx.is_empty() {
        let clean: Vec<u64> = f
            .established()
            .iter()
            .filter(|a| a.syn_retransmits.unwrap_or(0) == 0)
            .filter_map(|a| a.syn_rtt_us)
            .collect();
        v.evidence.push(format!(
            "{}/{est} handshakes with {} needed SYN retransmits ({}) while the other {} \
             completed in a median {}: SYNs or SYN-ACKs are lost intermittently {}",
            retx.len(),
            f.addr,
            retransmit_phrase(&retx)
                .unwrap_or_default()
                .trim_start_matches("after ")
                .replace(" each", ""),
            est - retx.len(),
            median(clean).map(fmt_us).unwrap_or_else(|| "-".into()),
            source_tag(&retx)
        ));
    }
    if mostly_answered && !silent.is_empty() {
        v.evidence.push(format!(
            "{}/{} connects to {} got no answer at all while most others completed: every SYN \
             of those was lost {}",
            silent.len(),
            f.n,
            f.addr,
            source_tag(&silent)
        ));
    }
    if !data_loss.is_empty() {
        let retrans: u32 = data_loss.iter().filter_map(|h| h.data_retransmits).sum();
        let rtos: u32 = data_loss.iter().filter_map(|h| h.rtos).sum();
        let unacked = data_loss
            .iter()
            .filter(|h| h.request_acked == Some(false))
            .count();
        let mut line = format!(
            "{}/{} HTTP exchanges with {} lost packets: {} data retransmits, {} RTOs",
            data_loss.len(),
            http.len(),
            f.addr,
            retrans,
            rtos
        );
        if unacked > 0 {
            line.push_str(&format!("; {unacked} requests were never fully ACKed"));
        }
        v.evidence.push(line);
    }
    v.next_steps = vec![
        format!(
            "mtr -n -T -P {} -c 100 {}   # (or ping -c 100 {}) which hop loses packets",
            f.port, f.ip, f.ip
        ),
        format!(
            "nstat -az TcpRetransSegs TcpExtTCPSynRetrans TcpExtTCPTimeouts   # here and on {} \
             while you probe",
            f.ip
        ),
        "ip -s link and ethtool -S <dev> on both ends: drops, errors, overruns".to_owned(),
        format!(
            "gateway diagnose {} --count 50   # a tighter estimate of the loss rate",
            f.addr
        ),
    ];
    Some(v)
}

fn slow_backend(f: &Facts) -> Option<Verdict> {
    let http = f.http();
    if http.is_empty() {
        return None;
    }
    let slow_us = SLOW_RESPONSE.as_micros() as u64;
    let late: Vec<&HttpExchange> = http
        .iter()
        .copied()
        .filter(|h| {
            h.request_acked == Some(true)
                && (h.outcome == HttpOutcome::Timeout
                    || (h.outcome == HttpOutcome::Response
                        && h.first_byte_us.unwrap_or(0) >= slow_us))
        })
        .collect();
    let broken: Vec<&HttpExchange> = http
        .iter()
        .copied()
        .filter(|h| {
            h.request_acked == Some(true)
                && matches!(h.outcome, HttpOutcome::Closed | HttpOutcome::Failed)
        })
        .collect();
    if late.is_empty() && broken.is_empty() {
        return None;
    }
    let mut v = Verdict::new(
        VerdictName::SlowBackend,
        confidence(
            (late.len() + broken.len()) as f64 / http.len() as f64,
            http.len(),
        ),
    );
    let path = f.m.http_path.as_deref().unwrap_or("/");
    let handshake = median(
        f.a.attempts
            .iter()
            .filter(|a| a.http.is_some())
            .filter_map(|a| a.syn_rtt_us),
    );
    let ack = median(late.iter().chain(&broken).filter_map(|h| h.ack_us));
    let bytes = http.first().map(|h| h.request_bytes).unwrap_or(0);
    if !late.is_empty() {
        let timeouts = late
            .iter()
            .filter(|h| h.outcome == HttpOutcome::Timeout)
            .count();
        let what = if timeouts == late.len() {
            format!(
                "no response byte within the {} ms response timeout",
                f.m.response_timeout_ms.unwrap_or(0)
            )
        } else {
            let ttfb = median(late.iter().filter_map(|h| h.first_byte_us)).unwrap_or(0);
            format!(
                "the first response byte only after a median {} ({timeouts} with none within \
                 the {} ms response timeout)",
                fmt_us(ttfb),
                f.m.response_timeout_ms.unwrap_or(0)
            )
        };
        v.evidence.push(format!(
            "{}/{} GET {path} to {}: handshake in a median {}, the {bytes}-byte request ACKed \
             by {}'s kernel within {}, but {what}",
            late.len(),
            http.len(),
            f.addr,
            handshake.map(fmt_us).unwrap_or_else(|| "-".into()),
            f.ip,
            ack.map(fmt_us).unwrap_or_else(|| "-".into()),
        ));
        v.evidence.push(
            "the request reached the backend host; the application is slow to answer it".to_owned(),
        );
    }
    if !broken.is_empty() {
        let errs: BTreeSet<String> = broken
            .iter()
            .map(|h| h.error.clone().unwrap_or_else(|| "FIN".to_owned()))
            .collect();
        v.evidence.push(format!(
            "{}/{} connections to {} were closed by the backend after it ACKed the request, \
             without a response ({})",
            broken.len(),
            http.len(),
            f.addr,
            errs.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    v.next_steps = vec![
        format!(
            "the backend's own latency metrics and logs for GET {path}: what is it waiting on \
             (database, lock, downstream call, GC)?"
        ),
        format!(
            "on {}: ss -tnp 'sport = :{}'   # Recv-Q above 0 on accepted connections = the \
             application is not reading its sockets",
            f.ip, f.port
        ),
        "if this latency is expected, raise the response timeout above it (diagnose again with \
         --response-timeout-ms); otherwise add backend capacity"
            .to_owned(),
    ];
    Some(v)
}

/// The share of clean attempts at this address, and what they showed.
fn healthy_part(f: &Facts) -> (f64, Vec<String>) {
    let slow_us = SLOW_RESPONSE.as_micros() as u64;
    let clean = |a: &Attempt| {
        a.established()
            && a.syn_retransmits.unwrap_or(0) == 0
            && a.http.as_ref().is_none_or(|h| {
                h.outcome == HttpOutcome::Response
                    && h.first_byte_us.unwrap_or(u64::MAX) < slow_us
                    && !h.saw_loss()
                    && h.request_acked != Some(false)
            })
    };
    let clean_n = f.a.attempts.iter().filter(|a| clean(a)).count();
    let mut evidence = Vec::new();
    let est: Vec<&Attempt> = f.a.attempts.iter().filter(|a| a.established()).collect();
    if let Some(rtt) = Percentiles::of(est.iter().filter_map(|a| a.syn_rtt_us)) {
        let with_retx = est
            .iter()
            .filter(|a| a.syn_retransmits.unwrap_or(0) > 0)
            .count();
        evidence.push(format!(
            "{}/{} connects to {} established, SYN-RTT p50 {} (p99 {}), {} {}",
            est.len(),
            f.n,
            f.addr,
            fmt_us(rtt.p50),
            fmt_us(rtt.p99),
            if with_retx == 0 {
                "none needed a SYN retransmit".to_owned()
            } else {
                format!("{with_retx} needed SYN retransmits")
            },
            source_tag(&est)
        ));
    }
    let http = f.http();
    let answered: Vec<&HttpExchange> = http
        .iter()
        .copied()
        .filter(|h| h.outcome == HttpOutcome::Response)
        .collect();
    if !answered.is_empty() {
        let statuses: BTreeSet<String> = answered
            .iter()
            .map(|h| h.status.map_or("?".to_owned(), |s| s.to_string()))
            .collect();
        evidence.push(format!(
            "{}/{} GET {} to {} answered ({}), first byte after a median {}, request ACKed \
             within a median {}",
            answered.len(),
            http.len(),
            f.m.http_path.as_deref().unwrap_or("/"),
            f.addr,
            statuses.into_iter().collect::<Vec<_>>().join(", "),
            median(answered.iter().filter_map(|h| h.first_byte_us))
                .map(fmt_us)
                .unwrap_or_else(|| "-".into()),
            median(answered.iter().filter_map(|h| h.ack_us))
                .map(fmt_us)
                .unwrap_or_else(|| "-".into()),
        ));
    }
    (clean_n as f64 / f.n.max(1) as f64, evidence)
}

fn dns_failure(m: &TargetMeasurements) -> Option<Verdict> {
    let r = &m.resolution;
    if r.method != ResolutionMethod::Dns {
        return None;
    }
    let took = fmt_us(r.elapsed_us);
    let host = &r.host;
    if let Some(err) = &r.error {
        let mut v = Verdict::new(VerdictName::DnsFailure, 0.99);
        v.evidence.push(format!(
            "resolving {host} failed after {took}: {err}; no address to connect to"
        ));
        v.next_steps = vec![
            format!(
                "getent ahosts {host}   # what this host's resolver returns (/etc/nsswitch.conf: \
                 files, then dns)"
            ),
            format!(
                "cat /etc/resolv.conf; dig {host} @<nameserver>   # is the nameserver reachable \
                 from here, and does it answer NXDOMAIN, SERVFAIL or nothing?"
            ),
            format!("check the spelling of {host} and that its DNS record exists"),
        ];
        return Some(v);
    }
    let slow = SLOW_RESOLUTION.as_micros() as u64;
    if r.elapsed_us <= slow {
        return None;
    }
    // 1 s → 0.6, 3 s or more → 0.9.
    let over = (r.elapsed_us - slow) as f64 / 2e6;
    let mut v = Verdict::new(VerdictName::DnsFailure, 0.6 + 0.3 * over.min(1.0));
    let addrs: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
    v.evidence.push(format!(
        "resolving {host} took {took} (more than {} s) before it returned {}: every new \
         connection that resolves the name waits as long",
        SLOW_RESOLUTION.as_secs(),
        addrs.join(", ")
    ));
    v.next_steps = vec![
        format!("time getent ahosts {host}   # how long this host's resolver takes"),
        format!(
            "cat /etc/resolv.conf; dig {host} @<nameserver>   # does the first nameserver answer \
             at once? options timeout/attempts, and search domains × ndots multiply queries"
        ),
        "cache resolutions (nscd, systemd-resolved, dnsmasq) or resolve once and reuse the \
         addresses"
            .to_owned(),
    ];
    Some(v)
}

#[cfg(test)]
mod tests;
