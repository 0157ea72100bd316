//! How long the kernel keeps retransmitting a SYN nobody answers, from the sysctls of the
//! network namespace the probes run in, and the probes' default connect deadline derived from
//! it. Code that reasons about connect budgets must read these, not assume them
//! (docs/kernel.md, "Kernel settings that shape connect timing").
//!
//! The model follows `tcp_retransmit_timer()` and `tcp_write_timeout()` in
//! net/ipv4/tcp_timer.c (Linux 6.5+): the first RTO is `TCP_TIMEOUT_INIT` (1 s); in SYN_SENT
//! the RTO stays 1 s for the first `tcp_syn_linear_timeouts` retransmits and doubles after each
//! later one (up to `TCP_RTO_MAX`, 120 s). When the timer fires, the connect fails if
//! `tcp_syn_retries + tcp_syn_linear_timeouts` retransmits have gone out, or if the time since
//! the first SYN has reached `tcp_model_timeout(tcp_syn_retries)`, the classic exponential
//! budget: 2^(retries+1) - 1 s (`retransmits_timed_out()`). So 1/0 gives up at 3 s, 2/4 at 7 s
//! after 5 retransmits (measured: 7.12–7.14 s, docs/kernel.md "Measured behaviour") and 6/4 at
//! 131 s.

use std::{fs, time::Duration};

use super::measure::SynBudget;

/// `TCP_TIMEOUT_INIT` (include/net/tcp.h).
const INITIAL_RTO: Duration = Duration::from_secs(1);
/// `TCP_RTO_MAX` (include/net/tcp.h).
const MAX_RTO: Duration = Duration::from_secs(120);
/// Used when a sysctl cannot be read: Linux's default retries, and no linear timeouts (the
/// sysctl is absent before Linux 6.5).
const DEFAULT_SYN_RETRIES: u32 = 6;
const DEFAULT_SYN_LINEAR_TIMEOUTS: u32 = 0;

/// Added to the kernel's budget for the default deadline, so the kernel's ETIMEDOUT (with its
/// evidence) arrives before the probe gives up (the timer fires a little late: 3.04 s for 3).
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(300);
/// The default connect deadline is the kernel's budget plus [`DEADLINE_MARGIN`], but never
/// more than this: a blackholed target would otherwise hold `diagnose` for minutes with the
/// stock sysctls. Set `--connect-timeout-ms` to wait longer.
pub const MAX_DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// When the kernel fails a connect whose SYNs go unanswered.
pub fn syn_budget(syn_retries: u32, linear_timeouts: u32) -> Duration {
    let max_retransmits = syn_retries.saturating_add(linear_timeouts);
    let time_limit = model_timeout(syn_retries);
    let mut rto = INITIAL_RTO;
    let mut t = INITIAL_RTO;
    let mut sent = 0;
    // Each pass is one firing of the retransmit timer, at `t`.
    while sent < max_retransmits && t < time_limit {
        sent += 1;
        if sent > linear_timeouts {
            rto = (rto * 2).min(MAX_RTO);
        }
        t += rto;
    }
    t
}

/// `tcp_model_timeout()`: how long `retries` exponentially backed-off retransmits take.
fn model_timeout(retries: u32) -> Duration {
    // ilog2(TCP_RTO_MAX / TCP_TIMEOUT_INIT) = ilog2(120) = 6.
    const LINEAR_BACKOFF_THRESH: u32 = 6;
    if retries <= LINEAR_BACKOFF_THRESH {
        INITIAL_RTO * ((2u32 << retries) - 1)
    } else {
        INITIAL_RTO * ((2u32 << LINEAR_BACKOFF_THRESH) - 1)
            + MAX_RTO * (retries - LINEAR_BACKOFF_THRESH)
    }
}

/// The probes' connect deadline when none is configured.
pub fn default_deadline(budget: &SynBudget) -> Duration {
    (Duration::from_millis(budget.budget_ms) + DEADLINE_MARGIN).min(MAX_DEFAULT_CONNECT_TIMEOUT)
}

fn read_u32(key: &str) -> Option<u32> {
    fs::read_to_string(format!("/proc/sys/net/ipv4/{key}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads the SYN sysctls of the calling process's network namespace (IPv6 uses them too).
pub fn read() -> SynBudget {
    let retries = read_u32("tcp_syn_retries").unwrap_or(DEFAULT_SYN_RETRIES);
    // Absent before Linux 6.5 (commit "tcp: add sysctl_tcp_syn_linear_timeouts").
    let linear = read_u32("tcp_syn_linear_timeouts").unwrap_or(DEFAULT_SYN_LINEAR_TIMEOUTS);
    SynBudget {
        tcp_syn_retries: retries,
        tcp_syn_linear_timeouts: linear,
        budget_ms: syn_budget(retries, linear).as_millis() as u64,
    }
}

/// `net.ipv4.ip_local_port_range` (IPv6 uses it too).
pub fn local_port_range() -> Option<[u16; 2]> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some([it.next()?.ok()?, it.next()?.ok()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_exponential_backoff() {
        assert_eq!(syn_budget(1, 0), Duration::from_secs(3));
        assert_eq!(syn_budget(2, 0), Duration::from_secs(7));
        assert_eq!(syn_budget(6, 0), Duration::from_secs(127));
    }

    #[test]
    fn linear_timeouts_keep_one_second_within_the_same_time_limit() {
        // Retransmits at 1, 2, 3, 4, 5 s; at 7 s the time limit of 2 retries has passed.
        // Measured on this machine kind: 5 retransmits, ETIMEDOUT at 7.12 s.
        assert_eq!(syn_budget(2, 4), Duration::from_secs(7));
        // The defaults: 10 retransmits (1..5, 7, 11, 19, 35, 67 s), give up at 131 s.
        assert_eq!(syn_budget(6, 4), Duration::from_secs(131));
        assert_eq!(syn_budget(1, 4), Duration::from_secs(3));
    }

    #[test]
    fn the_default_deadline_is_capped() {
        let b = SynBudget {
            tcp_syn_retries: 6,
            tcp_syn_linear_timeouts: 4,
            budget_ms: syn_budget(6, 4).as_millis() as u64,
        };
        assert_eq!(default_deadline(&b), MAX_DEFAULT_CONNECT_TIMEOUT);
        let b = SynBudget {
            tcp_syn_retries: 1,
            tcp_syn_linear_timeouts: 0,
            budget_ms: 3000,
        };
        assert_eq!(default_deadline(&b), Duration::from_millis(3300));
    }
}
