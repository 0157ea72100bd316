//! The live per-destination table of `gateway observe`: counts from the kernel's aggregates,
//! SYN-RTT percentiles and process names from the records userspace has seen.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    net::SocketAddr,
};

use gateway_common::{DestStats, Outcome, UpstreamKey};

use crate::observer::records::{ConnectRecord, key_to_socket_addr};

/// SYN-RTT samples kept per destination for percentiles.
const RTT_WINDOW: usize = 1024;
/// Process names listed per destination before "+N".
const MAX_PROCS_SHOWN: usize = 3;

#[derive(Default)]
struct Seen {
    rtts_us: VecDeque<u64>,
    procs: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Table {
    seen: HashMap<SocketAddr, Seen>,
}

/// `p` in [0, 1] of `samples` (nearest rank).
pub fn percentile(samples: &[u64], p: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

fn fmt_us(us: Option<u64>) -> String {
    match us {
        None => "-".to_owned(),
        Some(us) if us < 1000 => format!("{us}µs"),
        Some(us) if us < 1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        Some(us) => format!("{:.2}s", us as f64 / 1e6),
    }
}

impl Table {
    pub fn record(&mut self, rec: &ConnectRecord) {
        let seen = self.seen.entry(rec.dst).or_default();
        if let Some(us) = rec.syn_rtt_us {
            if seen.rtts_us.len() == RTT_WINDOW {
                seen.rtts_us.pop_front();
            }
            seen.rtts_us.push_back(us);
        }
        *seen
            .procs
            .entry(format!("{}({})", rec.comm, rec.pid))
            .or_default() += 1;
    }

    /// Renders the table from the kernel's aggregates; failing destinations first.
    pub fn render(&self, stats: &[(UpstreamKey, DestStats)], top: usize) -> String {
        let mut rows: Vec<(SocketAddr, &DestStats)> = stats
            .iter()
            .map(|(k, s)| (key_to_socket_addr(k), s))
            .collect();
        let failures = |s: &DestStats| -> u64 {
            Outcome::ALL
                .iter()
                .filter(|o| **o != Outcome::Established)
                .map(|o| s.attempts[*o as usize])
                .sum()
        };
        let total = |s: &DestStats| -> u64 { s.attempts.iter().sum() };
        rows.sort_by(|a, b| {
            (failures(b.1), total(b.1), a.0).cmp(&(failures(a.1), total(a.1), b.0))
        });
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<28} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8}  PROCESSES",
            "DESTINATION",
            "ATTEMPTS",
            "ESTAB",
            "REFUSED",
            "TIMEOUT",
            "UNREACH",
            "ABORTED",
            "NOPORT",
            "SYN-RETX",
            "RTT-p50",
            "RTT-p99"
        );
        for (dst, s) in rows.iter().take(top) {
            let seen = self.seen.get(dst);
            let rtts: Vec<u64> = seen
                .map(|s| s.rtts_us.iter().copied().collect())
                .unwrap_or_default();
            let procs = seen
                .map(|s| {
                    let mut names: Vec<&String> = s.procs.keys().collect();
                    let extra = names.len().saturating_sub(MAX_PROCS_SHOWN);
                    names.truncate(MAX_PROCS_SHOWN);
                    let mut text = names
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(",");
                    if extra > 0 {
                        let _ = write!(text, " +{extra}");
                    }
                    text
                })
                .unwrap_or_else(|| "-".to_owned());
            let a = |o: Outcome| s.attempts[o as usize];
            let _ = writeln!(
                out,
                "{:<28} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8}  {}",
                dst.to_string(),
                total(s),
                a(Outcome::Established),
                a(Outcome::Refused),
                a(Outcome::Timeout),
                a(Outcome::Unreachable),
                a(Outcome::Aborted),
                a(Outcome::AddrUnavailable),
                s.syn_retransmits,
                fmt_us(percentile(&rtts, 0.5)),
                fmt_us(percentile(&rtts, 0.99)),
                procs
            );
        }
        if rows.len() > top {
            let _ = writeln!(
                out,
                "… {} more destinations (raise --top)",
                rows.len() - top
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn failing_destinations_sort_first() {
        let key = |port| {
            crate::observer::records::socket_addr_to_key(SocketAddr::from(([10, 0, 0, 1], port)))
        };
        let zero: DestStats = unsafe { std::mem::zeroed() };
        let mut ok = zero;
        ok.attempts[Outcome::Established as usize] = 100;
        let mut bad = zero;
        bad.attempts[Outcome::Timeout as usize] = 2;
        bad.syn_retransmits = 10;
        let text = Table::default().render(&[(key(80), ok), (key(81), bad)], 10);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("10.0.0.1:81"), "{text}");
        assert!(lines[2].starts_with("10.0.0.1:80"), "{text}");
    }
}
