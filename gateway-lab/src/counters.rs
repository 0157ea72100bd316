//! Per-namespace kernel counters, named as `nstat` names them (`TcpExtTCPSynRetrans`,
//! `TcpAttemptFails`, `Ip6InReceives`, …). They are the lab's independent witness: whatever the
//! observer or the proxy claims about SYN retransmits or listen overflows, the namespace's own
//! MIB counters must agree.

use std::{collections::BTreeMap, fmt, fs, io};

/// A snapshot of a namespace's `/proc/net/{netstat,snmp,snmp6}` counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStat {
    values: BTreeMap<String, u64>,
}

impl NetStat {
    /// SYN retransmits by connecting sockets (`LINUX_MIB_TCPSYNRETRANS`).
    pub const SYN_RETRANS: &str = "TcpExtTCPSynRetrans";
    /// All TCP segments retransmitted (`TCP_MIB_RETRANSSEGS`).
    pub const RETRANS_SEGS: &str = "TcpRetransSegs";
    /// Active opens (`connect()` that sent a SYN).
    pub const ACTIVE_OPENS: &str = "TcpActiveOpens";
    /// Connects that failed: RST, ICMP error or timeout in SYN_SENT.
    pub const ATTEMPT_FAILS: &str = "TcpAttemptFails";
    /// Established (or CLOSE_WAIT) connections that a RST ended (`TCP_MIB_ESTABRESETS`).
    pub const ESTAB_RESETS: &str = "TcpEstabResets";
    /// RSTs sent.
    pub const OUT_RSTS: &str = "TcpOutRsts";
    /// SYNs a listener dropped because its accept queue was full.
    pub const LISTEN_OVERFLOWS: &str = "TcpExtListenOverflows";
    /// SYNs a listener dropped for any reason (includes overflows).
    pub const LISTEN_DROPS: &str = "TcpExtListenDrops";
    /// Connections the kernel timed out (`LINUX_MIB_TCPTIMEOUTS`).
    pub const TIMEOUTS: &str = "TcpExtTCPTimeouts";

    /// Reads the counters of the calling thread's network namespace. Uses `/proc/thread-self`,
    /// because `/proc/self/net` follows the thread-group leader, which may be elsewhere.
    pub(crate) fn read_current_thread() -> io::Result<Self> {
        let mut stat = NetStat::default();
        for file in ["netstat", "snmp"] {
            stat.parse_paired(&fs::read_to_string(format!(
                "/proc/thread-self/net/{file}"
            ))?);
        }
        // snmp6 is absent when IPv6 is disabled; the v4 counters are still worth having.
        if let Ok(text) = fs::read_to_string("/proc/thread-self/net/snmp6") {
            stat.parse_flat(&text);
        }
        Ok(stat)
    }

    /// `Tcp: A B\nTcp: 1 2` → `TcpA=1`, `TcpB=2` (netstat, snmp).
    fn parse_paired(&mut self, text: &str) {
        let mut lines = text.lines();
        while let (Some(header), Some(values)) = (lines.next(), lines.next()) {
            let (Some((prefix, names)), Some((_, values))) =
                (header.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                // Tcp MaxConn is -1 ("no limit"): not a counter, skip it.
                if let Ok(value) = value.parse() {
                    self.values.insert(format!("{prefix}{name}"), value);
                }
            }
        }
    }

    /// `Ip6InReceives  12` per line (snmp6).
    fn parse_flat(&mut self, text: &str) {
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(name), Some(Ok(value))) = (fields.next(), fields.next().map(str::parse)) {
                self.values.insert(name.to_owned(), value);
            }
        }
    }

    /// The counter `name` (nstat spelling), or `None` if this kernel has no such counter.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.values.get(name).copied()
    }

    /// `self - earlier`, per counter (saturating, so a counter that went backwards reads 0).
    pub fn delta(&self, earlier: &NetStat) -> NetStat {
        NetStat {
            values: self
                .values
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(earlier.get(k).unwrap_or(0))))
                .collect(),
        }
    }

    /// All counters, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.values.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Non-zero counters, one `name value` per line, like `nstat`.
impl fmt::Display for NetStat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.iter().filter(|(_, v)| *v != 0) {
            writeln!(f, "{name:<32} {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paired_and_flat_formats() {
        let mut stat = NetStat::default();
        stat.parse_paired("TcpExt: SyncookiesSent TCPSynRetrans\nTcpExt: 0 3\nTcp: MaxConn ActiveOpens\nTcp: -1 7\n");
        stat.parse_flat("Ip6InReceives                   \t12\nIp6OutRequests 5\n");
        assert_eq!(stat.get(NetStat::SYN_RETRANS), Some(3));
        assert_eq!(stat.get(NetStat::ACTIVE_OPENS), Some(7));
        assert_eq!(stat.get("TcpMaxConn"), None);
        assert_eq!(stat.get("Ip6InReceives"), Some(12));
        let mut later = stat.clone();
        later.values.insert(NetStat::SYN_RETRANS.into(), 5);
        assert_eq!(later.delta(&stat).get(NetStat::SYN_RETRANS), Some(2));
        assert_eq!(later.delta(&stat).get(NetStat::ACTIVE_OPENS), Some(0));
    }
}
