//! What data sent over connections the upstream's kernel had accepted says, the evidence that
//! tells an overloaded listener from a lossy path when the handshakes alone cannot.
//!
//! From the client, both look alike: some connects unanswered, some established only after
//! SYN retransmits, some clean. But a full accept queue drops only handshake packets (SYNs,
//! and the handshake's last ACK while it is full, `tcp_conn_request()` and
//! `tcp_v4_syn_recv_sock()` in net/ipv4), never a packet of a connection the listener's
//! kernel holds, while random loss drops any packet at any time. `--http` writes its request a
//! line at a time, each line once the bytes before were ACKed (`probe`): the first ACK proves
//! the kernel holds the connection, each later line is a round trip over it. Retransmits in
//! those rounds are loss; none over enough rounds rules loss out.
//!
//! How many rounds are enough: if loss alone caused the handshakes' trouble, a SYN went
//! unanswered with probability `q = 1 − (1 − p)²` (the SYN or its SYN-ACK lost), so the share
//! of unanswered SYNs estimates `q` and thus the per-packet loss `p`; a round trip then loses
//! nothing with probability `(1 − p)²`, and `R` rounds with `(1 − p)^(2R)`. When that is below
//! [`DECISIVE`] and no round lost anything, loss is ruled out.

use super::{Facts, phrases::plural};

/// A probability below which an explanation is ruled out.
pub(super) const DECISIVE: f64 = 0.05;

/// Rounds over accepted connections at one address.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct AfterAccept {
    /// Exchanges that made rounds after their first request line was ACKed.
    pub exchanges: usize,
    pub rounds: u32,
    /// Exchanges that retransmitted after that point, and how many retransmits.
    pub lost: usize,
    pub retransmits: u32,
}

pub(super) fn after_accept(f: &Facts) -> Option<AfterAccept> {
    let measured: Vec<_> = f
        .http()
        .into_iter()
        .filter(|h| h.lost_after_accept().is_some())
        .collect();
    if measured.is_empty() {
        return None;
    }
    Some(AfterAccept {
        exchanges: measured.len(),
        rounds: measured.iter().map(|h| h.rounds_after_accept).sum(),
        lost: measured
            .iter()
            .filter(|h| h.lost_after_accept() == Some(true))
            .count(),
        retransmits: measured
            .iter()
            .filter_map(|h| h.retransmits_after_accept)
            .sum(),
    })
}

/// The per-packet loss rate that would explain the handshakes' unanswered SYNs if loss alone
/// caused them; `None` when no SYN went unanswered (or no count is known).
pub(super) fn implied_loss(f: &Facts) -> Option<f64> {
    let (mut syns, mut answered) = (0u64, 0u64);
    for a in f.a.attempts.iter().chain(&f.a.patient_attempts) {
        let Some(r) = a.syn_retransmits else { continue };
        if a.established() {
            syns += u64::from(r) + 1;
            answered += 1;
        } else if a.outcome.unanswered() {
            syns += u64::from(r) + 1;
        }
    }
    if syns == 0 || answered == syns {
        return None;
    }
    let q = 1.0 - answered as f64 / syns as f64;
    Some(1.0 - (1.0 - q).sqrt())
}

/// What the rounds say, given the loss rate the handshakes imply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum DataSays {
    /// Some round lost a packet after the kernel held the connection: loss.
    Lost(AfterAccept),
    /// No round lost anything, and at loss rate `p` that had probability `miss` < [`DECISIVE`]:
    /// not loss.
    Clean { a: AfterAccept, p: f64, miss: f64 },
    /// Too few rounds to say (or nothing to explain).
    Inconclusive(Option<AfterAccept>),
}

pub(super) fn data_says(f: &Facts) -> DataSays {
    let Some(a) = after_accept(f) else {
        return DataSays::Inconclusive(None);
    };
    if a.lost > 0 {
        return DataSays::Lost(a);
    }
    match implied_loss(f) {
        Some(p) => {
            let miss = (1.0 - p).powf(2.0 * f64::from(a.rounds));
            if miss < DECISIVE {
                DataSays::Clean { a, p, miss }
            } else {
                DataSays::Inconclusive(Some(a))
            }
        }
        None => DataSays::Inconclusive(Some(a)),
    }
}

/// The evidence line of clean rounds.
pub(super) fn clean_line(f: &Facts, a: &AfterAccept, p: f64, miss: f64) -> String {
    format!(
        "{} over {} to {} that its kernel had accepted (the first request line ACKed), 0 \
         retransmits: a lossy path dropping the {:.0}% of packets the unanswered SYNs imply \
         would have lost one with probability {:.3}; an accept queue drops only handshake \
         packets",
        plural(u64::from(a.rounds), "round trip", "round trips"),
        plural(a.exchanges as u64, "connection", "connections"),
        f.addr,
        p * 100.0,
        1.0 - miss
    )
}

/// The evidence line of rounds that lost packets.
pub(super) fn lost_line(f: &Facts, a: &AfterAccept) -> String {
    format!(
        "{}/{} connections to {} lost packets after its kernel had accepted them (the first \
         request line ACKed): {} over {}; an accept queue never drops those, a lossy path does",
        a.lost,
        a.exchanges,
        f.addr,
        plural(
            u64::from(a.retransmits),
            "data retransmit",
            "data retransmits"
        ),
        plural(u64::from(a.rounds), "round trip", "round trips"),
    )
}
