//! `GET /`: the status page. Server-rendered HTML with inline CSS, from the same [`Status`] as
//! `/status`; no scripts, no assets, no build step. It reloads itself every
//! [`REFRESH_SECONDS`] (`<meta http-equiv="refresh">`). Every value that comes from the config
//! or the network (names, addresses, evidence text) goes through [`escape`].
//!
//! Per cluster: a table of endpoints (state, why, since when, kernel SYN-RTT p50/p99, connect
//! deadline and where it comes from, response latency (peak-EWMA) and what set it, requests in
//! flight); a plot per endpoint of its last five
//! minutes (`plot`: latency and SYN-RTT p50/p99, failures by reason, ejections, recoveries and
//! hedges); a timeline of the cluster's health changes with their evidence (`timeline`); and
//! the recent failures and ejections, newest first, with their kernel evidence. Elements carry
//! `data-endpoint` / `data-state` attributes so that tests can read the rendered page.
//!
//! Weight (measured by the test `page_weight_is_bounded`, uncompressed): 5.5 KiB without
//! endpoints; about 16 KiB more per endpoint under a steady load (a latency point every second,
//! failures every few seconds, its 20 recent events), about 43 KiB in the worst case (all four
//! series full, 64 health changes with their evidence on the timeline). Four endpoints: 64 KiB
//! steady, 173 KiB at worst, every 2 s while the page is open.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use super::{
    plot,
    status::{ClusterStatus, EndpointStatus, HealthEvent, LatencyStatus, Status},
    timeline,
};
use crate::{decide::health::Reason, proxy::access_log::rfc3339};

pub(crate) const REFRESH_SECONDS: u32 = 2;
/// Recent events shown per cluster.
const EVENTS_SHOWN: usize = 30;

/// `s` as HTML text or attribute value.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What a health reason means, for a reader in the middle of an incident.
fn explain(reason: Reason) -> &'static str {
    match reason {
        Reason::Refused => {
            "RST or ICMP port unreachable: nothing listening on the port, or a firewall rejecting"
        }
        Reason::SynUnanswered => {
            "SYNs unanswered: no SYN-ACK, no RST, no ICMP (dropped, or host down)"
        }
        Reason::Unreachable => "ICMP unreachable: no route to the host, or a firewall prohibiting",
        Reason::HostDied => "RTOs with the request unACKed: host or path died mid-request",
        Reason::Overloaded => "handshakes needed SYN retransmits: accept queue full or lossy path",
        Reason::SlowBackend => "request ACKed by the upstream's kernel, response late",
        Reason::SlowNetwork => {
            "request bytes left unACKed while waiting: the path delays or loses packets"
        }
        Reason::ProbeFailed => "an active probe failed while probing",
        Reason::UnexpectedStatus => "the health probe's GET answered another status than expected",
        Reason::TlsFailure => {
            "TLS handshakes failed on healthy TCP connections: certificate, CA, name or TLS server"
        }
        Reason::ErrorStatus => {
            "responses in a row were 502, 503 or 504: it answers, but cannot serve"
        }
    }
}

const STYLE: &str = r#"
:root { --fg:#1c2430; --muted:#5d6978; --line:#e3e7ec; --bg:#f4f6f9; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:var(--bg); }
header { background:#1c2430; color:#fff; padding:14px 28px; display:flex; flex-wrap:wrap; gap:10px 28px; align-items:center; }
header h1 { font-size:19px; margin:0; letter-spacing:.3px; }
header .meta { color:#c5ceda; }
main { padding:18px 28px 28px; max-width:1400px; }
.pill { display:inline-block; padding:2px 10px; border-radius:11px; font-weight:600; font-size:12.5px; }
.pill.kernel { background:#1f7a46; color:#fff; } .pill.userspace { background:#b7791f; color:#fff; }
.pill.ready { background:#1f7a46; color:#fff; } .pill.notready { background:#b42318; color:#fff; }
.notice { background:#fff4e5; border:1px solid #f5c27a; border-radius:6px; padding:8px 12px; margin-bottom:14px; }
section.cluster { background:#fff; border:1px solid var(--line); border-radius:8px; margin-bottom:18px; overflow:hidden; }
section.cluster h2 { font-size:16px; margin:0; padding:12px 16px; border-bottom:1px solid var(--line); background:#fafbfc; }
section.cluster h2 small { font-weight:normal; color:var(--muted); margin-left:10px; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:8px 16px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-size:12px; text-transform:uppercase; letter-spacing:.4px; color:var(--muted); font-weight:600; }
td.num { font-variant-numeric:tabular-nums; white-space:nowrap; }
.mono, code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
.state { display:inline-block; min-width:68px; text-align:center; padding:2px 9px; border-radius:11px; font-weight:700; font-size:12px; }
.state.healthy { background:#dcf3e3; color:#14663a; } .state.suspect { background:#fff1c2; color:#7a5600; }
.state.slow { background:#ffe4cc; color:#8a3b00; }
.state.ejected { background:#fde1df; color:#a3180f; } .state.probing { background:#e1ebfd; color:#1b4fa6; }
.why { color:var(--muted); font-size:12.5px; }
h3 { font-size:13px; margin:14px 16px 6px; color:var(--muted); text-transform:uppercase; letter-spacing:.4px; }
ul.events { list-style:none; margin:0 0 12px; padding:0 16px; }
ul.events li { padding:5px 0; border-top:1px dashed var(--line); }
ul.events li:first-child { border-top:none; }
ul.events time { color:var(--muted); margin-right:8px; }
.ev { font-weight:700; margin:0 6px; } .ev.ejected, .ev.failure { color:#a3180f; } .ev.recovered { color:#14663a; } .ev.suspect, .ev.ejection_refused { color:#7a5600; } .ev.probing { color:#1b4fa6; }
.detail { display:block; margin:2px 0 0 0; color:#2f3a48; word-break:break-word; }
.empty { color:var(--muted); padding:0 16px 12px; }
footer { color:var(--muted); font-size:12px; padding:0 28px 20px; }
"#;

fn ago(now_ms: u64, then_ms: u64) -> String {
    let d = now_ms.saturating_sub(then_ms);
    if d < 1_000 {
        format!("{d} ms ago")
    } else if d < 120_000 {
        format!("{:.1} s ago", d as f64 / 1e3)
    } else {
        format!("{} min ago", d / 60_000)
    }
}

pub(crate) fn clock(unix_ms: u64) -> String {
    // HH:MM:SS.mmm UTC, from the RFC 3339 text.
    let t = rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(unix_ms));
    t.get(11..23).unwrap_or(&t).to_owned()
}

fn us(v: Option<u64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(us) if us < 1_000 => format!("{us} µs"),
        Some(us) if us < 1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        Some(us) => format!("{:.2} s", us as f64 / 1e6),
    }
}

pub(crate) fn render(s: &Status) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>gateway status</title><style>{STYLE}{}{}</style></head><body>\n<header><h1>gateway</h1>\
         <span class=\"meta\">v{} · up {:.0} s</span>",
        plot::STYLE,
        timeline::STYLE,
        escape(&s.version),
        s.uptime_s
    );
    let o = &s.observer;
    if o.kernel_signals {
        let _ = write!(
            h,
            "<span id=\"observer\" data-mode=\"kernel\"><span class=\"pill kernel\">kernel signals</span> \
             <span class=\"meta\">eBPF observer on cgroup <span class=\"mono\">{}</span>{}</span></span>",
            escape(o.cgroup.as_deref().unwrap_or("?")),
            match o.events_lost {
                Some(n) if n > 0 => format!(" · {n} events lost"),
                _ => String::new(),
            }
        );
    } else {
        let _ = write!(
            h,
            "<span id=\"observer\" data-mode=\"userspace\"><span class=\"pill userspace\">userspace timing only</span></span>"
        );
    }
    let _ = write!(
        h,
        "<span id=\"readiness\" data-ready=\"{}\">{}</span></header>\n<main>\n",
        s.ready,
        if s.ready {
            "<span class=\"pill ready\">ready</span>"
        } else {
            "<span class=\"pill notready\">not ready</span>"
        }
    );
    if !o.kernel_signals {
        let _ = writeln!(
            h,
            "<div class=\"notice\">No kernel signals: health, deadlines and errors use userspace \
             timing alone. Why: {}</div>",
            escape(o.reason.as_deref().unwrap_or("unknown"))
        );
    }
    for p in &s.not_ready {
        let _ = writeln!(h, "<div class=\"notice\">{}</div>", escape(p));
    }
    for c in &s.clusters {
        cluster(&mut h, c, s.now_unix_ms, o.kernel_signals);
    }
    if s.clusters.is_empty() {
        h.push_str("<p class=\"empty\">No clusters configured.</p>\n");
    }
    let _ = write!(
        h,
        "</main>\n<footer>Rendered {} UTC; reloads every {REFRESH_SECONDS} s. \
         JSON: <a href=\"/status\">/status</a> · metrics: <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/readyz\">/readyz</a></footer>\n</body></html>\n",
        clock(s.now_unix_ms)
    );
    h
}

fn cluster(h: &mut String, c: &ClusterStatus, now: u64, kernel: bool) {
    let _ = writeln!(
        h,
        "<section class=\"cluster\" data-cluster=\"{name}\"><h2>cluster {name}<small>{} · {}/{} endpoints routable</small></h2>",
        c.lb_policy.name(),
        c.routable,
        c.endpoints.len(),
        name = escape(&c.name),
    );
    for d in c.dns.iter().filter(|d| !d.resolves) {
        let _ = writeln!(
            h,
            "<p class=\"dns\" data-endpoint=\"{e}\">DNS: <span class=\"mono\">{e}</span> does not \
             resolve since <time title=\"{ago}\">{at}</time> ({why}); {kept}.</p>",
            e = escape(&d.endpoint),
            ago = ago(now, d.since_unix_ms),
            at = clock(d.since_unix_ms),
            why = escape(d.error.as_deref().unwrap_or("")),
            kept = if d.addresses.is_empty() {
                "it never resolved, so the cluster has no address from it".to_owned()
            } else {
                let list: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
                format!("its last addresses stay: {}", list.join(", "))
            },
        );
    }
    let _ = writeln!(
        h,
        "<table><thead><tr><th>endpoint</th><th>state</th><th>reason</th><th>since</th>\
         <th>{rtt}</th><th>connect deadline</th><th>latency (peak EWMA)</th><th>in flight</th></tr></thead><tbody>",
        // Without kernel signals the samples are connect() times, not SYN-RTTs.
        rtt = if kernel {
            "SYN-RTT p50 / p99 (kernel)"
        } else {
            "connect time p50 / p99"
        },
    );
    for e in &c.endpoints {
        endpoint_row(h, e, now);
    }
    h.push_str("</tbody></table>\n<h3>last 5 minutes</h3>\n<div class=\"plots\">\n");
    for e in &c.endpoints {
        plot::render(h, e, now);
    }
    h.push_str("</div>\n");
    timeline::render(h, c, now);
    h.push_str("<h3>recent failures and ejections</h3>\n");
    let mut events: Vec<(String, &HealthEvent)> = c
        .endpoints
        .iter()
        .flat_map(|e| e.recent.iter().map(move |ev| (e.address.to_string(), ev)))
        .collect();
    events.sort_by_key(|(_, ev)| std::cmp::Reverse(ev.at_unix_ms));
    if events.is_empty() {
        h.push_str("<p class=\"empty\">None.</p>\n");
    } else {
        h.push_str("<ul class=\"events\">\n");
        for (addr, ev) in events.into_iter().take(EVENTS_SHOWN) {
            let _ = writeln!(
                h,
                "<li data-endpoint=\"{addr}\" data-event=\"{kind}\"><time title=\"{ago}\">{at}</time>\
                 <span class=\"mono\">{addr}</span><span class=\"ev {kind}\">{kind}</span>{reason}\
                 <span class=\"detail mono\">{detail}</span></li>",
                addr = escape(&addr),
                kind = ev.event.name(),
                ago = ago(now, ev.at_unix_ms),
                at = clock(ev.at_unix_ms),
                reason = ev
                    .reason
                    .map(|r| format!("<span class=\"why\">{}</span>", r.name()))
                    .unwrap_or_default(),
                detail = escape(&ev.detail),
            );
        }
        h.push_str("</ul>\n");
    }
    h.push_str("</section>\n");
}

/// `0.61 ms (1834 from responses; slow above 100.5 ms)`, or `–`.
fn latency_cell(l: &LatencyStatus) -> String {
    let Some(v) = l.ewma_ms else {
        return "–".to_owned();
    };
    let mut out = format!(
        "{} <span class=\"why\">({} sample{}, peak from {}",
        us(Some((v * 1e3) as u64)),
        l.samples,
        if l.samples == 1 { "" } else { "s" },
        l.source.name()
    );
    if let Some(t) = l.slow_above_ms {
        let _ = write!(out, "; slow above {}", us(Some((t * 1e3) as u64)));
    }
    if l.awaiting_head > 0 {
        let _ = write!(out, "; {} awaiting a head", l.awaiting_head);
    }
    out.push_str(")</span>");
    out
}

fn endpoint_row(h: &mut String, e: &EndpointStatus, now: u64) {
    let reason = match e.reason {
        Some(r) => format!(
            "<span class=\"mono\">{}</span><br><span class=\"why\">{}</span>",
            r.name(),
            escape(explain(r))
        ),
        None => "–".to_owned(),
    };
    let until = match e.ejected_until_unix_ms {
        Some(u) if u > now => format!(
            "<br><span class=\"why\">ejected for {:.1} s more</span>",
            (u - now) as f64 / 1e3
        ),
        _ => String::new(),
    };
    // An HTTP/2 upstream's learned limit: why a new connection opens every N requests.
    let mut h2_limit = match e.h2_requests_per_connection {
        Some(n) => format!(
            "<br><span class=\"why\" data-h2-limit=\"{n}\">at most {n} requests per HTTP/2 \
             connection (its GOAWAYs)</span>"
        ),
        None => String::new(),
    };
    // Back from an ejection and warming up: why it takes less than its share.
    if let Some(p) = e.slow_start_percent {
        let _ = write!(
            h2_limit,
            "<br><span class=\"why\" data-slow-start=\"{p}\">slow start: {p} % of its share</span>"
        );
    }
    let _ = writeln!(
        h,
        "<tr data-endpoint=\"{addr}\" data-state=\"{state}\"><td class=\"mono\">{addr}{h2_limit}</td>\
         <td><span class=\"state {state}\">{state}</span></td><td>{reason}{until}</td>\
         <td class=\"num\">{since}</td><td class=\"num\">{p50} / {p99} <span class=\"why\">({n} sample{s})</span></td>\
         <td class=\"num\">{deadline:.0} ms <span class=\"why\">({source})</span></td>\
         <td class=\"num\" data-latency-ms=\"{latency_attr}\">{latency}</td><td class=\"num\">{in_flight}</td></tr>",
        addr = escape(&e.address.to_string()),
        state = e.state.name(),
        since = ago(now, e.since_unix_ms),
        p50 = us(e.syn_rtt.p50_us),
        p99 = us(e.syn_rtt.p99_us),
        n = e.syn_rtt.samples,
        s = if e.syn_rtt.samples == 1 { "" } else { "s" },
        deadline = e.connect_deadline_ms,
        source = e.connect_deadline_source.name(),
        latency_attr = e.latency.ewma_ms.map(|m| m.to_string()).unwrap_or_default(),
        latency = latency_cell(&e.latency),
        in_flight = e.in_flight,
    );
}

#[cfg(test)]
mod tests {
    use super::{super::status::*, *};
    use crate::{config::LbPolicy, decide::health::State};

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            uptime_s: 3.0,
            started_unix_ms: 1_000,
            now_unix_ms: 4_000,
            draining: false,
            ready: true,
            not_ready: vec![],
            observer: ObserverStatus {
                mode: SignalOrigin::Userspace,
                kernel_signals: false,
                reason: Some("not root <b>".into()),
                cgroup: None,
                events_lost: None,
            },
            clusters: vec![ClusterStatus {
                name: "api<script>".into(),
                lb_policy: LbPolicy::RoundRobin,
                hash_on: None,
                routable: 1,
                dns: Vec::new(),
                endpoints: vec![EndpointStatus {
                    address: "127.0.0.1:1".parse().unwrap(),
                    weight: 1,
                    state: State::Ejected,
                    reason: Some(Reason::Refused),
                    since_unix_ms: 3_000,
                    ejected_until_unix_ms: Some(5_000),
                    connect_deadline_ms: 250.0,
                    connect_deadline_source: ConnectDeadlineSource::Configured,
                    syn_rtt: SynRtt {
                        p50_us: None,
                        p99_us: None,
                        samples: 0,
                    },
                    in_flight: 0,
                    latency: LatencyStatus::default(),
                    h2_requests_per_connection: None,
                    slow_start_percent: None,
                    recent: vec![HealthEvent {
                        at_unix_ms: 3_000,
                        event: HealthEventKind::Ejected,
                        reason: Some(Reason::Refused),
                        detail: "kernel: refused, 1 SYN sent, RST received, \"<ECONNREFUSED>\""
                            .into(),
                    }],
                    history: EndpointHistory::default(),
                }],
            }],
        }
    }

    #[test]
    fn config_and_evidence_text_are_escaped() {
        let html = render(&status());
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("api&lt;script&gt;"), "{html}");
        assert!(html.contains("not root &lt;b&gt;"), "{html}");
        assert!(
            html.contains("RST received, &quot;&lt;ECONNREFUSED&gt;&quot;"),
            "{html}"
        );
    }

    #[test]
    fn a_slow_endpoint_shows_its_latency_and_why() {
        let mut s = status();
        let e = &mut s.clusters[0].endpoints[0];
        e.state = State::Slow;
        e.reason = Some(Reason::SlowBackend);
        e.ejected_until_unix_ms = None;
        e.latency = LatencyStatus {
            ewma_ms: Some(2998.51),
            samples: 12,
            source: crate::decide::latency::Source::Responses,
            awaiting_head: 1,
            slow_above_ms: Some(100.6),
        };
        let html = render(&s);
        assert!(html.contains("data-state=\"slow\""), "{html}");
        assert!(
            html.contains("<span class=\"state slow\">slow</span>"),
            "{html}"
        );
        assert!(html.contains("data-latency-ms=\"2998.51\""), "{html}");
        assert!(
            html.contains("3.00 s <span class=\"why\">(12 samples, peak from responses; slow above 100.6 ms; 1 awaiting a head)"),
            "{html}"
        );
        assert!(html.contains("request ACKed by the upstream&#39;s kernel, response late"));
    }

    #[test]
    fn a_learned_http2_limit_is_shown_under_its_endpoint() {
        let mut s = status();
        assert!(!render(&s).contains("data-h2-limit"));
        s.clusters[0].endpoints[0].h2_requests_per_connection = Some(100);
        let html = render(&s);
        assert!(
            html.contains(
                "127.0.0.1:1<br><span class=\"why\" data-h2-limit=\"100\">at most 100 requests \
                 per HTTP/2 connection (its GOAWAYs)</span></td>"
            ),
            "{html}"
        );
    }

    #[test]
    fn rows_carry_state_reason_and_refresh() {
        let html = render(&status());
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
        assert!(html.contains("data-endpoint=\"127.0.0.1:1\" data-state=\"ejected\""));
        assert!(html.contains("RST or ICMP port unreachable: nothing listening on the port"));
        assert!(html.contains("ejected for 1.0 s more"));
        assert!(html.contains("00:00:03.000"), "event time: {html}");
    }
}
