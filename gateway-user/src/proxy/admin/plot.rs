//! The status page's plot of one endpoint's last five minutes, as inline SVG drawn from its
//! `history` in `/status` (no script, no library).
//!
//! - Top, log scale: request latency p50 and p99, SYN-RTT p50 and p99 (one point per second;
//!   a line breaks where a second had no sample).
//! - Markers: a red line where the endpoint was ejected, a green one where it recovered (their
//!   evidence in a tooltip), an orange tick at the top for each second with hedged connects.
//! - Bottom band: failed attempts per second, stacked by reason.
//!
//! The root `<svg>` carries its scales (`data-t0`, `data-x0`, `data-px-per-s`, `data-y0`,
//! `data-y1`, `data-lo-us`, `data-hi-us`) and the marks their values (`data-counts` as
//! `second:count` pairs, `data-at-unix-ms`), so that a test can read the data back from the
//! rendered page and compare it with `/status`. Bars and ticks are one path per reason, so a
//! busy five minutes stays light (see `page` for the weight).

use std::fmt::Write as _;

use super::{
    page::escape,
    status::{EndpointStatus, HealthEvent, HealthEventKind},
};

/// Seconds shown, ending now.
pub(crate) const WINDOW_S: u64 = 300;
/// Plot area, in SVG units (= CSS px at the page's size).
const X0: f64 = 48.0;
const PX_PER_S: f64 = 2.0;
const WIDTH: f64 = X0 + PX_PER_S * WINDOW_S as f64 + 10.0;
/// Main area (log scale).
const Y0: f64 = 12.0;
const Y1: f64 = 132.0;
/// The errors band.
const E0: f64 = 140.0;
const E1: f64 = 168.0;
const HEIGHT: f64 = 184.0;

/// Series drawn on the log scale: name in `/status`, CSS class, label.
const LINES: [(&str, &str, &str); 4] = [
    ("latency_p50_us", "lat50", "latency p50"),
    ("latency_p99_us", "lat99", "latency p99"),
    ("syn_rtt_p50_us", "syn50", "SYN-RTT p50"),
    ("syn_rtt_p99_us", "syn99", "SYN-RTT p99"),
];

/// Colours of failure reasons, in the order first seen.
const REASON_COLOURS: [&str; 6] = [
    "#c2410c", "#a3180f", "#7c3aed", "#b7791f", "#0e7490", "#4b5563",
];

pub(crate) const STYLE: &str = r#"
.plots { display:grid; grid-template-columns:repeat(auto-fill,minmax(660px,1fr)); gap:6px 18px; padding:4px 16px 10px; }
.plot h4 { margin:6px 0 2px; font-size:13px; font-weight:600; }
.plot svg { width:100%; max-width:660px; height:auto; display:block; }
.plot svg text { font:10px ui-monospace,monospace; fill:#5d6978; }
.plot .grid { stroke:#e3e7ec; stroke-width:1; }
.plot polyline { fill:none; stroke-width:1.5; stroke-linejoin:round; }
.lat50 { stroke:#1b4fa6; fill:#1b4fa6; background:#1b4fa6; } .lat99 { stroke:#7aa2e3; fill:#7aa2e3; background:#7aa2e3; }
.syn50 { stroke:#14663a; fill:#14663a; background:#14663a; } .syn99 { stroke:#7cc49a; fill:#7cc49a; background:#7cc49a; }
.mark { stroke-width:1.5; } .mark.ejected { stroke:#d92d20; } .mark.recovered { stroke:#12b76a; }
.hedge { fill:#f79009; }
.legend { font-size:12px; color:#5d6978; } .legend i { display:inline-block; width:14px; height:3px; margin:0 4px 3px 10px; vertical-align:middle; }
"#;

/// `v` µs as a short label: `250µs`, `12ms`, `1.5s`.
fn label(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.0}ms", us / 1e3)
    } else {
        format!("{:.0}s", us / 1e6)
    }
}

/// The log scale: whole decades around the values, at least two.
fn bounds(e: &EndpointStatus) -> (f64, f64) {
    let h = &e.history.series;
    let values = [
        &h.latency_p50_us,
        &h.latency_p99_us,
        &h.syn_rtt_p50_us,
        &h.syn_rtt_p99_us,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .map(|&v| f64::from(v.max(1)));
    let (lo, hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi == 0.0 {
        return (100.0, 1e6);
    }
    let lo = 10f64.powf(lo.log10().floor()).max(1.0);
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 100.0);
    (lo, hi)
}

/// Geometry shared by the marks of one plot.
struct Scale {
    /// The Unix second at x = X0.
    t0: u64,
    lo: f64,
    hi: f64,
}

impl Scale {
    /// The left edge of second `s`'s column.
    fn x(&self, s: u64) -> f64 {
        X0 + (s.saturating_sub(self.t0)) as f64 * PX_PER_S
    }

    fn x_ms(&self, unix_ms: u64) -> f64 {
        X0 + (unix_ms as f64 / 1e3 - self.t0 as f64).max(0.0) * PX_PER_S
    }

    fn y(&self, us: u32) -> f64 {
        let f =
            (f64::from(us.max(1)).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10());
        ((Y1 - f.clamp(0.0, 1.0) * (Y1 - Y0)) * 10.0).round() / 10.0
    }
}

/// One endpoint's plot (`<figure>` with the SVG and its legend), as of `now_unix_ms`.
pub(crate) fn render(h: &mut String, e: &EndpointStatus, now_unix_ms: u64) {
    let (lo, hi) = bounds(e);
    let sc = Scale {
        t0: (now_unix_ms / 1000).saturating_sub(WINDOW_S),
        lo,
        hi,
    };
    let addr = escape(&e.address.to_string());
    let _ = write!(
        h,
        "<figure class=\"plot\"><h4 class=\"mono\">{addr}</h4>\
         <svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"last 5 minutes of {addr}\" \
         data-endpoint=\"{addr}\" data-t0=\"{}\" data-x0=\"{X0}\" data-px-per-s=\"{PX_PER_S}\" \
         data-y0=\"{Y0}\" data-y1=\"{Y1}\" data-lo-us=\"{lo}\" data-hi-us=\"{hi}\">",
        sc.t0
    );
    axes(h, &sc);
    for (name, class, _) in LINES {
        line(h, &sc, e, name, class);
    }
    errors(h, &sc, e);
    hedges(h, &sc, e);
    marks(h, &sc, &e.history.changes);
    h.push_str("</svg><div class=\"legend\">");
    for (_, class, text) in LINES {
        let _ = write!(h, "<i class=\"{class}\"></i>{text}");
    }
    legend_errors(h, e);
    h.push_str("</div></figure>\n");
}

fn axes(h: &mut String, sc: &Scale) {
    let mut d = sc.lo;
    while d <= sc.hi * 1.001 {
        let y = sc.y(d as u32);
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{X0}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            WIDTH - 10.0,
            X0 - 4.0,
            y + 3.0,
            label(d)
        );
        d *= 10.0;
    }
    let _ = write!(
        h,
        "<line class=\"grid\" x1=\"{X0}\" x2=\"{}\" y1=\"{E1}\" y2=\"{E1}\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">errors</text>",
        WIDTH - 10.0,
        X0 - 4.0,
        E1 - 8.0
    );
    for m in 0..=5u64 {
        let x = X0 + (m * 60) as f64 * PX_PER_S;
        let text = if m == 5 {
            "now".to_owned()
        } else {
            format!("-{} min", 5 - m)
        };
        let _ = write!(
            h,
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{text}</text>",
            HEIGHT - 4.0
        );
    }
}

/// The values of series `name` (`latency_p50_us`, …) by second.
fn values<'a>(e: &'a EndpointStatus, name: &str) -> &'a [Option<u32>] {
    let s = &e.history.series;
    match name {
        "latency_p50_us" => &s.latency_p50_us,
        "latency_p99_us" => &s.latency_p99_us,
        "syn_rtt_p50_us" => &s.syn_rtt_p50_us,
        _ => &s.syn_rtt_p99_us,
    }
}

/// A series as polylines over consecutive seconds with a value (a dot for a lone one), each
/// point at the middle of its second's column.
fn line(h: &mut String, sc: &Scale, e: &EndpointStatus, name: &str, class: &str) {
    let first = e.history.series.first_unix_s;
    let mut run: Vec<(f64, f64)> = Vec::new();
    let flush = |h: &mut String, run: &mut Vec<(f64, f64)>| {
        match run.len() {
            0 => {}
            1 => {
                let _ = write!(
                    h,
                    "<circle class=\"{class}\" data-series=\"{name}\" cx=\"{}\" cy=\"{}\" r=\"1.6\"/>",
                    run[0].0, run[0].1
                );
            }
            _ => {
                let _ = write!(
                    h,
                    "<polyline class=\"{class}\" data-series=\"{name}\" points=\""
                );
                for (i, (x, y)) in run.iter().enumerate() {
                    let _ = write!(h, "{}{x},{y}", if i == 0 { "" } else { " " });
                }
                h.push_str("\"/>");
            }
        }
        run.clear();
    };
    for (i, v) in values(e, name).iter().enumerate() {
        let s = first + i as u64;
        match v {
            Some(us) if s >= sc.t0 => run.push((sc.x(s) + PX_PER_S / 2.0, sc.y(*us))),
            _ => flush(h, &mut run),
        }
    }
    flush(h, &mut run);
}

/// Failed attempts per second, stacked by reason, scaled to the busiest second: one path per
/// reason, its bars as subpaths, with the counts by second in `data-counts` (`second:count`).
fn errors(h: &mut String, sc: &Scale, e: &EndpointStatus) {
    let s = &e.history.series;
    let totals: Vec<u32> = (0..s.requests.len())
        .map(|i| s.errors.values().map(|v| u32::from(v[i])).sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return;
    }
    let per = (E1 - E0) / f64::from(max);
    // Where the next bar of each second starts, as the stack grows.
    let mut tops = vec![E1; totals.len()];
    for (k, (reason, counts)) in s.errors.iter().enumerate() {
        let (mut d, mut data) = (String::new(), String::new());
        for (i, &c) in counts.iter().enumerate() {
            let second = s.first_unix_s + i as u64;
            if c == 0 || second < sc.t0 {
                continue;
            }
            let hgt = (f64::from(c) * per * 10.0).round() / 10.0;
            tops[i] -= hgt;
            let _ = write!(
                d,
                "M{} {:.1}h{PX_PER_S}v{hgt}h-{PX_PER_S}z",
                sc.x(second),
                tops[i]
            );
            let _ = write!(
                data,
                "{}{second}:{c}",
                if data.is_empty() { "" } else { " " }
            );
        }
        if !d.is_empty() {
            let _ = write!(
                h,
                "<path class=\"err\" data-reason=\"{}\" data-counts=\"{data}\" fill=\"{}\" d=\"{d}\"/>",
                escape(reason),
                REASON_COLOURS[k % REASON_COLOURS.len()],
            );
        }
    }
}

/// A tick at the top for each second with hedged connects; counts in `data-counts`.
fn hedges(h: &mut String, sc: &Scale, e: &EndpointStatus) {
    let s = &e.history.series;
    let (mut d, mut data) = (String::new(), String::new());
    for (i, &c) in s.hedges.iter().enumerate() {
        let second = s.first_unix_s + i as u64;
        if c == 0 || second < sc.t0 {
            continue;
        }
        let _ = write!(d, "M{} 2h5l-2.5 6z", sc.x(second) + PX_PER_S / 2.0 - 2.5);
        let _ = write!(
            data,
            "{}{second}:{c}",
            if data.is_empty() { "" } else { " " }
        );
    }
    if !d.is_empty() {
        let _ = write!(
            h,
            "<path class=\"hedge\" data-counts=\"{data}\" d=\"{d}\">\
             <title>connects hedged: no SYN-ACK by the connect deadline</title></path>"
        );
    }
}

/// Ejections and recoveries within the window.
fn marks(h: &mut String, sc: &Scale, changes: &[HealthEvent]) {
    for c in changes {
        let class = match c.event {
            HealthEventKind::Ejected => "ejected",
            HealthEventKind::Recovered => "recovered",
            _ => continue,
        };
        if c.at_unix_ms / 1000 < sc.t0 {
            continue;
        }
        let x = (sc.x_ms(c.at_unix_ms) * 10.0).round() / 10.0;
        let _ = write!(
            h,
            "<line class=\"mark {class}\" data-at-unix-ms=\"{}\" x1=\"{x}\" x2=\"{x}\" y1=\"{Y0}\" y2=\"{E1}\">\
             <title>{class}{}: {}</title></line>",
            c.at_unix_ms,
            c.reason
                .map(|r| format!(" ({})", r.name()))
                .unwrap_or_default(),
            escape(&c.detail),
        );
    }
}

fn legend_errors(h: &mut String, e: &EndpointStatus) {
    for (k, (reason, counts)) in e.history.series.errors.iter().enumerate() {
        let total: u32 = counts.iter().map(|&c| u32::from(c)).sum();
        let _ = write!(
            h,
            "<i style=\"background:{}\"></i>{} {total}",
            REASON_COLOURS[k % REASON_COLOURS.len()],
            escape(reason)
        );
    }
}

#[cfg(test)]
mod tests;
