//! The verdicts of handshakes that completed, but not cleanly or not in time:
//! `deadline_too_short` (the configured connect deadline cuts handshakes off), `overloaded`
//! (consistently only a retransmitted SYN is answered, or handshakes in trouble while data over
//! accepted connections loses nothing) and `lossy_path` (packets lost now and then, in
//! handshakes or in the HTTP exchange). A mixed handshake pattern alone cannot tell the two
//! apart; data sent over accepted connections can (`accepted`).

use super::{
    CONSISTENT_SHARE, Facts, Verdict, VerdictName,
    accepted::{DataSays, clean_line, data_says, lost_line},
    confidence,
    phrases::{SynRetransmits, fmt_us, median, retransmit_phrase, source_tag},
    weight,
};
use crate::diagnose::measure::{
    Attempt, AttemptOutcome, DeadlineSource, HttpExchange, Percentiles,
};

/// A configured connect deadline less than this multiple of the p99 handshake is tight.
const DEADLINE_HEADROOM: f64 = 1.25;
/// Suggested connect deadline = p99 SYN-RTT × this.
const DEADLINE_SUGGESTION_FACTOR: u64 = 2;

pub(super) fn deadline_too_short(f: &Facts) -> Option<Verdict> {
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

/// Without data over accepted connections, what a mixed handshake pattern is worth for either
/// verdict: not enough to say which.
const MIXED_WITHOUT_DATA: f64 = 0.6;

pub(super) fn overloaded(f: &Facts) -> Option<Verdict> {
    let (retx, est, share) = retransmitted_handshakes(f);
    let silent = f.unanswered();
    let trouble = !retx.is_empty() || (!silent.is_empty() && est > 0);
    let consistent = est >= 2 && share >= CONSISTENT_SHARE;
    let data = data_says(f);
    let mut v = match (consistent, data) {
        (_, DataSays::Lost(_)) if !consistent => return None,
        (true, DataSays::Lost(_)) => {
            Verdict::new(VerdictName::Overloaded, confidence(share, est) * 0.5)
        }
        (true, _) => Verdict::new(VerdictName::Overloaded, confidence(share, est) * 0.95),
        // Loss ruled out: the dropped SYNs were the listener's. One is worth less than many.
        (false, DataSays::Clean { miss, .. }) if trouble => {
            let n = (retx.len() + silent.len()) as f64;
            let c = (0.5 + 0.15 * n).min(0.95) * (1.0 - miss) * weight(f.n);
            Verdict::new(VerdictName::Overloaded, c.min(0.95))
        }
        (false, DataSays::Inconclusive(_)) if trouble && est * 2 >= f.n => {
            // As likely as loss, from handshakes alone; a shade below it, so that the older
            // reading keeps its rank, at a confidence that says "cannot tell".
            let n = retx.len() + silent.len();
            let c = ((0.3 + 0.15 * n as f64) * weight(f.n)).min(MIXED_WITHOUT_DATA);
            Verdict::new(VerdictName::Overloaded, c * 0.9)
        }
        _ => return None,
    };
    handshake_evidence(f, &mut v, &retx, est, silent.len(), consistent);
    match data {
        DataSays::Clean { a, p, miss } => v.evidence.push(clean_line(f, &a, p, miss)),
        DataSays::Lost(a) => v.evidence.push(lost_line(f, &a)),
        DataSays::Inconclusive(_) if !consistent => v.evidence.push(format!(
            "a full accept queue that other clients compete for, or a lossy path: the handshakes \
             alone cannot tell; data over accepted connections can (diagnose {} --http PATH)",
            f.addr
        )),
        DataSays::Inconclusive(_) => {}
    }
    if !silent.is_empty() && consistent {
        v.evidence.push(format!(
            "{}/{} more connects got no answer at all",
            silent.len(),
            f.n
        ));
    }
    v.next_steps = overloaded_next_steps(f);
    Some(v)
}

/// The handshakes that needed SYN retransmits: a consistent pattern (only retransmits
/// answered), or now and then beside connects that got no answer.
fn handshake_evidence(
    f: &Facts,
    v: &mut Verdict,
    retx: &[&Attempt],
    est: usize,
    silent: usize,
    consistent: bool,
) {
    let rtt = Percentiles::of(retx.iter().filter_map(|a| a.syn_rtt_us));
    if consistent {
        v.evidence.push(format!(
            "{}/{est} handshakes with {} completed only {}: the first SYNs were dropped without \
             RST or ICMP, then a retransmit was answered{} {}",
            retx.len(),
            f.addr,
            retransmit_phrase(retx).unwrap_or_default(),
            rtt.map(|p| format!(" (SYN-RTT p50 {}, max {})", fmt_us(p.p50), fmt_us(p.max)))
                .unwrap_or_default(),
            source_tag(retx)
        ));
        v.evidence.push(
            "a consistent pattern: the endpoint answers SYNs only when it has room, as a full \
             accept queue or SYN backlog does"
                .to_owned(),
        );
    } else {
        v.evidence.push(format!(
            "{}/{est} handshakes with {} needed SYN retransmits{} and {}/{} connects got no \
             answer at all: SYNs dropped without RST or ICMP, now and then {}",
            retx.len(),
            f.addr,
            rtt.map(|p| format!(" (SYN-RTT p50 {}, max {})", fmt_us(p.p50), fmt_us(p.max)))
                .unwrap_or_default(),
            silent,
            f.n,
            source_tag(retx)
        ));
    }
}

/// Where to see a full accept queue, and how to empty it.
fn overloaded_next_steps(f: &Facts) -> Vec<String> {
    vec![
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
    ]
}

pub(super) fn lossy_path(f: &Facts) -> Option<Verdict> {
    let s = LossSigns::of(f);
    let mut v = lossy_verdict(f, &s)?;
    handshake_loss_lines(f, &s, &mut v);
    data_loss_lines(f, &s, &mut v);
    v.next_steps = lossy_next_steps(f);
    Some(v)
}

/// What `lossy_path` weighs: the handshakes' retransmits and silences, and what data over
/// accepted connections lost.
struct LossSigns<'a> {
    /// Established handshakes that needed a SYN retransmit.
    retx: Vec<&'a Attempt>,
    /// Established handshakes.
    est: usize,
    /// Nearly every handshake needed a retransmit: the overloaded pattern.
    consistent: bool,
    /// Connects that got no answer at all.
    silent: Vec<&'a Attempt>,
    /// Most connects completed.
    mostly_answered: bool,
    http: Vec<&'a HttpExchange>,
    /// HTTP exchanges that lost a packet.
    data_loss: Vec<&'a HttpExchange>,
    data: DataSays,
}

impl<'a> LossSigns<'a> {
    fn of(f: &Facts<'a>) -> Self {
        let (retx, est, share) = retransmitted_handshakes(f);
        let http = f.http();
        let data_loss = http.iter().copied().filter(|h| lost(h)).collect();
        LossSigns {
            retx,
            est,
            consistent: est >= 2 && share >= CONSISTENT_SHARE,
            silent: f.unanswered(),
            mostly_answered: est * 2 >= f.n,
            http,
            data_loss,
            data: data_says(f),
        }
    }
}

/// Whether an HTTP exchange lost a packet. Where rounds over accepted connections were
/// measured, only their loss counts: a retransmit before the listener's kernel held the
/// connection may be a full accept queue.
fn lost(h: &HttpExchange) -> bool {
    h.lost_after_accept()
        .unwrap_or(h.saw_loss() || h.request_acked == Some(false))
}

/// The verdict and its confidence, from the attempts that lost a packet somewhere (or the
/// consistent pattern, as the less likely reading); `None` when nothing points at loss.
fn lossy_verdict(f: &Facts, s: &LossSigns) -> Option<Verdict> {
    // Distinct attempts that lost a packet somewhere.
    let affected =
        f.a.attempts
            .iter()
            .filter(|a| {
                (!s.consistent && a.established() && a.syn_retransmits.unwrap_or(0) > 0)
                    || (s.mostly_answered && s.silent.iter().any(|x| std::ptr::eq(*x, *a)))
                    || a.http.as_ref().is_some_and(lost)
            })
            .count();
    if affected > 0 {
        let c = ((0.3 + 0.15 * affected as f64).min(0.9) * weight(f.n)).min(0.9);
        let c = match s.data {
            DataSays::Lost(_) => c.max(0.8),
            // Loss ruled out by the rounds: what is left is how unlikely that was.
            DataSays::Clean { miss, .. } => (0.1 + miss).min(c),
            DataSays::Inconclusive(_) if s.data_loss.is_empty() => c.min(MIXED_WITHOUT_DATA),
            DataSays::Inconclusive(_) => c,
        };
        Some(Verdict::new(VerdictName::LossyPath, c))
    } else if s.consistent {
        // The overloaded pattern; loss that hits every handshake is the less likely reading.
        let mut v = Verdict::new(VerdictName::LossyPath, 0.25);
        v.evidence.push(format!(
            "random loss could also drop SYNs or SYN-ACKs, but {}/{} handshakes with {} \
             needed retransmits: too consistent for loss",
            s.retx.len(),
            s.est,
            f.addr
        ));
        Some(v)
    } else {
        None
    }
}

/// The handshakes' part of the evidence: retransmitted SYNs beside clean handshakes, and
/// connects that got no answer while most others completed.
fn handshake_loss_lines(f: &Facts, s: &LossSigns, v: &mut Verdict) {
    if !s.consistent && !s.retx.is_empty() {
        let clean: Vec<u64> = f
            .established()
            .iter()
            .filter(|a| a.syn_retransmits.unwrap_or(0) == 0)
            .filter_map(|a| a.syn_rtt_us)
            .collect();
        v.evidence.push(format!(
            "{}/{} handshakes with {} needed SYN retransmits ({}) while the other {} \
             completed in a median {}: SYNs or SYN-ACKs are lost intermittently {}",
            s.retx.len(),
            s.est,
            f.addr,
            SynRetransmits::of(&s.retx)
                .map(SynRetransmits::count)
                .unwrap_or_default(),
            s.est - s.retx.len(),
            median(clean).map(fmt_us).unwrap_or_else(|| "-".into()),
            source_tag(&s.retx)
        ));
    }
    if s.mostly_answered && !s.silent.is_empty() {
        v.evidence.push(format!(
            "{}/{} connects to {} got no answer at all while most others completed: every SYN \
             of those was lost {}",
            s.silent.len(),
            f.n,
            f.addr,
            source_tag(&s.silent)
        ));
    }
}

/// The data's part of the evidence: what the rounds over accepted connections say, and the
/// HTTP exchanges that lost packets.
fn data_loss_lines(f: &Facts, s: &LossSigns, v: &mut Verdict) {
    match &s.data {
        DataSays::Lost(a) => v.evidence.insert(0, lost_line(f, a)),
        DataSays::Clean { a, p, miss } => v.evidence.push(clean_line(f, a, *p, *miss)),
        DataSays::Inconclusive(None) if !s.consistent && s.data_loss.is_empty() => {
            v.evidence.push(format!(
                "handshakes alone cannot tell this from a full accept queue that other clients \
                 compete for; data over accepted connections can (diagnose {} --http PATH)",
                f.addr
            ))
        }
        DataSays::Inconclusive(_) => {}
    }
    if !s.data_loss.is_empty() && !matches!(s.data, DataSays::Lost(_)) {
        let retrans: u32 = s.data_loss.iter().filter_map(|h| h.data_retransmits).sum();
        let rtos: u32 = s.data_loss.iter().filter_map(|h| h.rtos).sum();
        let unacked = s
            .data_loss
            .iter()
            .filter(|h| h.request_acked == Some(false))
            .count();
        let mut line = format!(
            "{}/{} HTTP exchanges with {} lost packets: {} data retransmits, {} RTOs",
            s.data_loss.len(),
            s.http.len(),
            f.addr,
            retrans,
            rtos
        );
        if unacked > 0 {
            line.push_str(&format!("; {unacked} requests were never fully ACKed"));
        }
        v.evidence.push(line);
    }
}

fn lossy_next_steps(f: &Facts) -> Vec<String> {
    vec![
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
    ]
}
