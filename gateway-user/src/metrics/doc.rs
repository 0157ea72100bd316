//! `METRICS.md`, the catalogue as a document.

use super::{CATALOGUE, MetricDoc};

/// `METRICS.md`, generated from [`CATALOGUE`].
pub fn catalogue_markdown() -> String {
    let mut s = String::from(
        "# Metrics of `gateway run`\n\n\
         Generated from `gateway-user/src/metrics.rs` (`CATALOGUE`); a test fails when this file \
         and the code disagree. Regenerate with `cargo run -p gateway-user --bin gateway -- metrics-doc > METRICS.md`.\n\n\
         Served as OpenMetrics text at `/metrics` on the admin listener. Counters carry the `_total` \
         suffix on the wire. Histograms use buckets from 50 µs, doubling, up to the first bound at \
         or above the longest timeout configured at start (connect, response, write, request, TLS \
         handshake; at least 13.1 s: with the default 30 s request timeout, 52.4 s). Series of \
         routes, clusters and endpoints that are gone after a reload or a DNS change are \
         removed.\n\n\
         | metric | type | labels | meaning |\n|---|---|---|---|\n",
    );
    for d in CATALOGUE {
        let name = wire_name(d);
        let labels = if d.labels.is_empty() {
            "-".to_owned()
        } else {
            d.labels.join(", ")
        };
        s.push_str(&format!(
            "| `{name}` | {} | {labels} | {} |\n",
            d.kind, d.help
        ));
    }
    s
}

/// A family's sample name: counters gain `_total` on the wire.
pub(super) fn wire_name(d: &MetricDoc) -> String {
    if d.kind == "counter" {
        format!("{}_total", d.name)
    } else {
        d.name.to_owned()
    }
}

/// The name a family is registered (and typed) under: an info's `_info` is added back by the
/// encoder.
pub(super) fn family_name(d: &MetricDoc) -> &'static str {
    match d.kind {
        "info" => d.name.strip_suffix("_info").unwrap_or(d.name),
        _ => d.name.strip_suffix("_total").unwrap_or(d.name),
    }
}
