//! What `gateway observe` shows of the stream: the live table redrawn on a timer, or one
//! JSON line per released connect record (`--json`), or nothing (`--quiet`); every record
//! also goes to the metrics, to the table's aggregates and to the demo's tap.
//!
//! JSON lines are written once per drain, all the records of that drain in one write: a
//! flush per line cost a `write(2)` per connect (about 4 µs of the observer's CPU per
//! connection in `cargo xtask bench observer`), while a tool that tails the output still gets
//! each line within one drain interval.

use std::{
    io::{IsTerminal as _, Write as _},
    sync::Arc,
};

use super::{ObserveArgs, Tap, attribution, metrics::ObserverMetrics, table};
use crate::observer::{
    records::ConnectRecord,
    stream::{Drained, ObserverStream},
};

/// Stdout closed under us (e.g. `| head`): nothing left to show.
#[derive(Debug)]
pub struct Closed;

pub struct Output {
    mode: Mode,
    /// The kernel keeps its per-destination table (not `--no-destination-table`).
    destination_table: bool,
    top: usize,
    tty: bool,
    table: table::Table,
    /// Who made each connect, from its cgroup id (see attribution.rs); none without a v2
    /// mount.
    services: Option<attribution::Resolver>,
    tap: Option<Tap>,
    /// One drain's JSON lines, written at once.
    batch: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Table,
    Json,
    Quiet,
}

impl Output {
    pub fn new(args: &ObserveArgs, tap: Option<Tap>) -> Output {
        Output {
            mode: if args.json {
                Mode::Json
            } else if args.quiet {
                Mode::Quiet
            } else {
                Mode::Table
            },
            destination_table: !args.no_destination_table,
            top: args.top,
            tty: std::io::stdout().is_terminal(),
            table: table::Table::default(),
            services: crate::observer::preflight::cgroup2_mount()
                .ok()
                .map(attribution::Resolver::new),
            tap,
            batch: String::new(),
        }
    }

    /// The refresh tick: one walk of the kernel's table, one entry at a time, for the rows
    /// shown and the count behind the tracked/evicted metrics; then the table is redrawn
    /// (in table mode). Nothing without the kernel's table (`--no-destination-table`).
    pub fn refresh(
        &mut self,
        stream: &mut ObserverStream,
        drained: &mut Drained,
        metrics: &mut ObserverMetrics,
    ) {
        let table_mode = self.mode == Mode::Table;
        if !self.destination_table {
            // Nothing to walk; the kernel's other counters are read at every drain.
            return;
        }
        let mut rows = table::TopRows::new(if table_mode { self.top } else { 0 });
        // The counters first: inserts made during the walk then only make the evicted
        // estimate (inserted − held) low for a moment, never high (the counter can only
        // grow). Exact once the table is quiet.
        let counters = stream.counters();
        let entries = stream.for_each_dest_draining(drained, |k, s| rows.offer(k, s));
        metrics.set_kernel_counters(&counters, Some(entries));
        if !table_mode {
            return;
        }
        let text = self.table.render_top(rows);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if self.tty {
            // Redraw in place: home the cursor and clear the screen.
            let _ = write!(out, "\x1b[H\x1b[2J");
        }
        let _ = writeln!(
            out,
            "gateway observe: cgroup {} | {} | lost records: {}",
            stream.cgroup().display(),
            chrono_like_now(),
            stream.events_lost(),
        );
        let _ = write!(out, "{text}");
        if !self.tty {
            let _ = writeln!(out);
        }
        let _ = out.flush();
    }

    /// Every connect record released by this drain: to the metrics, the table, the tap and
    /// (with `--json`) stdout.
    pub fn release(
        &mut self,
        drained: &Drained,
        stream: &ObserverStream,
        metrics: &mut ObserverMetrics,
    ) -> Result<(), Closed> {
        for c in &drained.connects {
            let rec = c.record(stream.clock());
            let service = self
                .services
                .as_mut()
                .map(|r| r.lookup(rec.cgroup_id))
                .unwrap_or_default();
            metrics.record(&rec);
            metrics.record_service(&rec, &service);
            self.table.record(&rec);
            if self.mode == Mode::Json {
                self.batch.push_str(&json_line(&rec, &service));
                self.batch.push('\n');
            }
            if let Some(tap) = &self.tap {
                let _ = tap.send(rec);
            }
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let written = out
            .write_all(self.batch.as_bytes())
            .and_then(|()| out.flush());
        self.batch.clear();
        written.map_err(|_| Closed)
    }
}

/// One `--json` line: the connect record and who made it (`cgroup`, `systemd_unit`,
/// `container_id`, `pod_uid`, each `null` when unknown).
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    #[serde(flatten)]
    record: &'a ConnectRecord,
    #[serde(flatten)]
    service: &'a attribution::Service,
}

fn json_line(record: &ConnectRecord, service: &Arc<attribution::Service>) -> String {
    serde_json::to_string(&JsonLine { record, service }).expect("records always serialise")
}

/// Wall-clock time as HH:MM:SS UTC, without a date-time dependency.
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02} UTC",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}
