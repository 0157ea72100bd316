//! Turns what the kernel saw of one destination's connects into a sentence an on-call engineer
//! can act on. Pure code: records in, explanation out.

use std::fmt::Write as _;

use gateway_common::Outcome;

use super::records::ConnectRecord;

/// The one-line story of a destination, with the word that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub verdict: Story,
    pub sentence: String,
}

/// The word that names a destination's story.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Story {
    Healthy,
    Refused,
    Filtered,
    Unreachable,
    Overloaded,
    PortExhaustion,
    NoData,
}

impl Story {
    pub const fn name(self) -> &'static str {
        match self {
            Story::Healthy => "healthy",
            Story::Refused => "refused",
            Story::Filtered => "filtered",
            Story::Unreachable => "unreachable",
            Story::Overloaded => "overloaded",
            Story::PortExhaustion => "port_exhaustion",
            Story::NoData => "no_data",
        }
    }
}

impl std::fmt::Display for Story {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[(v.len() - 1) / 2])
}

fn ms(us: u64) -> String {
    if us < 10_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{} ms", us / 1000)
    }
}

/// Explains the connects in `records` (all to one destination).
pub fn explain(records: &[&ConnectRecord]) -> Explanation {
    let n = records.len();
    if n == 0 {
        return Explanation {
            verdict: Story::NoData,
            sentence: "no connects seen".to_owned(),
        };
    }
    let count = |o: Outcome| records.iter().filter(|r| r.outcome() == o).count();
    let established = count(Outcome::Established);
    let refused = count(Outcome::Refused);
    let silent = count(Outcome::Timeout) + count(Outcome::Aborted);
    let unreachable = count(Outcome::Unreachable);
    let no_port = count(Outcome::AddrUnavailable);

    // The dominant failure decides the story.
    let worst = [refused, silent, unreachable, no_port]
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    let verdict = if worst == 0 || established * 2 > n {
        mostly_established(&mut s, records, established)
    } else if worst == refused {
        let t = median(
            of(records, Outcome::Refused)
                .map(|r| r.elapsed_us)
                .collect(),
        )
        .unwrap_or(0);
        let icmp = of(records, Outcome::Refused)
            .filter(|r| r.refused_by == Some("icmp"))
            .count();
        if icmp * 2 > refused {
            let _ = write!(
                s,
                "{refused}/{n} connects refused, {icmp} by an ICMP port unreachable after {} \
                 (ECONNREFUSED, no RST): a firewall rejects them (a REJECT rule; kube-proxy's \
                 for a Service with no ready endpoints), whether or not anything listens",
                ms(t)
            );
        } else {
            let _ = write!(
                s,
                "{refused}/{n} connects refused: RST after {} (ECONNREFUSED), so the host is up \
                 but nothing listens on the port, or a firewall rejects it",
                ms(t)
            );
        }
        Story::Refused
    } else if worst == unreachable {
        let errno = of(records, Outcome::Unreachable).find_map(|r| r.errno.as_deref());
        let _ = write!(
            s,
            "{unreachable}/{n} connects failed with ICMP {}: a router or firewall says there is no \
             route to the host",
            errno.unwrap_or("unreachable")
        );
        Story::Unreachable
    } else if worst == no_port {
        let _ = write!(
            s,
            "{no_port}/{n} connects failed locally with EADDRNOTAVAIL: no free ephemeral port \
             towards this destination (see net.ipv4.ip_local_port_range, connection reuse)"
        );
        Story::PortExhaustion
    } else {
        unanswered(&mut s, records)
    };
    let comms: std::collections::BTreeSet<&str> = records.iter().map(|r| r.comm.as_str()).collect();
    let _ = write!(
        s,
        " [processes: {}]",
        comms.into_iter().collect::<Vec<_>>().join(", ")
    );
    Explanation {
        verdict,
        sentence: s,
    }
}

/// The records with outcome `o`.
fn of<'a>(
    records: &'a [&'a ConnectRecord],
    o: Outcome,
) -> impl Iterator<Item = &'a &'a ConnectRecord> + 'a {
    records.iter().filter(move |r| r.outcome() == o)
}

/// Most connects were established: healthy, or overloaded when most of them needed SYN
/// retransmits.
fn mostly_established(s: &mut String, records: &[&ConnectRecord], established: usize) -> Story {
    let n = records.len();
    let rtt = median(
        of(records, Outcome::Established)
            .filter_map(|r| r.syn_rtt_us)
            .collect(),
    );
    let rtt = rtt.map(ms).unwrap_or_else(|| "-".into());
    let with_retx = of(records, Outcome::Established)
        .filter(|r| r.syn_retransmits > 0)
        .count();
    if with_retx * 2 > established.max(1) {
        let _ = write!(
            s,
            "{established}/{n} connects established, but {with_retx} needed SYN retransmits \
             (median SYN-RTT {rtt}): the accept queue or SYN backlog is full, or SYNs are being lost"
        );
        Story::Overloaded
    } else {
        let _ = write!(
            s,
            "{established}/{n} connects established, median SYN-RTT {rtt}"
        );
        Story::Healthy
    }
}

/// Most connects got no answer at all: SYNs dropped on the path, or the host is down.
fn unanswered(s: &mut String, records: &[&ConnectRecord]) -> Story {
    let n = records.len();
    let silent = || of(records, Outcome::Timeout).chain(of(records, Outcome::Aborted));
    let (timeout, aborted) = (
        of(records, Outcome::Timeout).count(),
        of(records, Outcome::Aborted).count(),
    );
    let syns = silent()
        .map(|r| 1 + u64::from(r.syn_retransmits))
        .max()
        .unwrap_or(1);
    let waited = median(silent().map(|r| r.elapsed_us).collect()).unwrap_or(0);
    let _ = write!(
        s,
        "{}/{n} connects got no answer: up to {syns} SYNs sent, no SYN-ACK, no RST, no ICMP \
         (dropped on the path or host down)",
        timeout + aborted,
    );
    if timeout > 0 {
        let _ = write!(s, "; {timeout} ended in the kernel's ETIMEDOUT");
    }
    if aborted > 0 {
        let _ = write!(
            s,
            "; {aborted} abandoned by the client's own timeout after a median {}",
            ms(waited)
        );
    }
    Story::Filtered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observer::records::OutcomeName;

    fn rec(outcome: Outcome, retx: u16, elapsed_us: u64) -> ConnectRecord {
        ConnectRecord {
            ts_unix_ns: 0,
            dst: "10.0.0.5:8080".parse().unwrap(),
            src_port: 1,
            cookie: 1,
            pid: 1,
            comm: "api".into(),
            cgroup_id: 1,
            outcome: OutcomeName(outcome),
            syn_retransmits: retx,
            elapsed_us,
            syn_rtt_us: (outcome == Outcome::Established).then_some(elapsed_us),
            errno: match outcome {
                Outcome::Refused => Some("ECONNREFUSED".into()),
                Outcome::Unreachable => Some("EHOSTUNREACH".into()),
                Outcome::Timeout => Some("ETIMEDOUT".into()),
                _ => None,
            },
            so_error: None,
            refused_by: None,
        }
    }

    #[test]
    fn each_fault_gets_its_verdict() {
        let cases = [
            (vec![rec(Outcome::Established, 0, 90); 5], Story::Healthy),
            (vec![rec(Outcome::Refused, 0, 120); 3], Story::Refused),
            (
                vec![
                    rec(Outcome::Timeout, 2, 3_000_000),
                    rec(Outcome::Aborted, 0, 300_000),
                ],
                Story::Filtered,
            ),
            (
                vec![rec(Outcome::Unreachable, 0, 400); 2],
                Story::Unreachable,
            ),
            (
                vec![rec(Outcome::Established, 2, 2_000_000); 4],
                Story::Overloaded,
            ),
            (
                vec![rec(Outcome::AddrUnavailable, 0, 5)],
                Story::PortExhaustion,
            ),
        ];
        for (records, want) in cases {
            let refs: Vec<&ConnectRecord> = records.iter().collect();
            let e = explain(&refs);
            assert_eq!(e.verdict, want, "{}", e.sentence);
        }
    }

    #[test]
    fn a_refusal_by_icmp_names_a_firewall_and_one_by_rst_a_missing_listener() {
        let rst = [rec(Outcome::Refused, 0, 120), rec(Outcome::Refused, 0, 120)];
        let icmp = rst.clone().map(|r| ConnectRecord {
            refused_by: Some("icmp"),
            ..r
        });
        let e = explain(&rst.iter().collect::<Vec<_>>());
        assert!(e.sentence.contains("nothing listens"), "{}", e.sentence);
        let e = explain(&icmp.iter().collect::<Vec<_>>());
        assert_eq!(e.verdict, Story::Refused);
        assert!(
            e.sentence.contains("2 by an ICMP port unreachable")
                && e.sentence.contains("firewall rejects them")
                && !e.sentence.contains("nothing listens"),
            "{}",
            e.sentence
        );
    }

    #[test]
    fn the_blackhole_sentence_names_the_evidence() {
        let records = [
            rec(Outcome::Timeout, 2, 3_000_000),
            rec(Outcome::Aborted, 0, 300_000),
        ];
        let refs: Vec<&ConnectRecord> = records.iter().collect();
        let e = explain(&refs);
        assert!(
            e.sentence
                .contains("3 SYNs sent, no SYN-ACK, no RST, no ICMP"),
            "{}",
            e.sentence
        );
        assert!(
            e.sentence.contains("ETIMEDOUT") && e.sentence.contains("client's own timeout"),
            "{}",
            e.sentence
        );
    }
}
