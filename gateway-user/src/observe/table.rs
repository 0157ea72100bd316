//! The live per-destination table of `gateway observe`: counts from the kernel's aggregates,
//! SYN-RTT percentiles and process names from the records userspace has seen.
//!
//! Memory is bounded however many destinations the host talks to: the kernel map is walked
//! one entry at a time into [`TopRows`], which keeps only the rows shown, and what records
//! taught about each destination ([`Seen`]) is kept for at most [`MAX_SEEN`] destinations,
//! the most recently active, with at most [`RTT_WINDOW`] samples and [`MAX_PROCS_KEPT`]
//! process names each.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap, VecDeque},
    fmt::Write as _,
    net::SocketAddr,
};

use gateway_common::{DestStats, Outcome, UpstreamKey};

use crate::observer::records::{ConnectRecord, key_to_socket_addr};

/// SYN-RTT samples kept per destination for percentiles.
pub const RTT_WINDOW: usize = 256;
/// Destinations whose records are remembered (RTT samples, process names); the least recently
/// active are forgotten first. Their kernel counts stay in the table.
pub const MAX_SEEN: usize = 4096;
/// Process names remembered per destination; more are counted, not named.
pub const MAX_PROCS_KEPT: usize = 8;
/// Process names listed per destination before "+N".
const MAX_PROCS_SHOWN: usize = 3;

#[derive(Default)]
struct Seen {
    rtts_us: VecDeque<u64>,
    procs: BTreeMap<String, u64>,
    /// Processes beyond [`MAX_PROCS_KEPT`].
    more_procs: u64,
    /// [`Table::tick`] when a record last arrived.
    last: u64,
}

#[derive(Default)]
pub struct Table {
    seen: HashMap<SocketAddr, Seen>,
    tick: u64,
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

/// Connect attempts that did not establish. Saturating: the kernel's counters are any u64.
fn failures(s: &DestStats) -> u64 {
    Outcome::ALL
        .iter()
        .filter(|o| **o != Outcome::Established)
        .fold(0u64, |acc, o| acc.saturating_add(s.attempts[*o as usize]))
}

fn total(s: &DestStats) -> u64 {
    s.attempts
        .iter()
        .fold(0u64, |acc, n| acc.saturating_add(*n))
}

/// Sort key of a row: failing destinations first, then busiest, then by address.
type Rank = (Reverse<u64>, Reverse<u64>, SocketAddr);

fn rank(dst: SocketAddr, s: &DestStats) -> Rank {
    (Reverse(failures(s)), Reverse(total(s)), dst)
}

/// The `top` rows of the table, collected one kernel entry at a time.
pub struct TopRows {
    top: usize,
    /// Max-heap on rank: the row that sorts last is on top, to be pushed out.
    heap: BinaryHeap<(Rank, Row)>,
    seen: usize,
}

#[derive(Clone, Copy)]
struct Row(DestStats);

impl PartialEq for Row {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Row {}

impl PartialOrd for Row {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Row {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        // Ranks are unique (they end in the address); rows never decide.
        std::cmp::Ordering::Equal
    }
}

impl TopRows {
    pub fn new(top: usize) -> TopRows {
        TopRows {
            top,
            heap: BinaryHeap::with_capacity(top.min(4096) + 1),
            seen: 0,
        }
    }

    pub fn offer(&mut self, key: &UpstreamKey, stats: &DestStats) {
        self.seen += 1;
        if self.top == 0 {
            return;
        }
        let r = rank(key_to_socket_addr(key), stats);
        if self.heap.len() == self.top {
            match self.heap.peek() {
                Some((worst, _)) if r < *worst => {
                    self.heap.pop();
                }
                _ => return,
            }
        }
        self.heap.push((r, Row(*stats)));
    }

    /// Destinations offered.
    pub fn seen(&self) -> usize {
        self.seen
    }
}

impl Table {
    pub fn record(&mut self, rec: &ConnectRecord) {
        self.tick += 1;
        if self.seen.len() >= MAX_SEEN && !self.seen.contains_key(&rec.dst) {
            self.forget_oldest();
        }
        let seen = self.seen.entry(rec.dst).or_default();
        seen.last = self.tick;
        if let Some(us) = rec.syn_rtt_us {
            if seen.rtts_us.len() == RTT_WINDOW {
                seen.rtts_us.pop_front();
            }
            seen.rtts_us.push_back(us);
        }
        let name = format!("{}({})", rec.comm, rec.pid);
        if let Some(n) = seen.procs.get_mut(&name) {
            *n += 1;
        } else if seen.procs.len() < MAX_PROCS_KEPT {
            seen.procs.insert(name, 1);
        } else {
            seen.more_procs += 1;
        }
    }

    /// Forgets the least recently active half of the remembered destinations: amortised O(1)
    /// per record.
    fn forget_oldest(&mut self) {
        let mut ticks: Vec<u64> = self.seen.values().map(|s| s.last).collect();
        let mid = ticks.len() / 2;
        let (_, cut, _) = ticks.select_nth_unstable(mid);
        let cut = *cut;
        self.seen.retain(|_, s| s.last > cut);
        self.seen.shrink_to(MAX_SEEN);
    }

    /// Destinations whose records are remembered.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Renders the table from a slice of the kernel's aggregates; failing destinations first.
    pub fn render(&self, stats: &[(UpstreamKey, DestStats)], top: usize) -> String {
        let mut rows = TopRows::new(top);
        for (k, s) in stats {
            rows.offer(k, s);
        }
        self.render_top(rows)
    }

    /// Renders the rows collected from the kernel's map.
    pub fn render_top(&self, rows: TopRows) -> String {
        let more = rows.seen.saturating_sub(rows.heap.len());
        let rows: Vec<(SocketAddr, DestStats)> = rows
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|(r, row)| (r.2, row.0))
            .collect();
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
        for (dst, s) in &rows {
            let seen = self.seen.get(dst);
            let rtts: Vec<u64> = seen
                .map(|s| s.rtts_us.iter().copied().collect())
                .unwrap_or_default();
            let procs = seen
                .map(|s| {
                    let mut names: Vec<&String> = s.procs.keys().collect();
                    let extra = (names.len().saturating_sub(MAX_PROCS_SHOWN) as u64)
                        .saturating_add(s.more_procs);
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
        if more > 0 {
            let _ = writeln!(out, "… {more} more destinations (raise --top)");
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

    /// The kernel's counters are any u64 (a newer object, a long-lived host): sums saturate
    /// instead of panicking (the totals were `iter().sum()`, which panics on overflow in a
    /// build with overflow checks).
    #[test]
    fn huge_counters_do_not_overflow() {
        let key =
            crate::observer::records::socket_addr_to_key(SocketAddr::from(([10, 0, 0, 1], 80)));
        let mut s: DestStats = unsafe { std::mem::zeroed() };
        s.attempts = [u64::MAX; gateway_common::OUTCOME_SLOTS];
        let text = Table::default().render(&[(key, s)], 5);
        assert!(text.contains(&u64::MAX.to_string()), "{text}");
    }

    /// Memory stays bounded however many destinations records arrive for.
    #[test]
    fn remembered_destinations_and_samples_are_bounded() {
        let mut t = Table::default();
        for i in 0..(MAX_SEEN as u32 * 3) {
            let mut rec = crate::observer::records::ConnectRecord {
                ts_unix_ns: 0,
                dst: SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 80)),
                src_port: 1,
                cookie: u64::from(i),
                pid: i,
                comm: "c".into(),
                cgroup_id: 1,
                outcome: crate::observer::records::OutcomeName(Outcome::Established),
                syn_retransmits: 0,
                elapsed_us: 1,
                syn_rtt_us: Some(100),
                errno: None,
                so_error: None,
                refused_by: None,
            };
            t.record(&rec);
            // One busy destination with many processes and samples.
            rec.dst = SocketAddr::from(([10, 9, 9, 9], 80));
            t.record(&rec);
            assert!(t.remembered() <= MAX_SEEN);
        }
        let busy = &t.seen[&SocketAddr::from(([10, 9, 9, 9], 80))];
        assert_eq!(busy.rtts_us.len(), RTT_WINDOW);
        assert_eq!(busy.procs.len(), MAX_PROCS_KEPT);
        assert!(busy.more_procs > 0);
    }

    #[test]
    fn top_rows_keep_only_the_top() {
        let key = |port| {
            crate::observer::records::socket_addr_to_key(SocketAddr::from(([10, 0, 0, 1], port)))
        };
        let mut rows = TopRows::new(2);
        for port in 0..100u16 {
            let mut s: DestStats = unsafe { std::mem::zeroed() };
            s.attempts[Outcome::Refused as usize] = u64::from(port);
            rows.offer(&key(port), &s);
        }
        let text = Table::default().render_top(rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("10.0.0.1:99"), "{text}");
        assert!(lines[2].starts_with("10.0.0.1:98"), "{text}");
        assert_eq!(lines[3], "… 98 more destinations (raise --top)");
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
