//! The status page's timeline of a cluster's health changes over the last five minutes: a lane
//! per endpoint coloured by its state (healthy, suspect, ejected, probing) as its transitions
//! (`history.changes` in `/status`) say, then the changes themselves, newest first, each with
//! the evidence behind it. Inline SVG and HTML, no script.
//!
//! A lane's state before its first change in the window is the state its previous change set
//! (healthy when it had none); the part before the endpoint existed is left blank.

use std::fmt::Write as _;

use super::{
    page::{clock, escape},
    plot::WINDOW_S,
    status::{ClusterStatus, EndpointStatus, HealthEvent, HealthEventKind},
};
use crate::decide::health::State;

const X0: f64 = 128.0;
const PX_PER_S: f64 = 2.0;
const LANE: f64 = 16.0;
/// Changes listed under the lanes.
const LISTED: usize = 40;

pub(crate) const STYLE: &str = r#"
.timeline svg { display:block; margin:4px 16px 0; max-width:760px; width:calc(100% - 32px); height:auto; }
.timeline svg text { font:10px ui-monospace,monospace; fill:#5d6978; }
.lane.healthy { fill:#b9e6c9; } .lane.suspect { fill:#ffe08a; } .lane.ejected { fill:#f7a8a1; } .lane.probing { fill:#b6cdf7; }
"#;

/// The state a transition leaves the endpoint in.
fn state_after(kind: HealthEventKind) -> Option<State> {
    match kind {
        HealthEventKind::Suspect | HealthEventKind::EjectionRefused => Some(State::Suspect),
        HealthEventKind::Ejected => Some(State::Ejected),
        HealthEventKind::Probing => Some(State::Probing),
        HealthEventKind::Recovered => Some(State::Healthy),
        HealthEventKind::Failure => None,
    }
}

/// The spans `(from_ms, to_ms, state)` of one endpoint within `[start_ms, now_ms]`.
pub(crate) fn spans(e: &EndpointStatus, start_ms: u64, now_ms: u64) -> Vec<(u64, u64, State)> {
    let existed = e.history.series.first_unix_s * 1000;
    let mut at = start_ms.max(existed.min(now_ms));
    let mut state = State::Healthy;
    let mut out = Vec::new();
    for c in &e.history.changes {
        let Some(next) = state_after(c.event) else {
            continue;
        };
        if c.at_unix_ms > at {
            out.push((at, c.at_unix_ms.min(now_ms), state));
            at = c.at_unix_ms.min(now_ms);
        }
        state = next;
    }
    if now_ms > at {
        out.push((at, now_ms, state));
    }
    out
}

/// The cluster's timeline: lanes, then the list of changes.
pub(crate) fn render(h: &mut String, c: &ClusterStatus, now_ms: u64) {
    h.push_str("<h3>health over the last 5 minutes</h3>\n<div class=\"timeline\">");
    let start_ms = now_ms.saturating_sub(WINDOW_S * 1000);
    let x = |ms: u64| X0 + (ms.saturating_sub(start_ms)) as f64 / 1e3 * PX_PER_S;
    let height = LANE * c.endpoints.len() as f64 + 14.0;
    let width = X0 + WINDOW_S as f64 * PX_PER_S + 8.0;
    let _ = write!(
        h,
        "<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"health timeline\">"
    );
    for (i, e) in c.endpoints.iter().enumerate() {
        let y = i as f64 * LANE;
        let addr = escape(&e.address.to_string());
        let _ = write!(
            h,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{addr}</text>",
            X0 - 6.0,
            y + 11.0
        );
        for (from, to, state) in spans(e, start_ms, now_ms) {
            let _ = write!(
                h,
                "<rect class=\"lane {s}\" data-endpoint=\"{addr}\" data-state=\"{s}\" data-from-ms=\"{from}\" \
                 data-to-ms=\"{to}\" x=\"{:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{}\"/>",
                x(from),
                y + 2.0,
                (x(to) - x(from)).max(0.5),
                LANE - 4.0,
                s = state.name(),
            );
        }
    }
    let _ = write!(
        h,
        "<text x=\"{X0}\" y=\"{}\">-5 min</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">now</text></svg>",
        height - 2.0,
        width - 8.0,
        height - 2.0
    );
    list(h, c, start_ms);
    h.push_str("</div>\n");
}

/// The changes of the window, newest first, with their evidence.
fn list(h: &mut String, c: &ClusterStatus, start_ms: u64) {
    let mut changes: Vec<(String, &HealthEvent)> = c
        .endpoints
        .iter()
        .flat_map(|e| {
            let addr = e.address.to_string();
            e.history
                .changes
                .iter()
                .filter(move |ev| ev.at_unix_ms >= start_ms)
                .map(move |ev| (addr.clone(), ev))
        })
        .collect();
    changes.sort_by_key(|(_, ev)| std::cmp::Reverse(ev.at_unix_ms));
    if changes.is_empty() {
        h.push_str("<p class=\"empty\">No health changes in the last 5 minutes.</p>");
        return;
    }
    h.push_str("<ul class=\"events changes\">\n");
    for (addr, ev) in changes.into_iter().take(LISTED) {
        let _ = writeln!(
            h,
            "<li data-endpoint=\"{addr}\" data-change=\"{kind}\" data-at-unix-ms=\"{at}\"><time>{clock}</time>\
             <span class=\"mono\">{addr}</span><span class=\"ev {kind}\">{kind}</span>{reason}\
             <span class=\"detail mono\">{detail}</span></li>",
            addr = escape(&addr),
            kind = ev.event.name(),
            at = ev.at_unix_ms,
            clock = clock(ev.at_unix_ms),
            reason = ev
                .reason
                .map(|r| format!("<span class=\"why\">{}</span>", r.name()))
                .unwrap_or_default(),
            detail = escape(&ev.detail),
        );
    }
    h.push_str("</ul>");
}
