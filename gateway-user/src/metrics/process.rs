//! `gateway_build_info` and the process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, …), registered into a registry by
//! [`register`]: `gateway run` and `gateway observe` both export them. They keep the names every
//! Prometheus client library uses for them, so that existing dashboards and alerts (an fd leak,
//! a memory leak, a CPU-bound process) work unchanged; the help texts are the catalogue's.
//!
//! The process values are read from `/proc/self` at each scrape (a [`Collector`]), so nothing
//! runs between scrapes. A value that cannot be read is left out of that scrape rather than
//! exported as 0.

use std::{fmt, time::SystemTime};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

use super::{CATALOGUE, MetricDoc, family_name, field_index as f, register as register_family};

/// The build the binary is: `revision` and `rustc` come from `build.rs`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub revision: &'static str,
    pub rustc: &'static str,
    pub profile: &'static str,
}

/// This binary's build labels.
pub fn build() -> BuildLabels {
    BuildLabels {
        version: env!("CARGO_PKG_VERSION"),
        revision: env!("GATEWAY_REVISION"),
        rustc: env!("GATEWAY_RUSTC_VERSION"),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    }
}

/// Registers `gateway_build_info` and the process collector.
pub fn register(registry: &mut Registry) {
    let d = CATALOGUE[f::build_info];
    register_family(registry, family_name(&d), d.help, Info::new(build()));
    registry.register_collector(Box::new(ProcessCollector));
}

/// What `/proc/self` says now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub threads: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    pub fn read() -> ProcessStats {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        let mut stats = stat
            .as_deref()
            .and_then(|s| parse_stat(s, ticks as f64, page.max(0) as u64, boot))
            .unwrap_or_default();
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        stats.max_fds = crate::service::nofile::current();
        stats
    }
}

/// `btime` (boot time, Unix seconds) from `/proc/stat`.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Fields of `/proc/self/stat` (proc(5)): the command name in parentheses may hold spaces, so
/// fields are counted after its closing parenthesis. `ticks`: clock ticks per second; `page`:
/// bytes per page; `boot`: boot time in Unix seconds.
fn parse_stat(stat: &str, ticks: f64, page: u64, boot: Option<u64>) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the command name, field 3 (state) is the first.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let cpu = match (field(14), field(15)) {
        (Some(u), Some(s)) if ticks > 0.0 => Some((u + s) as f64 / ticks),
        _ => None,
    };
    Some(ProcessStats {
        cpu_seconds: cpu,
        threads: field(20),
        start_time_seconds: match (field(22), boot) {
            (Some(start), Some(boot)) if ticks > 0.0 => Some(boot as f64 + start as f64 / ticks),
            _ => None,
        },
        virtual_bytes: field(23),
        resident_bytes: field(24).map(|p| p * page),
        open_fds: None,
        max_fds: None,
    })
}

/// Reads `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

fn gauge(enc: &mut DescriptorEncoder, d: MetricDoc, v: Option<f64>) -> fmt::Result {
    let Some(v) = v else { return Ok(()) };
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(d.name, d.help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = ProcessStats::read();
        if let Some(cpu) = s.cpu_seconds {
            let d = CATALOGUE[f::process_cpu];
            let c = ConstCounter::new(cpu);
            let m = enc.encode_descriptor(d.name, d.help, None, MetricType::Counter)?;
            c.encode(m)?;
        }
        let as_f64 = |v: Option<u64>| v.map(|v| v as f64);
        gauge(
            &mut enc,
            CATALOGUE[f::process_rss],
            as_f64(s.resident_bytes),
        )?;
        gauge(
            &mut enc,
            CATALOGUE[f::process_vsize],
            as_f64(s.virtual_bytes),
        )?;
        gauge(&mut enc, CATALOGUE[f::process_fds], as_f64(s.open_fds))?;
        gauge(&mut enc, CATALOGUE[f::process_max_fds], as_f64(s.max_fds))?;
        gauge(&mut enc, CATALOGUE[f::process_threads], as_f64(s.threads))?;
        gauge(&mut enc, CATALOGUE[f::process_start], s.start_time_seconds)
    }
}

/// Seconds since the Unix epoch now (for tests comparing the start time).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as proc(5) allows.
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 7 0 \
                    1000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let s = parse_stat(stat, 100.0, 4096, Some(1_700_000_000)).unwrap();
        assert_eq!(s.cpu_seconds, Some(3.0));
        assert_eq!(s.threads, Some(7));
        assert_eq!(s.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(s.virtual_bytes, Some(123_456_789));
        assert_eq!(s.resident_bytes, Some(2048 * 4096));
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    /// The values this test process has, read through the exported text.
    #[test]
    fn process_metrics_describe_this_process() {
        let mut registry = Registry::default();
        register(&mut registry);
        let _held = std::fs::File::open("/proc/self/stat").unwrap();
        // Some CPU time to see (the clock ticks at 100 Hz).
        let busy = std::time::Instant::now();
        let mut x = 0u64;
        while busy.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} in\n{text}"))
        };
        let rss = value("process_resident_memory_bytes");
        assert!((1e6..1e10).contains(&rss), "{rss}");
        assert!(value("process_open_fds") >= 4.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_cpu_seconds_total") > 0.0);
        let start = value("process_start_time_seconds");
        assert!(
            start <= unix_now() && start > unix_now() - 3600.0,
            "{start}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "{text}"
        );
        let b = build();
        assert!(
            text.contains(&format!(
                "gateway_build_info{{version=\"{}\",revision=\"{}\",rustc=\"{}\",profile=\"debug\"}} 1",
                b.version, b.revision, b.rustc
            )),
            "{text}"
        );
        assert!(text.contains("# TYPE gateway_build info"), "{text}");
        assert!(!b.rustc.is_empty() && !b.revision.is_empty());
        for h in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(h.ends_with('.') && !h.ends_with(".."), "{h}");
        }
    }
}
