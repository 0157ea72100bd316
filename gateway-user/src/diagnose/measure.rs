//! What `gateway diagnose` measured of one target: how its name resolved, and for each address
//! the connect attempts (each joined to the kernel's record by `SO_COOKIE` when kernel signals
//! are on) with their optional HTTP exchange. Plain data: the probes fill it, the classifier
//! reads it, and `--json` prints it as the `measurements` object. Durations are integers in µs
//! (`_us`) like `gateway observe --json`, except settings given in ms (`_ms`).

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// How one connect attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// A SYN-ACK arrived.
    Established,
    /// An RST answered the SYN (ECONNREFUSED).
    Refused,
    /// The kernel gave up after its SYN retries (ETIMEDOUT): nothing answered any SYN.
    Timeout,
    /// The probe's own connect deadline passed first and it closed the socket (the kernel
    /// calls this outcome `aborted`).
    Deadline,
    /// An ICMP error ended the connect (EHOSTUNREACH, ENETUNREACH, …), or there was no route.
    Unreachable,
    /// No free ephemeral port (EADDRNOTAVAIL): `connect()` failed before any SYN.
    AddrUnavailable,
    /// `connect()` was refused locally by policy (EPERM, EACCES): a local firewall.
    Denied,
    /// Any other error.
    Error,
}

impl AttemptOutcome {
    /// Nothing answered: no SYN-ACK, no RST, no ICMP.
    pub fn unanswered(self) -> bool {
        matches!(self, AttemptOutcome::Timeout | AttemptOutcome::Deadline)
    }
}

/// Where a value came from: the eBPF observer's record of the attempt, or the probe itself
/// (`connect()`'s errno, its own clock, `TCP_INFO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Kernel,
    Userspace,
}

/// One connect attempt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attempt {
    /// The socket's `SO_COOKIE`, read before `connect()` (0 if it could not be read).
    pub cookie: u64,
    pub outcome: AttemptOutcome,
    /// Where `outcome`, `syn_retransmits` and `syn_rtt_us` come from.
    pub source: Source,
    /// The errno that ended the connect (`ECONNREFUSED`, …).
    pub errno: Option<String>,
    /// `connect()` to its result, on the probe's clock.
    pub elapsed_us: u64,
    /// SYNs retransmitted (kernel record, or `TCP_INFO` `tcpi_total_retrans` before any data).
    pub syn_retransmits: Option<u32>,
    /// First SYN to SYN-ACK (kernel), or `connect()` to writable (userspace); established only.
    pub syn_rtt_us: Option<u64>,
    /// Refused by an ICMP port unreachable, not an RST (kernel only: the `tcp_receive_reset`
    /// tracepoint saw none).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refused_by_icmp: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpExchange>,
}

impl Attempt {
    pub fn established(&self) -> bool {
        self.outcome == AttemptOutcome::Established
    }
}

/// How an HTTP exchange on an established connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpOutcome {
    /// The first byte of a response arrived.
    Response,
    /// No byte within the response timeout.
    Timeout,
    /// The peer closed the connection (FIN) before any byte.
    Closed,
    /// Writing or reading failed (`error` says how, e.g. ECONNRESET).
    Failed,
}

/// A `GET` sent on an established connection.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpExchange {
    pub outcome: HttpOutcome,
    pub error: Option<String>,
    pub request_bytes: u64,
    /// Whether the peer's kernel ACKed every request byte (`TCP_INFO` `tcpi_bytes_acked`);
    /// `None` when unknown.
    pub request_acked: Option<bool>,
    /// Request written to fully ACKed.
    pub ack_us: Option<u64>,
    /// Request written to the first response byte.
    pub first_byte_us: Option<u64>,
    /// The status code, when the status line arrived.
    pub status: Option<u16>,
    /// Data segments retransmitted on the connection.
    pub data_retransmits: Option<u32>,
    /// Retransmission timeouts on the connection once established.
    pub rtos: Option<u32>,
    /// Where `data_retransmits`, `rtos` and `retransmits_after_accept` come from (the
    /// kernel's per-cookie record, or `TCP_INFO`).
    pub source: Source,
    /// Request written to its first segment ACKed. From then on the connection is the
    /// upstream kernel's (in its accept queue, or accepted): no full accept queue can drop its
    /// packets any more, a lossy path still can.
    pub accept_us: Option<u64>,
    /// The rest of the request was written in this many segments after that, each once the
    /// previous was ACKed: round trips over the accepted connection.
    pub rounds_after_accept: u32,
    /// Data retransmits before the first segment was ACKed (`TCP_INFO`): a handshake the
    /// client thought complete while the server had dropped its ACK for a full accept queue
    /// retransmits here too.
    pub retransmits_before_accept: Option<u32>,
    /// Data retransmits after it (the kernel record's count less those before, or `TCP_INFO`):
    /// packets lost on the path.
    pub retransmits_after_accept: Option<u32>,
}

impl HttpExchange {
    /// Data retransmits or RTOs: some packet of the exchange was lost.
    pub fn saw_loss(&self) -> bool {
        self.data_retransmits.unwrap_or(0) > 0 || self.rtos.unwrap_or(0) > 0
    }

    /// Whether packets were lost after the upstream's kernel accepted the connection; `None`
    /// when the request never got that far or was sent in one piece.
    pub fn lost_after_accept(&self) -> Option<bool> {
        self.accept_us?;
        if self.rounds_after_accept == 0 {
            return None;
        }
        Some(self.retransmits_after_accept? > 0)
    }
}

/// How the target's host became addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionMethod {
    /// An IP literal: nothing to resolve.
    Literal,
    /// `getaddrinfo(3)`: /etc/hosts, DNS, whatever nsswitch.conf says.
    Dns,
    /// A cluster's endpoints, from a running gateway's admin API.
    Admin,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Resolution {
    pub host: String,
    pub method: ResolutionMethod,
    pub elapsed_us: u64,
    pub addresses: Vec<IpAddr>,
    /// Why it failed, e.g. `EAI_NONAME (Name or service not known)`.
    pub error: Option<String>,
}

/// Where the connect deadline came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineSource {
    /// `--connect-timeout-ms`.
    Configured,
    /// The kernel's own SYN budget (see [`super::budget`]), capped.
    Kernel,
}

/// The kernel settings that bound a connect, as read in the probe's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SynBudget {
    pub tcp_syn_retries: u32,
    pub tcp_syn_linear_timeouts: u32,
    /// When the kernel gives up on a connect nobody answers, as [`super::budget`] models it.
    pub budget_ms: u64,
}

/// Latency percentiles (nearest rank), in µs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(values: impl IntoIterator<Item = u64>) -> Option<Percentiles> {
        let mut v: Vec<u64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| {
            let rank = (q * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Some(Percentiles {
            min: v[0],
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
        })
    }
}

/// Counts over a list of attempts.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub attempts: u32,
    pub established: u32,
    pub refused: u32,
    pub timeout: u32,
    pub deadline: u32,
    pub unreachable: u32,
    pub addr_unavailable: u32,
    pub denied: u32,
    pub error: u32,
    /// Established attempts whose handshake needed at least one SYN retransmit.
    pub established_after_syn_retransmits: u32,
    pub syn_rtt_us: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSummary>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HttpSummary {
    pub requests: u32,
    pub responses: u32,
    pub timeouts: u32,
    pub request_acked: u32,
    pub with_data_loss: u32,
    /// Round trips made over accepted connections, and the exchanges that lost a packet in
    /// them (see [`HttpExchange::lost_after_accept`]).
    pub rounds_after_accept: u32,
    pub lost_after_accept: u32,
    pub first_byte_us: Option<Percentiles>,
}

impl Summary {
    pub fn of(attempts: &[Attempt]) -> Summary {
        let mut s = Summary {
            attempts: attempts.len() as u32,
            ..Summary::default()
        };
        for a in attempts {
            let slot = match a.outcome {
                AttemptOutcome::Established => &mut s.established,
                AttemptOutcome::Refused => &mut s.refused,
                AttemptOutcome::Timeout => &mut s.timeout,
                AttemptOutcome::Deadline => &mut s.deadline,
                AttemptOutcome::Unreachable => &mut s.unreachable,
                AttemptOutcome::AddrUnavailable => &mut s.addr_unavailable,
                AttemptOutcome::Denied => &mut s.denied,
                AttemptOutcome::Error => &mut s.error,
            };
            *slot += 1;
            if a.established() && a.syn_retransmits.unwrap_or(0) > 0 {
                s.established_after_syn_retransmits += 1;
            }
        }
        s.syn_rtt_us = Percentiles::of(attempts.iter().filter_map(|a| a.syn_rtt_us));
        let http: Vec<&HttpExchange> = attempts.iter().filter_map(|a| a.http.as_ref()).collect();
        if !http.is_empty() {
            s.http = Some(HttpSummary {
                requests: http.len() as u32,
                responses: count(&http, |h| h.outcome == HttpOutcome::Response),
                timeouts: count(&http, |h| h.outcome == HttpOutcome::Timeout),
                request_acked: count(&http, |h| h.request_acked == Some(true)),
                with_data_loss: count(&http, |h| h.saw_loss()),
                rounds_after_accept: http
                    .iter()
                    .filter(|h| h.lost_after_accept().is_some())
                    .map(|h| h.rounds_after_accept)
                    .sum(),
                lost_after_accept: count(&http, |h| h.lost_after_accept() == Some(true)),
                first_byte_us: Percentiles::of(http.iter().filter_map(|h| h.first_byte_us)),
            });
        }
        s
    }
}

fn count(http: &[&HttpExchange], f: impl Fn(&HttpExchange) -> bool) -> u32 {
    http.iter().filter(|h| f(h)).count() as u32
}

/// Everything measured at one address.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AddressMeasurements {
    pub address: SocketAddr,
    pub summary: Summary,
    pub attempts: Vec<Attempt>,
    /// Run only when the configured connect deadline cut attempts short: the same connect with
    /// the kernel's own budget as deadline, to see how long the handshake really takes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patient_attempts: Vec<Attempt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_deadline_ms: Option<u64>,
    /// Run only when every connect went unanswered: whether the host itself answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_port: Option<OtherPort>,
}

/// Connects to another port of the same host, made when every connect to an address (patient
/// ones included) went unanswered: a host that is up answers them (an RST where nothing
/// listens), so the silence is about the one port; a host that is down, unreachable or behind
/// a firewall that drops every port does not, and SYNs cannot tell those apart. When another
/// target of the same run, on the same IP, had connects answered, those are these (its port,
/// deadline and attempts), and no connect is made.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OtherPort {
    pub port: u16,
    /// The run's own target whose connects these are; absent when `diagnose` made them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_target: Option<SocketAddr>,
    pub deadline_ms: u64,
    pub attempts: Vec<Attempt>,
}

impl AddressMeasurements {
    pub fn new(address: SocketAddr, attempts: Vec<Attempt>) -> AddressMeasurements {
        AddressMeasurements {
            address,
            summary: Summary::of(&attempts),
            attempts,
            patient_attempts: Vec::new(),
            patient_deadline_ms: None,
            other_port: None,
        }
    }
}

/// Everything measured of one target: the `measurements` object of `--json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetMeasurements {
    /// Whether the eBPF observer saw the attempts. When false, outcomes come from `connect()`
    /// errors, timings from the probe's clock and retransmits from `TCP_INFO`.
    pub kernel_signals: bool,
    /// Why kernel signals are off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_signals_missing: Option<String>,
    pub resolution: Resolution,
    /// Connects per address.
    pub count: u32,
    pub connect_deadline_ms: u64,
    pub connect_deadline_source: DeadlineSource,
    pub syn_budget: SynBudget,
    /// `net.ipv4.ip_local_port_range` where the probes ran.
    pub local_port_range: Option<[u16; 2]>,
    pub http_path: Option<String>,
    pub response_timeout_ms: Option<u64>,
    pub addresses: Vec<AddressMeasurements>,
    /// Records the kernel could not queue while probing (then some attempts fall back to
    /// userspace values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_lost: Option<u64>,
    /// For a cluster target (`--admin`): what the running gateway says about the cluster's
    /// endpoints (state, reason, SYN-RTT, recent failures and ejections with their evidence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<super::admin::GatewayView>,
}
