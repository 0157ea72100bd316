//! The plot and the timeline, read back from the markup: every mark where its value says, and
//! the page's weight in the worst case.

use std::collections::BTreeMap;

use super::{super::status::*, *};
use crate::{
    config::LbPolicy,
    decide::health::{Reason, State},
};

const NOW_MS: u64 = 1_763_740_300_500;
const NOW_S: u64 = NOW_MS / 1000;

fn event(at_unix_ms: u64, event: HealthEventKind, reason: Option<Reason>) -> HealthEvent {
    HealthEvent {
        at_unix_ms,
        event,
        reason,
        detail: format!(
            "connect timeout to 10.0.0.5:8080 after 50 ms; kernel: aborted, 1 SYN sent, no SYN-ACK, no RST <{at_unix_ms}>"
        ),
    }
}

/// An endpoint with every second of the window filled: `full` sets all four series.
fn endpoint(port: u16, full: bool) -> EndpointStatus {
    let n = WINDOW_S as usize;
    let first = NOW_S - WINDOW_S;
    let wave = |i: usize, base: u32| Some(base + (i as u32 * 7919) % (base * 3));
    let mut errors = BTreeMap::new();
    errors.insert(
        "connect_timeout".to_owned(),
        (0..n).map(|i| u16::from(i % 7 == 0) * 3).collect(),
    );
    errors.insert(
        "connect_refused".to_owned(),
        (0..n).map(|i| u16::from(i % 11 == 0)).collect(),
    );
    let changes: Vec<HealthEvent> = (0..64u64)
        .map(|k| {
            let kind = [
                HealthEventKind::Suspect,
                HealthEventKind::Ejected,
                HealthEventKind::Probing,
                HealthEventKind::Recovered,
            ][k as usize % 4];
            event(
                (first + 4 + k * 4) * 1000 + 250,
                kind,
                Some(Reason::SynUnanswered),
            )
        })
        .collect();
    EndpointStatus {
        address: format!("10.0.0.5:{port}").parse().unwrap(),
        weight: 1,
        state: State::Healthy,
        reason: None,
        since_unix_ms: NOW_MS - 1000,
        ejected_until_unix_ms: None,
        connect_deadline_ms: 50.0,
        connect_deadline_source: ConnectDeadlineSource::Measured,
        syn_rtt: SynRtt {
            p50_us: Some(60),
            p99_us: Some(140),
            samples: 300,
        },
        in_flight: 0,
        latency: Default::default(),
        h2_requests_per_connection: None,
        slow_start_percent: None,
        recent: changes.iter().rev().take(20).cloned().collect(),
        history: EndpointHistory {
            series: HistorySeries {
                first_unix_s: first,
                requests: vec![97; n],
                latency_p50_us: (0..n).map(|i| wave(i, 600)).collect(),
                latency_p99_us: (0..n).map(|i| wave(i, 40_000)).collect(),
                syn_rtt_p50_us: (0..n)
                    .map(|i| if full { wave(i, 60) } else { None })
                    .collect(),
                syn_rtt_p99_us: (0..n)
                    .map(|i| if full { wave(i, 140) } else { None })
                    .collect(),
                hedges: (0..n).map(|i| u16::from(i % 13 == 0)).collect(),
                errors,
            },
            changes,
        },
    }
}

fn status(endpoints: Vec<EndpointStatus>) -> Status {
    Status {
        version: "0.1.0".into(),
        uptime_s: 400.0,
        started_unix_ms: NOW_MS - 400_000,
        now_unix_ms: NOW_MS,
        draining: false,
        ready: true,
        not_ready: vec![],
        observer: ObserverStatus {
            mode: SignalOrigin::Kernel,
            kernel_signals: true,
            reason: None,
            cgroup: Some("/sys/fs/cgroup/gateway-1".into()),
            events_lost: Some(0),
        },
        clusters: vec![ClusterStatus {
            name: "api".into(),
            lb_policy: LbPolicy::RoundRobin,
            hash_on: None,
            routable: endpoints.len(),
            dns: Vec::new(),
            endpoints,
        }],
    }
}

/// `name="value"` of the first tag of `html` starting with `tag_start`.
fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let at = tag
        .find(&format!(" {name}=\""))
        .unwrap_or_else(|| panic!("{name} in {tag}"));
    let rest = &tag[at + name.len() + 3..];
    &rest[..rest.find('"').unwrap()]
}

/// `second:count` pairs.
fn counts(text: &str) -> Vec<(u64, u16)> {
    text.split(' ')
        .map(|p| {
            let (s, c) = p.split_once(':').unwrap();
            (s.parse().unwrap(), c.parse().unwrap())
        })
        .collect()
}

fn tags<'a>(html: &'a str, start: &str) -> Vec<&'a str> {
    html.match_indices(start)
        .map(|(i, _)| &html[i..i + html[i..].find('>').unwrap()])
        .collect()
}

#[test]
fn every_point_and_mark_sits_where_its_value_says() {
    let e = endpoint(8080, true);
    let mut h = String::new();
    render(&mut h, &e, NOW_MS);
    let svg = tags(&h, "<svg ")[0];
    let num = |n: &str| attr(svg, n).parse::<f64>().unwrap();
    let (t0, x0, px, y0, y1, lo, hi) = (
        num("data-t0"),
        num("data-x0"),
        num("data-px-per-s"),
        num("data-y0"),
        num("data-y1"),
        num("data-lo-us"),
        num("data-hi-us"),
    );
    let series = &e.history.series;
    let mut checked = 0;
    for line in tags(&h, "<polyline ") {
        let name = attr(line, "data-series");
        let vals = values(&e, name);
        for p in attr(line, "points").split(' ') {
            let (x, y) = p.split_once(',').unwrap();
            let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
            let second = (t0 + ((x - x0) / px - 0.5)).round() as u64;
            let i = (second - series.first_unix_s) as usize;
            let us = 10f64.powf(lo.log10() + (y1 - y) / (y1 - y0) * (hi.log10() - lo.log10()));
            let want = f64::from(vals[i].unwrap());
            assert!(
                (us / want - 1.0).abs() < 0.02,
                "{name} at {second}: {us} vs {want}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4 * (WINDOW_S as usize - 1), "{checked}");
    // Failures by reason, second by second: each bar as high as its count.
    let paths = tags(&h, "<path class=\"err\"");
    assert_eq!(paths.len(), series.errors.len());
    let busiest = (0..series.requests.len())
        .map(|i| series.errors.values().map(|v| u32::from(v[i])).sum::<u32>())
        .max()
        .unwrap();
    for p in &paths {
        let reason = attr(p, "data-reason");
        let counts = counts(attr(p, "data-counts"));
        let want: Vec<(u64, u16)> = series.errors[reason]
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (series.first_unix_s + i as u64, *c))
            .collect();
        assert_eq!(counts, want, "{reason}");
        let bars: Vec<&str> = attr(p, "d").split('M').skip(1).collect();
        assert_eq!(bars.len(), counts.len());
        for (bar, (second, c)) in bars.iter().zip(&counts) {
            let x: f64 = bar.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(x, x0 + (second - t0 as u64) as f64 * px, "{bar}");
            let hgt: f64 = bar
                .split('v')
                .nth(1)
                .unwrap()
                .split('h')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let want = f64::from(*c) * 28.0 / f64::from(busiest);
            assert!((hgt - want).abs() <= 0.05, "{bar}: {hgt} vs {want}");
        }
    }
    // Hedges, ejections and recoveries.
    let hedges = tags(&h, "<path class=\"hedge\"");
    let want: Vec<(u64, u16)> = series
        .hedges
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| (series.first_unix_s + i as u64, *c))
        .collect();
    assert_eq!(counts(attr(hedges[0], "data-counts")), want);
    let marks = tags(&h, "<line class=\"mark ");
    let want: Vec<u64> = e
        .history
        .changes
        .iter()
        .filter(|c| {
            matches!(
                c.event,
                HealthEventKind::Ejected | HealthEventKind::Recovered
            )
        })
        .map(|c| c.at_unix_ms)
        .collect();
    let got: Vec<u64> = marks
        .iter()
        .map(|m| attr(m, "data-at-unix-ms").parse().unwrap())
        .collect();
    assert_eq!(got, want);
    for m in marks {
        let at: f64 = attr(m, "data-at-unix-ms").parse().unwrap();
        let x: f64 = attr(m, "x1").parse().unwrap();
        assert!((x - (x0 + (at / 1e3 - t0) * px)).abs() <= 0.05, "{m}");
    }
    // Evidence text is escaped in tooltips.
    assert!(h.contains("no RST &lt;"), "{h}");
    assert!(!h.contains("no RST <"));
}

#[test]
fn lone_points_are_dots_and_gaps_break_lines() {
    let mut e = endpoint(8080, false);
    let s = &mut e.history.series;
    s.syn_rtt_p50_us[10] = Some(70);
    s.latency_p50_us[20] = None;
    let mut h = String::new();
    render(&mut h, &e, NOW_MS);
    assert_eq!(tags(&h, "<circle class=\"syn50\"").len(), 1, "{h}");
    assert_eq!(
        tags(&h, "<polyline class=\"lat50\"").len(),
        2,
        "broken at the empty second"
    );
    // An endpoint without any sample still draws its axes.
    let mut quiet = endpoint(8081, false);
    quiet.history = EndpointHistory::default();
    let mut h = String::new();
    render(&mut h, &quiet, NOW_MS);
    assert!(h.contains("<svg ") && !h.contains("<polyline"), "{h}");
}

#[test]
fn lanes_follow_the_transitions() {
    let mut e = endpoint(8080, false);
    let start = NOW_MS - WINDOW_S * 1000;
    e.history.changes = vec![
        event(
            start - 5_000,
            HealthEventKind::Ejected,
            Some(Reason::Refused),
        ),
        event(start + 10_000, HealthEventKind::Probing, None),
        event(start + 11_000, HealthEventKind::Recovered, None),
        event(start + 12_000, HealthEventKind::Failure, None),
    ];
    let got = super::super::timeline::spans(&e, start, NOW_MS);
    assert_eq!(
        got,
        vec![
            (start, start + 10_000, State::Ejected),
            (start + 10_000, start + 11_000, State::Probing),
            (start + 11_000, NOW_MS, State::Healthy),
        ]
    );
    // An endpoint that appeared a minute ago has no lane before it.
    e.history.changes.clear();
    e.history.series.first_unix_s = NOW_S - 60;
    let got = super::super::timeline::spans(&e, start, NOW_MS);
    assert_eq!(got, vec![((NOW_S - 60) * 1000, NOW_MS, State::Healthy)]);
}

/// The page's weight as stated in `page`'s module doc: four endpoints with every series full
/// and 64 changes each (the worst case), and four with a steady load and no handshakes.
#[test]
fn page_weight_is_bounded() {
    let worst =
        super::super::page::render(&status((0..4).map(|p| endpoint(8080 + p, true)).collect()));
    let steady = super::super::page::render(&status(
        (0..4)
            .map(|p| {
                let mut e = endpoint(8080 + p, false);
                e.history.changes.truncate(2);
                e
            })
            .collect(),
    ));
    let empty = super::super::page::render(&status(vec![]));
    eprintln!(
        "status page: {} bytes without endpoints, {} bytes for 4 steady endpoints, {} bytes for 4 endpoints in the worst case",
        empty.len(),
        steady.len(),
        worst.len()
    );
    assert!(empty.len() < 8 * 1024, "{}", empty.len());
    assert!(worst.len() < 200 * 1024, "{}", worst.len());
    assert!(steady.len() < 80 * 1024, "{}", steady.len());
}
