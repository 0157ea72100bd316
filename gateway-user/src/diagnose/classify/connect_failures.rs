//! The verdicts of connects that failed: `port_exhaustion` (EADDRNOTAVAIL before any SYN),
//! `refused` (an RST answered), `unreachable` (an ICMP error, or another local error) and
//! `filtered` (nothing answered at all, or a local firewall refused the connect).

use super::{
    Facts, Verdict, VerdictName, confidence,
    phrases::{SynRetransmits, errnos, fmt_us, median, retransmit_phrase, source_tag},
};
use crate::diagnose::measure::{Attempt, AttemptOutcome, Source};

pub(super) fn port_exhaustion(f: &Facts) -> Option<Verdict> {
    let hit = f.with(AttemptOutcome::AddrUnavailable);
    if hit.is_empty() {
        return None;
    }
    let mut v = Verdict::new(
        VerdictName::PortExhaustion,
        confidence(hit.len() as f64 / f.n as f64, f.n),
    );
    v.evidence.push(format!(
        "{}/{} connects to {} failed at once with EADDRNOTAVAIL, before any SYN was sent: no \
         free local (ephemeral) port towards this destination {}",
        hit.len(),
        f.n,
        f.addr,
        source_tag(&hit)
    ));
    let range = f.m.local_port_range;
    if let Some([lo, hi]) = range {
        v.evidence.push(format!(
            "net.ipv4.ip_local_port_range is {lo}–{hi}: {} local ports for each destination \
             ip:port",
            u32::from(hi).saturating_sub(u32::from(lo)) + 1
        ));
    }
    let dst = ss_dst(f);
    v.next_steps = vec![
        format!(
            "ss -tan 'dst {dst}' | awk 'NR>1 {{print $1}}' | sort | uniq -c   # which sockets \
             hold the local ports towards {} (ESTAB, TIME-WAIT)",
            f.addr
        ),
        match range {
            Some([lo, hi]) => format!(
                "sysctl net.ipv4.ip_local_port_range   # now '{lo} {hi}'; widen it, e.g. sysctl \
                 -w net.ipv4.ip_local_port_range='1024 65535'"
            ),
            None => {
                "sysctl net.ipv4.ip_local_port_range   # widen it, e.g. '1024 65535'".to_owned()
            }
        },
        "reuse connections (HTTP keep-alive, a connection pool) instead of one connection per \
         request; sysctl net.ipv4.tcp_tw_reuse=1 lets new connects reuse TIME-WAIT ports"
            .to_owned(),
        "spread the load over more destination addresses or source IPs: a local port only has \
         to be unique per (source ip, destination ip:port)"
            .to_owned(),
    ];
    Some(v)
}

/// `ss` filter syntax for the address: `10.0.0.5:80`, `[fd00::5]:80`.
fn ss_dst(f: &Facts) -> String {
    f.addr.clone()
}

pub(super) fn refused(f: &Facts) -> Option<Verdict> {
    let hit = f.with(AttemptOutcome::Refused);
    if hit.is_empty() {
        return None;
    }
    let mut v = Verdict::new(
        VerdictName::Refused,
        confidence(hit.len() as f64 / f.n as f64, f.n),
    );
    let t = median(hit.iter().map(|a| a.elapsed_us)).unwrap_or(0);
    let retx = SynRetransmits::of(&hit)
        .filter(|r| *r != SynRetransmits::NoneNeeded)
        .map(|r| format!(", {r}"))
        .unwrap_or_default();
    // The kernel tells an RST from an ICMP port unreachable (both ECONNREFUSED): the second is
    // a firewall's REJECT, which says nothing of whether anything listens.
    let icmp = hit.iter().filter(|a| a.refused_by_icmp).count();
    if icmp * 2 > hit.len() {
        rejected(f, &hit, icmp, (t, &retx), &mut v);
        return Some(v);
    }
    v.evidence.push(format!(
        "{}/{} connects to {} refused: an RST answered the SYN after a median {}{retx} \
         (ECONNREFUSED) {}",
        hit.len(),
        f.n,
        f.addr,
        fmt_us(t),
        source_tag(&hit)
    ));
    if icmp > 0 {
        v.evidence.push(format!(
            "{icmp} of them by an ICMP port unreachable instead (a firewall's REJECT)"
        ));
    }
    v.evidence.push(format!(
        "the host is up and its TCP stack answers, but nothing listens on port {} there, or a \
         firewall rejects the SYNs with tcp-reset",
        f.port
    ));
    v.next_steps = vec![
        format!(
            "on {}: ss -ltn 'sport = :{}'   # is anything listening on {}, and on which address \
             (127.0.0.1 only?)",
            f.ip, f.port, f.port
        ),
        format!(
            "on {}: is the service running? systemctl status <unit> and its logs (crashed, \
             restarting, bound to another port)",
            f.ip
        ),
        format!(
            "iptables -L -n -v | grep -i reject   # on {} and on firewalls in the path: a rule \
             answering tcp/{} with tcp-reset",
            f.ip, f.port
        ),
    ];
    Some(v)
}

/// Most refusals came as an ICMP port unreachable, with no RST: a firewall rejected the SYNs.
fn rejected(f: &Facts, hit: &[&Attempt], icmp: usize, (t, retx): (u64, &str), v: &mut Verdict) {
    v.evidence.push(format!(
        "{}/{} connects to {} refused, {icmp} of them by an ICMP port unreachable after a \
         median {}{retx} (ECONNREFUSED, and no RST: the kernel's tcp_receive_reset never fired) \
         {}",
        hit.len(),
        f.n,
        f.addr,
        fmt_us(t),
        source_tag(hit)
    ));
    v.evidence.push(format!(
        "a firewall on {} or on the path rejects the SYNs to port {} (iptables' REJECT replies \
         so by default; kube-proxy does for a Service with no ready endpoints): this says \
         nothing of whether the service listens",
        f.ip, f.port
    ));
    // ICMPv6 destination unreachable (type 1), port unreachable (code 4), past the fixed
    // 40-byte IPv6 header (no extension headers: what a REJECT sends).
    let (filter, iptables) = if f.ip.contains(':') {
        ("icmp6 and ip6[40] == 1 and ip6[41] == 4", "ip6tables")
    } else {
        (
            "icmp[icmptype] == icmp-unreach and icmp[icmpcode] == 3",
            "iptables",
        )
    };
    v.next_steps = vec![
        format!(
            "tcpdump -ni any '{filter}'   # the port unreachable's source address is the host \
             that rejects tcp/{}",
            f.port
        ),
        format!(
            "{iptables} -L -n -v | grep -i reject; nft list ruleset | grep -i reject   # on {} \
             and on firewalls in the path: a rule rejecting tcp/{}",
            f.ip, f.port
        ),
        "a Kubernetes Service? kubectl get endpointslices -l kubernetes.io/service-name=<name>   \
         # kube-proxy rejects connects to a Service whose pods are all unready"
            .to_owned(),
    ];
}

pub(super) fn unreachable(f: &Facts) -> Option<Verdict> {
    let icmp = f.with(AttemptOutcome::Unreachable);
    let other = f.with(AttemptOutcome::Error);
    if icmp.is_empty() && other.is_empty() {
        return None;
    }
    let k = icmp.len() + other.len();
    let mut v = Verdict::new(
        VerdictName::Unreachable,
        confidence(k as f64 / f.n as f64, f.n),
    );
    if !icmp.is_empty() {
        let t = median(icmp.iter().map(|a| a.elapsed_us)).unwrap_or(0);
        v.evidence.push(format!(
            "{}/{} connects to {} failed with {} after a median {}: a router, the host's \
             firewall (REJECT with icmp-host-unreachable) or this host's routing table says {} \
             cannot be reached {}",
            icmp.len(),
            f.n,
            f.addr,
            errnos(&icmp),
            fmt_us(t),
            f.ip,
            source_tag(&icmp)
        ));
    }
    if !other.is_empty() {
        v.evidence.push(format!(
            "{}/{} connects to {} failed with {} {}",
            other.len(),
            f.n,
            f.addr,
            errnos(&other),
            source_tag(&other)
        ));
    }
    v.next_steps = vec![
        format!(
            "ip route get {}   # which route and interface this host uses",
            f.ip
        ),
        format!(
            "traceroute -n -T -p {} {}   # where the path stops (or mtr -n -T -P {} {})",
            f.port, f.ip, f.port, f.ip
        ),
        format!(
            "ip neigh show {}   # on the same subnet: FAILED or INCOMPLETE means the host does \
             not answer ARP/ND (down?)",
            f.ip
        ),
        format!(
            "iptables -L -n -v | grep -i unreach   # on {}: a rule rejecting with \
             icmp-host-unreachable",
            f.ip
        ),
    ];
    Some(v)
}

pub(super) fn filtered(f: &Facts) -> Option<Verdict> {
    let silent = f.unanswered();
    let denied = f.with(AttemptOutcome::Denied);
    let k = silent.len() + denied.len();
    if k == 0 {
        return None;
    }
    let mut c = confidence(k as f64 / f.n as f64, f.n);
    // Most connects completed: the silent ones are lost packets (lossy_path), not a filter.
    if f.established().len() * 2 >= f.n {
        c *= 0.5;
    }
    let host = other_port(f);
    if host == Some(false) {
        c = c.min(HOST_SILENT_CONFIDENCE);
    }
    let mut v = Verdict::new(VerdictName::Filtered, c);
    if !silent.is_empty() {
        unanswered_evidence(f, &mut v, &silent);
    }
    if let Some(line) = other_port_evidence(f) {
        v.evidence.push(line);
    }
    if !denied.is_empty() {
        v.evidence.push(format!(
            "{}/{} connects to {} refused locally with {}: a firewall rule on this host (OUTPUT \
             chain) or a security policy blocks them {}",
            denied.len(),
            f.n,
            f.addr,
            errnos(&denied),
            source_tag(&denied)
        ));
    }
    v.next_steps = filtered_next_steps(f, !denied.is_empty(), host == Some(false));
    Some(v)
}

/// `filtered`'s confidence at most, when another port of the same host went unanswered too:
/// a host that is down, unreachable, or behind a firewall that drops every port looks the
/// same to SYNs, and each needs a different fix.
pub(super) const HOST_SILENT_CONFIDENCE: f64 = 0.6;

/// What the connects to another port of the same host said (`measure::OtherPort`): `Some(true)`
/// when the host answered one (an RST or a SYN-ACK; a refusal by ICMP may come from a device
/// on the path), `Some(false)` when none was answered at all, `None` when they were not made
/// or ended otherwise (an ICMP error, a local failure).
fn other_port(f: &Facts) -> Option<bool> {
    let o = f.a.other_port.as_ref()?;
    if o.attempts.iter().any(host_answered) {
        Some(true)
    } else if !o.attempts.is_empty() && o.attempts.iter().all(|a| a.outcome.unanswered()) {
        Some(false)
    } else {
        None
    }
}

/// An RST or a SYN-ACK.
fn host_answered(a: &Attempt) -> bool {
    a.outcome == AttemptOutcome::Established
        || (a.outcome == AttemptOutcome::Refused && !a.refused_by_icmp)
}

/// The evidence line of the connects to another port of the same host.
fn other_port_evidence(f: &Facts) -> Option<String> {
    let o = f.a.other_port.as_ref()?;
    let n = o.attempts.len();
    let all: Vec<&Attempt> = o.attempts.iter().collect();
    let answered = all.iter().filter(|a| host_answered(a)).count();
    let syn_acks = all
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Established)
        .count();
    let whose = match &o.from_target {
        Some(t) => format!(" (target {t} of this run)"),
        None => String::new(),
    };
    Some(match other_port(f) {
        Some(true) => format!(
            "{answered}/{n} connects to port {}{whose} of the same host were answered ({} with \
             an RST, {syn_acks} with a SYN-ACK) {}: something answers for {} (the host, or a \
             device in front of it), so only port {}'s SYNs go unanswered: a firewall rule for \
             that port, or a listener that never answers",
            o.port,
            answered - syn_acks,
            source_tag(&all),
            f.ip,
            f.port
        ),
        Some(false) => format!(
            "{n}/{n} connects to port {} of the same host went unanswered too (deadline {} ms) \
             {}: the host may be down or unreachable, or a firewall may drop every port; SYNs \
             alone cannot tell these apart",
            o.port,
            o.deadline_ms,
            source_tag(&all)
        ),
        None => format!(
            "{n} connects to port {} of the same host ended with {} {}",
            o.port,
            errnos(&all),
            source_tag(&all)
        ),
    })
}

/// SYNs that got nothing back: how many, how long the kernel tried, and the patient connects.
fn unanswered_evidence(f: &Facts, v: &mut Verdict, silent: &[&Attempt]) {
    let timeouts: Vec<&Attempt> = silent
        .iter()
        .copied()
        .filter(|a| a.outcome == AttemptOutcome::Timeout)
        .collect();
    let cut = silent.len() - timeouts.len();
    let retx = retransmit_phrase(silent).unwrap_or_else(|| "(SYN retransmits unknown)".into());
    let mut line = if silent.iter().all(|a| a.source == Source::Kernel) {
        format!(
            "{}/{} SYNs to {} unanswered {retx}: no SYN-ACK, no RST, no ICMP",
            silent.len(),
            f.n,
            f.addr
        )
    } else {
        format!(
            "{}/{} connects to {} got no answer {retx}: connect() neither completed nor \
             failed with a refusal or an ICMP error",
            silent.len(),
            f.n,
            f.addr
        )
    };
    if !timeouts.is_empty() {
        let b = &f.m.syn_budget;
        line.push_str(&format!(
            "; the kernel gave up with ETIMEDOUT after a median {} (tcp_syn_retries={}, \
             tcp_syn_linear_timeouts={})",
            fmt_us(median(timeouts.iter().map(|a| a.elapsed_us)).unwrap_or(0)),
            b.tcp_syn_retries,
            b.tcp_syn_linear_timeouts
        ));
    }
    if cut > 0 {
        line.push_str(&format!(
            "; {cut} given up at the {} ms connect deadline",
            f.m.connect_deadline_ms
        ));
    }
    line.push(' ');
    line.push_str(&source_tag(silent));
    v.evidence.push(line);
    let p = &f.a.patient_attempts;
    if !p.is_empty() {
        let silent: Vec<&Attempt> = p.iter().filter(|a| a.outcome.unanswered()).collect();
        v.evidence.push(format!(
            "{}/{} patient connects with a {} ms deadline went unanswered too{} {}",
            silent.len(),
            p.len(),
            f.a.patient_deadline_ms.unwrap_or(0),
            retransmit_phrase(&silent)
                .map(|r| format!(", {r}"))
                .unwrap_or_default(),
            source_tag(&silent)
        ));
    }
}

/// Where to look for the filter (and, with connects `denied` on this host, its own rules).
/// `host_silent`: another port of the host went unanswered too, so whether the host is up
/// comes before the capture.
fn filtered_next_steps(f: &Facts, denied: bool, host_silent: bool) -> Vec<String> {
    let mut steps = vec![
        format!(
            "look for a DROP on tcp/{}: on {} iptables -L INPUT -n -v (or nft list ruleset); in \
             a cloud, the security group and network ACL inbound rules",
            f.port, f.ip
        ),
        format!(
            "tcpdump -ni any 'host {} and tcp port {}'   # here and on {}: do the SYNs arrive, \
             does a SYN-ACK leave?",
            f.ip, f.port, f.ip
        ),
    ];
    let up = format!(
        "is {} up? ip neigh show {} from its subnet, its console or its hypervisor",
        f.ip, f.ip
    );
    // Second when the host may be down: a firewall that drops every port but a few (a
    // security group) is as likely, and checked first.
    steps.insert(if host_silent { 1 } else { 2 }, up);
    if denied {
        steps.push(
            "iptables -L OUTPUT -n -v   # on this host: a rule rejecting the connect locally"
                .to_owned(),
        );
    }
    steps
}
