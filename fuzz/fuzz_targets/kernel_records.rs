//! The decoding of what the kernel side hands userspace: ring-buffer records (outcome and
//! SO_ERROR follow-ups), and the values of the `DEST_STATS` and `CONN_STATS` maps. Every bit
//! pattern is possible from a newer or older eBPF object, so all of it must decode into a
//! record, a view or `None`, and everything built from it (JSON lines, the live table, metrics,
//! the proxy's evidence sentences) must render, never panic.
#![no_main]

use gateway::{
    observe::{metrics::ObserverMetrics, table::Table},
    observer::{
        records::{Clock, Decoded, decode, event_from_bytes, pod_from_bytes},
        stream::{Drained, StreamOptions, index::ConnectIndex},
    },
    signals::kernel::{established_of, evidence_of},
};
use gateway_common::{ConnStats, ConnectEvent, DestStats, UpstreamKey};
use libfuzzer_sys::fuzz_target;

const EVENT: usize = std::mem::size_of::<ConnectEvent>();
const KEY: usize = std::mem::size_of::<UpstreamKey>();
const STATS: usize = std::mem::size_of::<DestStats>();
const CONN: usize = std::mem::size_of::<ConnStats>();

fuzz_target!(|data: &[u8]| {
    // The same bytes as a stream of ring-buffer records (through the observer stream's own
    // index: the SO_ERROR join, the cookie index), as map entries and as connection values:
    // each view explores its own decoder.
    let clock = Clock::from_offset_ns(i128::from(data.first().copied().unwrap_or(0)) << 56);
    let mut index = ConnectIndex::new(&StreamOptions::default());
    let mut table = Table::default();
    let mut registry = prometheus_registry();
    let buckets = gateway::metrics::LatencyBuckets::reaching(std::time::Duration::from_secs(1));
    let mut metrics = ObserverMetrics::new(&mut registry, 4, buckets);
    let mut drained = Drained::default();
    let mut now = 0u64;
    for slot in data.chunks(EVENT) {
        let Some(ev) = event_from_bytes(slot) else {
            assert!(slot.len() < EVENT);
            continue;
        };
        now = now.wrapping_add(ev.ts_event_ns >> 40);
        if let Some(d) = decode(&ev) {
            if let Decoded::Outcome(c) = &d {
                let _ = evidence_of(c).to_string();
            }
            index.push(d, now, &mut drained);
        }
        index.expire(now, &mut drained.connects);
    }
    index.expire(u64::MAX, &mut drained.connects);
    for read in &drained.so_error_reads {
        metrics.so_error(read);
    }
    for c in &drained.connects {
        let rec = c.record(&clock);
        let line = serde_json::to_string(&rec).expect("records serialise");
        assert!(!line.contains('\n'), "one JSON object per line: {line}");
        metrics.record(&rec);
        table.record(&rec);
    }
    let stats: Vec<(UpstreamKey, DestStats)> = data
        .chunks(KEY + STATS)
        .filter_map(|c| Some((pod_from_bytes(c)?, pod_from_bytes(c.get(KEY..)?)?)))
        .collect();
    for top in [0, 1, 25] {
        let text = table.render(&stats, top);
        assert!(text.lines().count() >= 1, "the table has its header");
    }
    for c in data.chunks(CONN) {
        if let Some(cs) = pod_from_bytes::<ConnStats>(c) {
            let _ = established_of(&cs).to_string();
        }
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("metrics encode");
});

fn prometheus_registry() -> prometheus_client::registry::Registry {
    prometheus_client::registry::Registry::default()
}
