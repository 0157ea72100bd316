//! What the proxy demo expects the gateway to do about each fault it injects, and the verdict:
//! pure code, fed with what the demo read back from `/status` (health changes, hedges) and
//! from its clients (failures and whether the gateway explained them).

use std::fmt;

use crate::decide::health::Reason;

/// The faults the demo injects, one upstream at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DemoFault {
    /// Every packet to the upstream dropped (the host died, or a firewall drops everything).
    Blackhole,
    /// SYNs answered with RST: nothing listens.
    Refuse,
    /// SYN-ACKs held 200 ms: an accept queue under pressure, a slow path.
    SlowAccept,
    /// Connects fine, answers after 3 s: the application is slow, the network is not at fault.
    SlowBackend,
}

impl DemoFault {
    pub(crate) const ALL: [DemoFault; 4] = [
        DemoFault::Blackhole,
        DemoFault::Refuse,
        DemoFault::SlowAccept,
        DemoFault::SlowBackend,
    ];

    pub(crate) const fn label(self) -> &'static str {
        match self {
            DemoFault::Blackhole => "blackhole (every packet dropped)",
            DemoFault::Refuse => "refuses connections (RST)",
            DemoFault::SlowAccept => "slow accept (SYN-ACK +200 ms)",
            DemoFault::SlowBackend => "slow backend (answers after 3 s)",
        }
    }

    /// The words for the summary table.
    pub(crate) const fn short(self) -> &'static str {
        match self {
            DemoFault::Blackhole => "blackhole",
            DemoFault::Refuse => "refuse",
            DemoFault::SlowAccept => "slow accept",
            DemoFault::SlowBackend => "slow backend",
        }
    }

    /// What the gateway should do, in words (printed when the fault is injected).
    pub(crate) const fn expectation(self) -> &'static str {
        match self {
            DemoFault::Blackhole => {
                "expect: SYNs unanswered by the connect deadline → hedged/retried elsewhere, ejected as syn_unanswered (or host_died)"
            }
            DemoFault::Refuse => {
                "expect: RST seen by the kernel → retried elsewhere, ejected at once as refused"
            }
            DemoFault::SlowAccept => {
                "expect: SYN-ACK later than the measured deadline → a hedged connect to another endpoint wins"
            }
            DemoFault::SlowBackend => {
                "expect: request ACKed, no response → 504 response_timeout explained, ejected as slow_backend (never a network failure)"
            }
        }
    }

    /// Ejection reasons that explain this fault; any other one misses it.
    pub(crate) const fn reasons(self) -> &'static [Reason] {
        match self {
            DemoFault::Blackhole => &[Reason::SynUnanswered, Reason::HostDied],
            DemoFault::Refuse => &[Reason::Refused],
            DemoFault::SlowAccept => &[Reason::SynUnanswered],
            DemoFault::SlowBackend => &[Reason::SlowBackend],
        }
    }
}

impl fmt::Display for DemoFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What the demo saw the gateway do about one fault, from its injection until the next one.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Observed {
    /// The first ejection of the faulty endpoint: seconds after the fault, and why.
    pub first_ejection: Option<(f64, Reason)>,
    /// Ejections of the faulty endpoint for a reason the fault does not explain.
    pub wrong_reasons: Vec<Reason>,
    /// Connects to the faulty endpoint that passed their deadline and were hedged.
    pub hedges: u64,
    /// When it was healthy again, seconds after the fault was removed.
    pub recovered_after: Option<f64>,
}

impl Observed {
    /// An ejection of the broken endpoint, `after` seconds after `fault` was injected. A probe
    /// that failed while the fault lasted ejects it again (the back-off), with what it met; one
    /// that met nothing with a cause of its own (`probe_failed`), or a wrong status, is neither
    /// right nor wrong.
    pub(crate) fn ejected(&mut self, fault: DemoFault, reason: Reason, after: f64) {
        if matches!(reason, Reason::ProbeFailed | Reason::UnexpectedStatus) {
            return;
        }
        if !fault.reasons().contains(&reason) {
            self.wrong_reasons.push(reason);
        } else if self.first_ejection.is_none() {
            self.first_ejection = Some((after, reason));
        }
    }
}

/// The verdict on one fault: explained (with what the gateway did, in words), or missed (why).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Explained(String),
    Missed(String),
}

impl Verdict {
    pub(crate) fn explained(&self) -> bool {
        matches!(self, Verdict::Explained(_))
    }
}

/// Whether the gateway's decisions explain `fault`: ejected for one of its reasons (a slow
/// accept may instead be hedged without an ejection), and never ejected for another reason.
pub(crate) fn judge(fault: DemoFault, seen: &Observed) -> Verdict {
    if let Some(wrong) = seen.wrong_reasons.first() {
        return Verdict::Missed(format!(
            "ejected as {} — that is not a {}",
            wrong.name(),
            fault.short()
        ));
    }
    match (seen.first_ejection, fault) {
        (Some((_, reason)), _) if !fault.reasons().contains(&reason) => Verdict::Missed(format!(
            "ejected as {} — that is not a {}",
            reason.name(),
            fault.short()
        )),
        (Some((after, reason)), _) => Verdict::Explained(format!(
            "ejected as {} {:.2} s after the fault{}",
            reason.name(),
            after,
            if seen.hedges > 0 {
                format!(", {} connect(s) hedged", seen.hedges)
            } else {
                String::new()
            }
        )),
        (None, DemoFault::SlowAccept) if seen.hedges > 0 => Verdict::Explained(format!(
            "{} connect(s) hedged past the deadline, never ejected",
            seen.hedges
        )),
        (None, DemoFault::SlowAccept) => {
            Verdict::Missed("no connect was hedged and the endpoint was not ejected".to_owned())
        }
        (None, _) => Verdict::Missed(format!(
            "never ejected (expected {})",
            fault
                .reasons()
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

/// How the clients' requests ended, over the whole demo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub sent: u64,
    pub ok: u64,
    /// Answered 200 after a failed attempt or a hedged connect: a failure the client never saw.
    pub kept: u64,
    /// Failed with `x-gateway-error`: the gateway said why (and the kernel evidence with it).
    pub explained: u64,
    /// Failed without a reason from the gateway (no answer, a reset, a bare error).
    pub unexplained: u64,
}

impl Tally {
    pub(crate) fn failed(&self) -> u64 {
        self.explained + self.unexplained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ejection_for_the_faults_reason_explains_it() {
        let seen = Observed {
            first_ejection: Some((0.12, Reason::Refused)),
            ..Observed::default()
        };
        assert!(judge(DemoFault::Refuse, &seen).explained());
        // The same ejection does not explain a slow backend.
        assert!(!judge(DemoFault::SlowBackend, &seen).explained());
    }

    #[test]
    fn a_wrong_reason_misses_even_after_a_right_one() {
        let seen = Observed {
            first_ejection: Some((1.1, Reason::SlowBackend)),
            wrong_reasons: vec![Reason::HostDied],
            ..Observed::default()
        };
        let v = judge(DemoFault::SlowBackend, &seen);
        assert_eq!(
            v,
            Verdict::Missed("ejected as host_died — that is not a slow backend".to_owned())
        );
    }

    #[test]
    fn failed_probes_during_the_fault_neither_explain_nor_miss_it() {
        let mut seen = Observed::default();
        seen.ejected(DemoFault::Blackhole, Reason::SynUnanswered, 0.1);
        seen.ejected(DemoFault::Blackhole, Reason::ProbeFailed, 3.6);
        assert_eq!(seen.first_ejection, Some((0.1, Reason::SynUnanswered)));
        assert!(judge(DemoFault::Blackhole, &seen).explained());
        let mut only_probes = Observed::default();
        only_probes.ejected(DemoFault::Refuse, Reason::ProbeFailed, 1.0);
        assert!(!judge(DemoFault::Refuse, &only_probes).explained());
        // A refused connect is no blackhole.
        seen.ejected(DemoFault::Blackhole, Reason::Refused, 4.0);
        assert!(!judge(DemoFault::Blackhole, &seen).explained());
    }

    #[test]
    fn a_slow_accept_is_explained_by_hedges_alone() {
        let hedged = Observed {
            hedges: 3,
            ..Observed::default()
        };
        assert!(judge(DemoFault::SlowAccept, &hedged).explained());
        assert!(!judge(DemoFault::SlowAccept, &Observed::default()).explained());
        // Hedges alone do not explain a blackhole: it must be ejected.
        assert!(!judge(DemoFault::Blackhole, &hedged).explained());
    }
}
