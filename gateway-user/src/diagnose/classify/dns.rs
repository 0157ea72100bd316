//! `dns_failure`: a name that did not resolve, or took longer than [`SLOW_RESOLUTION`] to,
//! which every new connection that resolves it pays again.

use super::{SLOW_RESOLUTION, Verdict, VerdictName, phrases::fmt_us};
use crate::diagnose::measure::{ResolutionMethod, TargetMeasurements};

pub(super) fn dns_failure(m: &TargetMeasurements) -> Option<Verdict> {
    let r = &m.resolution;
    if r.method != ResolutionMethod::Dns {
        return None;
    }
    let took = fmt_us(r.elapsed_us);
    let host = &r.host;
    if let Some(err) = &r.error {
        let mut v = Verdict::new(VerdictName::DnsFailure, 0.99);
        v.evidence.push(format!(
            "resolving {host} failed after {took}: {err}; no address to connect to"
        ));
        v.next_steps = vec![
            format!(
                "getent ahosts {host}   # what this host's resolver returns (/etc/nsswitch.conf: \
                 files, then dns)"
            ),
            format!(
                "cat /etc/resolv.conf; dig {host} @<nameserver>   # is the nameserver reachable \
                 from here, and does it answer NXDOMAIN, SERVFAIL or nothing?"
            ),
            format!("check the spelling of {host} and that its DNS record exists"),
        ];
        return Some(v);
    }
    let slow = SLOW_RESOLUTION.as_micros() as u64;
    if r.elapsed_us <= slow {
        return None;
    }
    // 1 s → 0.6, 3 s or more → 0.9.
    let over = (r.elapsed_us - slow) as f64 / 2e6;
    let mut v = Verdict::new(VerdictName::DnsFailure, 0.6 + 0.3 * over.min(1.0));
    let addrs: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
    v.evidence.push(format!(
        "resolving {host} took {took} (more than {} s) before it returned {}: every new \
         connection that resolves the name waits as long",
        SLOW_RESOLUTION.as_secs(),
        addrs.join(", ")
    ));
    v.next_steps = vec![
        format!("time getent ahosts {host}   # how long this host's resolver takes"),
        format!(
            "cat /etc/resolv.conf; dig {host} @<nameserver>   # does the first nameserver answer \
             at once? options timeout/attempts, and search domains × ndots multiply queries"
        ),
        "cache resolutions (nscd, systemd-resolved, dnsmasq) or resolve once and reuse the \
         addresses"
            .to_owned(),
    ];
    Some(v)
}
