//! The words the classifier's evidence is written in: durations, counts, SYN retransmits,
//! errno sets, and the `[kernel]` / `[userspace]` tag that says where a line's facts come from.

use std::{collections::BTreeSet, fmt};

use super::super::measure::{Attempt, Percentiles, Source};

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

pub(super) fn median(values: impl IntoIterator<Item = u64>) -> Option<u64> {
    Percentiles::of(values).map(|p| p.p50)
}

pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// How many SYN retransmits a set of attempts needed, as evidence phrases it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SynRetransmits {
    /// Every count known, and none needed one: "before any SYN retransmit".
    NoneNeeded,
    /// Every count known and equal: "after 1 SYN retransmit", "after 2 SYN retransmits each".
    Same { n: u32, attempts: usize },
    /// Counts from `min` to `max`, or some unknown: "after 1–3 SYN retransmits".
    Range { min: u32, max: u32 },
}

impl SynRetransmits {
    /// `None` when no count is known.
    pub(super) fn of(attempts: &[&Attempt]) -> Option<SynRetransmits> {
        let known: Vec<u32> = attempts.iter().filter_map(|a| a.syn_retransmits).collect();
        let (min, max) = (*known.iter().min()?, *known.iter().max()?);
        let all_known = known.len() == attempts.len();
        Some(if max == 0 && all_known {
            SynRetransmits::NoneNeeded
        } else if min == max && all_known {
            SynRetransmits::Same {
                n: min,
                attempts: attempts.len(),
            }
        } else {
            SynRetransmits::Range { min, max }
        })
    }

    /// The count alone: "1 SYN retransmit", "2 SYN retransmits", "1–3 SYN retransmits".
    pub(super) fn count(self) -> String {
        match self {
            SynRetransmits::NoneNeeded => "0 SYN retransmits".to_owned(),
            SynRetransmits::Same { n, .. } => {
                plural(u64::from(n), "SYN retransmit", "SYN retransmits")
            }
            SynRetransmits::Range { min, max } => format!("{min}–{max} SYN retransmits"),
        }
    }
}

impl fmt::Display for SynRetransmits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SynRetransmits::NoneNeeded => f.write_str("before any SYN retransmit"),
            SynRetransmits::Same { attempts: 1, .. } => write!(f, "after {}", self.count()),
            SynRetransmits::Same { .. } => write!(f, "after {} each", self.count()),
            SynRetransmits::Range { .. } => write!(f, "after {}", self.count()),
        }
    }
}

/// [`SynRetransmits`] as a phrase, `None` when no count is known.
pub(super) fn retransmit_phrase(attempts: &[&Attempt]) -> Option<String> {
    SynRetransmits::of(attempts).map(|r| r.to_string())
}

/// `[kernel]`, `[userspace]` or `[kernel 3/5, userspace 2/5]`.
pub(super) fn source_tag(attempts: &[&Attempt]) -> String {
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

pub(super) fn errnos(attempts: &[&Attempt]) -> String {
    let set: BTreeSet<&str> = attempts.iter().filter_map(|a| a.errno.as_deref()).collect();
    if set.is_empty() {
        "an error".to_owned()
    } else {
        set.into_iter().collect::<Vec<_>>().join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::measure::AttemptOutcome;

    fn attempts(retx: &[Option<u32>]) -> Vec<Attempt> {
        retx.iter()
            .map(|r| Attempt {
                cookie: 1,
                outcome: AttemptOutcome::Established,
                source: Source::Kernel,
                errno: None,
                elapsed_us: 100,
                syn_retransmits: *r,
                syn_rtt_us: Some(100),
                refused_by_icmp: false,
                http: None,
            })
            .collect()
    }

    fn phrase(retx: &[Option<u32>]) -> Option<String> {
        let a = attempts(retx);
        retransmit_phrase(&a.iter().collect::<Vec<_>>())
    }

    #[test]
    fn retransmits_read_as_before_after_each_or_a_range() {
        assert_eq!(
            phrase(&[Some(0), Some(0)]).unwrap(),
            "before any SYN retransmit"
        );
        assert_eq!(phrase(&[Some(1)]).unwrap(), "after 1 SYN retransmit");
        assert_eq!(
            phrase(&[Some(2), Some(2)]).unwrap(),
            "after 2 SYN retransmits each"
        );
        assert_eq!(
            phrase(&[Some(1), Some(3)]).unwrap(),
            "after 1–3 SYN retransmits"
        );
        assert_eq!(
            phrase(&[Some(2), None]).unwrap(),
            "after 2–2 SYN retransmits"
        );
        assert_eq!(phrase(&[None]), None);
        let a = attempts(&[Some(2), Some(2)]);
        let r = SynRetransmits::of(&a.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(r.count(), "2 SYN retransmits");
    }
}
