//! What the HTTP exchange on established connections says: `slow_backend` (the request reached
//! the backend's kernel, the answer came late or not at all) and the share of clean attempts
//! behind `healthy`, with what they showed.

use std::collections::BTreeSet;

use super::{
    Facts, SLOW_RESPONSE, Verdict, VerdictName, confidence,
    phrases::{fmt_us, median, source_tag},
};
use crate::diagnose::measure::{Attempt, HttpExchange, HttpOutcome, Percentiles};

pub(super) fn slow_backend(f: &Facts) -> Option<Verdict> {
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
    if !late.is_empty() {
        late_evidence(f, &mut v, &late, &broken, &http, path);
    }
    if !broken.is_empty() {
        broken_evidence(f, &mut v, &broken, http.len());
    }
    handshake_trouble(f, &mut v);
    v.next_steps = next_steps(f, path);
    Some(v)
}

/// Requests the backend ACKed and answered late or never: how late, and after what handshake.
fn late_evidence(
    f: &Facts,
    v: &mut Verdict,
    late: &[&HttpExchange],
    broken: &[&HttpExchange],
    http: &[&HttpExchange],
    path: &str,
) {
    let handshake = median(
        f.a.attempts
            .iter()
            .filter(|a| a.http.is_some())
            .filter_map(|a| a.syn_rtt_us),
    );
    let ack = median(late.iter().chain(broken).filter_map(|h| h.ack_us));
    let bytes = http.first().map(|h| h.request_bytes).unwrap_or(0);
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

/// Connections the backend closed after ACKing the request, without a response.
fn broken_evidence(f: &Facts, v: &mut Verdict, broken: &[&HttpExchange], total: usize) {
    let errs: BTreeSet<String> = broken
        .iter()
        .map(|h| h.error.clone().unwrap_or_else(|| "FIN".to_owned()))
        .collect();
    v.evidence.push(format!(
        "{}/{} connections to {} were closed by the backend after it ACKed the request, \
         without a response ({})",
        broken.len(),
        total,
        f.addr,
        errs.into_iter().collect::<Vec<_>>().join(", ")
    ));
}

/// Handshakes in trouble too: the requests may have waited in a full accept queue (the
/// kernel ACKs them there, the application has not accepted yet), or lost packets on the
/// way. Then a late answer is that, not a slow application: the confidence is halved.
fn handshake_trouble(f: &Facts, v: &mut Verdict) {
    let trouble =
        f.a.attempts
            .iter()
            .filter(|a| a.outcome.unanswered() || a.syn_retransmits.unwrap_or(0) > 0)
            .count();
    let data_lost = matches!(
        super::accepted::data_says(f),
        super::accepted::DataSays::Lost(_)
    );
    if trouble as f64 >= 0.3 * f.n as f64 || data_lost {
        v.confidence *= 0.5;
        v.evidence.push(format!(
            "but {trouble}/{} connects needed SYN retransmits or got no answer{}: a request \
             waiting in a full accept queue, or on a lossy path, is late the same way",
            f.n,
            if data_lost { ", and data was lost" } else { "" }
        ));
    }
}

/// What to look at next.
fn next_steps(f: &Facts, path: &str) -> Vec<String> {
    vec![
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
    ]
}

/// The share of clean attempts at this address, and what they showed.
pub(super) fn healthy_part(f: &Facts) -> (f64, Vec<String>) {
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
