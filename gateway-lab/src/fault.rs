//! Faults injected into one upstream's namespace with iptables-legacy rules (and, for SYN-ACK
//! delay, an NFQUEUE delayer thread). Each [`Fault`] is a pure description; applying it returns a
//! [`FaultGuard`] that removes the rules again when cleared or dropped. Rules live in the
//! upstream's own namespace, so the root namespace's firewall is never touched and the rules die
//! with the namespace.
//!
//! How each fault is injected is in `docs/kernel.md` ("Faults you can inject here"), what it does
//! to a client `connect()` in "Measured behaviour"; `gateway-user/tests/lab_selftest.rs` checks it.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use super::{
    cmd::{self, Family},
    delay::{self, Delayer},
    error::{LabError, LabResult},
    netns::Netns,
    registry::{Background, Registry},
};

/// The longest SYN-ACK delay the lab will hold packets for.
pub const MAX_SYN_ACK_DELAY: Duration = Duration::from_secs(60);

/// How long [`Fault::HostUnreachable`] holds each ICMP error before it leaves the upstream.
///
/// Over a veth the REJECT happens synchronously, in the softirq that runs when the client's SYN
/// is transmitted, while `connect()` still holds the socket lock. `tcp_v4_err`/`tcp_v6_err`
/// cannot take an ICMP error for a socket owned by the user: they only set `sk_err_soft` and
/// count `TcpExtLockDroppedIcmps`. Undelayed, every connect therefore failed only after the
/// first SYN retransmit (1.01-1.02 s, measured here) instead of at once. 1 ms is the RTT of a
/// nearby router, and lets `connect()` release the lock first.
pub const ICMP_ERROR_DELAY: Duration = Duration::from_millis(1);

/// A fault on one TCP port of one upstream. Each applies to IPv4 and IPv6 alike.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// SYNs answered with RST (`REJECT --reject-with tcp-reset`): `connect()` fails at once with
    /// ECONNREFUSED, as if nothing listened.
    Refuse { port: u16 },
    /// Every packet to the port answered with RST (`REJECT --reject-with tcp-reset` without
    /// `--syn`): `connect()` fails with ECONNREFUSED as with [`Fault::Refuse`], and a connection
    /// established before the fault is reset by the first segment it sends (a request written
    /// on a pooled keep-alive connection of a backend that restarted or crashed).
    Reset { port: u16 },
    /// Every packet to the port answered with ICMP host unreachable (v6: address unreachable),
    /// sent [`ICMP_ERROR_DELAY`] later: `connect()` fails at once with EHOSTUNREACH.
    HostUnreachable { port: u16 },
    /// Every packet to the port answered with ICMP port unreachable (`REJECT`'s default reply,
    /// and kube-proxy's for a Service with no ready endpoints), sent [`ICMP_ERROR_DELAY`]
    /// later: `connect()` fails at once with ECONNREFUSED, as with [`Fault::Refuse`], but no
    /// RST arrives.
    PortUnreachable { port: u16 },
    /// Every packet to the port answered with ICMP administratively prohibited
    /// (`icmp-admin-prohibited`; v6: `icmp6-adm-prohibited`, firewalld's default reject), sent
    /// [`ICMP_ERROR_DELAY`] later: `connect()` fails at once with EHOSTUNREACH (v4) or EACCES
    /// (v6).
    AdminProhibited { port: u16 },
    /// SYNs dropped: `connect()` retransmits SYNs and ends in ETIMEDOUT after the client's
    /// `tcp_syn_retries` budget. Established connections keep working.
    SynBlackhole { port: u16 },
    /// Every packet to the port dropped: new connects time out and established connections
    /// stall, retransmitting (the host "died").
    Blackhole { port: u16 },
    /// Every TCP packet to the host dropped, whatever its port: a host that died behind a
    /// router, or a firewall whose policy drops everything. `port` is the one the fault is
    /// about; its neighbours go silent too.
    HostBlackhole { port: u16 },
    /// Each packet of the port's traffic, in either direction, dropped with `probability`
    /// (`-m statistic --mode random`).
    Loss { port: u16, probability: f64 },
    /// Each SYN-ACK leaving the port held for `delay` before it is sent (NFQUEUE).
    SynAckDelay { port: u16, delay: Duration },
}

impl Fault {
    /// The upstream port the fault applies to.
    pub fn port(&self) -> u16 {
        match *self {
            Fault::Refuse { port }
            | Fault::Reset { port }
            | Fault::HostUnreachable { port }
            | Fault::PortUnreachable { port }
            | Fault::AdminProhibited { port }
            | Fault::SynBlackhole { port }
            | Fault::Blackhole { port }
            | Fault::HostBlackhole { port }
            | Fault::Loss { port, .. }
            | Fault::SynAckDelay { port, .. } => port,
        }
    }

    fn validate(&self) -> LabResult<()> {
        let reason = match *self {
            _ if self.port() == 0 => Some("port 0 is not a port a client can connect to"),
            Fault::Loss { probability, .. } if !(0.0..=1.0).contains(&probability) => {
                Some("probability must be within 0.0..=1.0")
            }
            Fault::SynAckDelay { delay, .. } if delay.is_zero() || delay > MAX_SYN_ACK_DELAY => {
                Some("delay must be above 0 and at most 60 s")
            }
            _ => None,
        };
        match reason {
            Some(reason) => Err(LabError::InvalidFault {
                fault: self.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The iptables rules for this fault; `queue` is the NFQUEUE number for SYN-ACK delay.
    fn rules(&self, queue: u16) -> Vec<Rule> {
        let port = self.port().to_string();
        let mut rules = Vec::new();
        for family in [Family::V4, Family::V6] {
            let dport = ["-p", "tcp", "--dport", &port];
            let sport = ["-p", "tcp", "--sport", &port];
            let mut add = |chain, matches: &[&str], target: &[&str]| {
                rules.push(Rule {
                    family,
                    chain,
                    spec: matches
                        .iter()
                        .chain(target)
                        .map(|s| (*s).to_owned())
                        .collect(),
                });
            };
            match self {
                Fault::Refuse { .. } => add(
                    "INPUT",
                    &dport,
                    &["--syn", "-j", "REJECT", "--reject-with", "tcp-reset"],
                ),
                Fault::Reset { .. } => add(
                    "INPUT",
                    &dport,
                    &["-j", "REJECT", "--reject-with", "tcp-reset"],
                ),
                Fault::HostUnreachable { .. }
                | Fault::PortUnreachable { .. }
                | Fault::AdminProhibited { .. } => {
                    let (icmp, icmp_match): (&str, &[&str]) = match (family, self) {
                        (Family::V4, Fault::HostUnreachable { .. }) => (
                            "icmp-host-unreachable",
                            &["-p", "icmp", "--icmp-type", "host-unreachable"],
                        ),
                        (Family::V6, Fault::HostUnreachable { .. }) => (
                            "icmp6-addr-unreachable",
                            &["-p", "ipv6-icmp", "--icmpv6-type", "address-unreachable"],
                        ),
                        (Family::V4, Fault::PortUnreachable { .. }) => (
                            "icmp-port-unreachable",
                            &["-p", "icmp", "--icmp-type", "port-unreachable"],
                        ),
                        (Family::V6, Fault::PortUnreachable { .. }) => (
                            "icmp6-port-unreachable",
                            &["-p", "ipv6-icmp", "--icmpv6-type", "port-unreachable"],
                        ),
                        (Family::V4, _) => (
                            "icmp-admin-prohibited",
                            &["-p", "icmp", "--icmp-type", "communication-prohibited"],
                        ),
                        (Family::V6, _) => (
                            "icmp6-adm-prohibited",
                            &[
                                "-p",
                                "ipv6-icmp",
                                "--icmpv6-type",
                                "communication-prohibited",
                            ],
                        ),
                    };
                    add("INPUT", &dport, &["-j", "REJECT", "--reject-with", icmp]);
                    let q = queue.to_string();
                    add(
                        "OUTPUT",
                        icmp_match,
                        &["-j", "NFQUEUE", "--queue-num", &q, "--queue-bypass"],
                    )
                }
                Fault::SynBlackhole { .. } => add("INPUT", &dport, &["--syn", "-j", "DROP"]),
                Fault::Blackhole { .. } => add("INPUT", &dport, &["-j", "DROP"]),
                Fault::HostBlackhole { .. } => add("INPUT", &["-p", "tcp"], &["-j", "DROP"]),
                Fault::Loss { probability, .. } => {
                    let p = probability.to_string();
                    let stat = [
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DROP",
                    ];
                    add("INPUT", &dport, &stat);
                    add("OUTPUT", &sport, &stat);
                }
                Fault::SynAckDelay { .. } => {
                    let q = queue.to_string();
                    add(
                        "OUTPUT",
                        &sport,
                        &[
                            "--tcp-flags",
                            "SYN,ACK",
                            "SYN,ACK",
                            "-j",
                            "NFQUEUE",
                            "--queue-num",
                            &q,
                            "--queue-bypass",
                        ],
                    )
                }
            }
        }
        rules
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Refuse { port } => write!(f, "refuse :{port}"),
            Fault::Reset { port } => write!(f, "reset :{port}"),
            Fault::HostUnreachable { port } => write!(f, "host-unreachable :{port}"),
            Fault::PortUnreachable { port } => write!(f, "port-unreachable :{port}"),
            Fault::AdminProhibited { port } => write!(f, "admin-prohibited :{port}"),
            Fault::SynBlackhole { port } => write!(f, "syn-blackhole :{port}"),
            Fault::Blackhole { port } => write!(f, "blackhole :{port}"),
            Fault::HostBlackhole { port } => write!(f, "host-blackhole (every port) :{port}"),
            Fault::Loss { port, probability } => write!(f, "loss {probability} :{port}"),
            Fault::SynAckDelay { port, delay } => write!(f, "syn-ack-delay {delay:?} :{port}"),
        }
    }
}

/// One iptables rule: `-A chain spec…` to add, `-D chain spec…` to remove.
#[derive(Debug, Clone)]
struct Rule {
    family: Family,
    chain: &'static str,
    spec: Vec<String>,
}

impl Rule {
    fn args(&self, op: &str) -> Vec<String> {
        let mut args = vec![op.to_owned(), self.chain.to_owned()];
        args.extend(self.spec.iter().cloned());
        args
    }
}

/// An applied fault. Dropping it (or [`clear`](Self::clear)) removes its rules and stops its
/// delayer; [`detach`](Self::detach) keeps the fault until the lab is dropped.
#[must_use = "the fault is cleared as soon as the guard is dropped; use detach() to keep it"]
pub struct FaultGuard {
    state: Arc<FaultState>,
    detached: bool,
}

struct FaultState {
    netns: Netns,
    fault: Fault,
    rules: Vec<Rule>,
    /// Some while applied.
    active: Mutex<Option<Option<Delayer>>>,
    delayed: Option<Arc<AtomicU64>>,
}

impl FaultGuard {
    /// Applies `fault` in `netns` and registers it with the lab.
    pub(crate) fn apply(netns: &Netns, fault: Fault, registry: &Registry) -> LabResult<Self> {
        fault.validate()?;
        let queue = delay::next_queue_num();
        // The delayer binds its queue before the rule exists, so no SYN-ACK meets an unbound
        // queue (--queue-bypass would let it through undelayed).
        let delayer = match fault {
            Fault::SynAckDelay { delay, .. } => Some(Delayer::start(netns, queue, delay)?),
            Fault::HostUnreachable { .. }
            | Fault::PortUnreachable { .. }
            | Fault::AdminProhibited { .. } => {
                Some(Delayer::start(netns, queue, ICMP_ERROR_DELAY)?)
            }
            _ => None,
        };
        let rules = fault.rules(queue);
        for (added, rule) in rules.iter().enumerate() {
            if let Err(err) = cmd::iptables(netns.name(), rule.family, &rule.args("-A")) {
                for rule in &rules[..added] {
                    let _ = cmd::iptables(netns.name(), rule.family, &rule.args("-D"));
                }
                return Err(err);
            }
        }
        let state = Arc::new(FaultState {
            netns: netns.clone(),
            delayed: delayer.as_ref().map(Delayer::delayed_counter),
            fault,
            rules,
            active: Mutex::new(Some(delayer)),
        });
        registry.register(Arc::clone(&state) as Arc<dyn Background>);
        tracing::debug!(netns = netns.name(), fault = %state.fault, "fault applied");
        Ok(Self {
            state,
            detached: false,
        })
    }

    /// The fault this guard holds.
    pub fn fault(&self) -> &Fault {
        &self.state.fault
    }

    /// Packets the fault's NFQUEUE delayer held and released so far: SYN-ACKs for
    /// [`Fault::SynAckDelay`], ICMP errors for [`Fault::HostUnreachable`]; `None` for the others.
    pub fn delayed_packets(&self) -> Option<u64> {
        self.state
            .delayed
            .as_ref()
            .map(|c| c.load(Ordering::Acquire))
    }

    /// Removes the fault now and reports whether every rule came out.
    pub fn clear(self) -> LabResult<()> {
        self.state.clear()
    }

    /// Keeps the fault in place until the lab is dropped.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        if !self.detached {
            self.state.stop();
        }
    }
}

impl fmt::Debug for FaultGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultGuard")
            .field("netns", &self.state.netns.name())
            .field("fault", &self.state.fault)
            .finish()
    }
}

impl FaultState {
    fn clear(&self) -> LabResult<()> {
        let Some(delayer) = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        let mut first_err = None;
        for rule in &self.rules {
            if let Err(err) = cmd::iptables(self.netns.name(), rule.family, &rule.args("-D")) {
                first_err.get_or_insert(err);
            }
        }
        // Rules first, then the delayer: once no packet can enter the queue, release the held
        // ones and close it.
        drop(delayer);
        tracing::debug!(netns = self.netns.name(), fault = %self.fault, "fault cleared");
        first_err.map_or(Ok(()), Err)
    }
}

impl Background for FaultState {
    fn stop(&self) {
        if let Err(err) = self.clear() {
            // After the lab deleted the namespace, the rules are gone with it.
            tracing::debug!(fault = %self.fault, error = %err, "fault not cleared");
        }
    }

    fn is_stopped(&self) -> bool {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_both_families() {
        let rules = Fault::Refuse { port: 8080 }.rules(0);
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0].args("-A").join(" "),
            "-A INPUT -p tcp --dport 8080 --syn -j REJECT --reject-with tcp-reset"
        );
        assert_eq!(rules[1].family, Family::V6);
        let loss = Fault::Loss {
            port: 80,
            probability: 0.3,
        }
        .rules(0);
        assert_eq!(loss.len(), 4);
        assert!(
            loss[1]
                .args("-A")
                .join(" ")
                .starts_with("-A OUTPUT -p tcp --sport 80 -m statistic")
        );
        let unreach = Fault::HostUnreachable { port: 1 }.rules(0);
        assert_eq!(unreach.len(), 4);
        assert!(
            unreach[2]
                .spec
                .contains(&"icmp6-addr-unreachable".to_owned())
        );
        assert_eq!(
            unreach[3].args("-A").join(" "),
            "-A OUTPUT -p ipv6-icmp --icmpv6-type address-unreachable -j NFQUEUE --queue-num 0 --queue-bypass"
        );
    }

    #[test]
    fn invalid_faults_are_refused() {
        assert!(
            Fault::Loss {
                port: 80,
                probability: 1.5
            }
            .validate()
            .is_err()
        );
        assert!(Fault::Refuse { port: 0 }.validate().is_err());
        assert!(
            Fault::SynAckDelay {
                port: 80,
                delay: Duration::ZERO
            }
            .validate()
            .is_err()
        );
        assert!(
            Fault::SynAckDelay {
                port: 80,
                delay: Duration::from_millis(200)
            }
            .validate()
            .is_ok()
        );
    }
}
