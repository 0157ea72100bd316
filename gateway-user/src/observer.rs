//! The kernel observer: loads the eBPF object (`gateway-ebpf`), attaches it to one cgroup v2,
//! and reads what it saw — raw records from the ring buffer, per-destination aggregates, and
//! established-connection signals by socket cookie. [`stream`] turns those into the one stream
//! of decoded, joined connects that every reader uses ([`records`] says what a record means).
//!
//! Everything attached is owned by [`KernelObserver`]. aya attaches cgroup programs with
//! `bpf_link`s and tracepoints with perf-event links, all held as file descriptors and nothing
//! pinned, so dropping the observer or the process dying (even by SIGKILL) detaches everything.

mod attach;
pub mod btf;
pub mod cgroup;
pub mod explain;
pub mod kernel_log;
pub mod preflight;
pub mod records;
pub mod stream;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::ProgramError,
};
use gateway_common::{ConnStats, ConnectEvent, DestStats, UpstreamKey, counter, names};
use thiserror::Error;

use attach::{attach_cgroup_programs, attach_connect_exit, attach_reset_hook, take_map};
pub use preflight::PreflightError;

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

#[derive(Debug, Error)]
pub enum ObserverError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error(
        "this gateway binary was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild it with `cargo build --release`"
    )]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error(
        "the kernel verifier rejected {program}: {io_error}\n--- verifier log (last {lines} lines) ---\n{tail}"
    )]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        lines: usize,
        tail: String,
    },
    #[error("{action} {program} failed: {source}{hint}")]
    Program {
        action: &'static str,
        program: &'static str,
        // Boxed: aya's ProgramError is over 128 bytes (clippy::result_large_err).
        source: Box<ProgramError>,
        hint: &'static str,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("reading the kernel side's log ring (AYA_LOGS): {0}")]
    KernelLog(String),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
}

/// What to attach to, and how big the kernel tables are.
#[derive(Clone, Debug)]
pub struct ObserverOptions {
    /// A cgroup v2 directory; `None` = the v2 root (every process on the host).
    pub cgroup: Option<PathBuf>,
    pub max_destinations: u32,
    pub max_connections: u32,
    pub connect_exit: ConnectExitHook,
    /// Size of the ring buffer of connect records in bytes (a power of two, at least a page);
    /// `None` = [`names::EVENTS_RING_BYTES`].
    pub events_ring_bytes: Option<u32>,
    /// Keep the kernel's per-destination table (`DEST_STATS`, `max_destinations` entries),
    /// counted into at every connect. Only `gateway observe` reads it; off, no program touches
    /// it and it is one entry ([`KernelObserver::dest_stats`] is then empty).
    pub destination_table: bool,
}

impl Default for ObserverOptions {
    fn default() -> Self {
        ObserverOptions {
            cgroup: None,
            max_destinations: names::DEFAULT_MAX_DESTINATIONS,
            max_connections: names::DEFAULT_MAX_CONNECTIONS,
            connect_exit: ConnectExitHook::Auto,
            events_ring_bytes: None,
            destination_table: true,
        }
    }
}

/// Slots of the kernel's table of connect records (`SOCK_STATE`): `max_connections` rounded up
/// to a power of two, since the kernel indexes it by the low bits of the socket cookie.
fn sock_slots(max_connections: u32) -> u32 {
    max_connections
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// How a connect that fails before its SYN (EADDRNOTAVAIL: no free local port) is seen; see
/// `gateway-ebpf/src/connect.rs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectExitHook {
    /// On Linux 6.12 and later, no hook: connect4/6 turn the socket's sock_ops state callback
    /// on before the kernel looks for a port, so sock_ops sees the failure (SYN_SENT → CLOSE
    /// with no SYN). On older kernels, as [`ConnectExitHook::Tracepoint`].
    #[default]
    Auto,
    /// A hook on the return of connect() with a map of connects in flight: the classic
    /// `syscalls:sys_exit_connect` tracepoint when tracefs can be used (root), which the
    /// kernel runs only for connect(); otherwise the raw `sys_exit` tracepoint, which needs no
    /// tracefs (CAP_BPF + CAP_PERFMON suffice) but runs for every syscall on the host.
    Tracepoint,
    /// Always the raw tracepoint: what a process without tracefs gets on an older kernel (used
    /// by tests as root).
    Raw,
}

/// What [`KernelObserver::connect_exit_hook`] says when no hook is needed.
pub const STATE_CALLBACK: &str = "sock_ops state callback";

/// The kernel side, loaded and attached.
pub struct KernelObserver {
    events: RingBuf<MapData>,
    dest_stats: HashMap<MapData, UpstreamKey, DestStats>,
    conn_stats: HashMap<MapData, u64, ConnStats>,
    counters: PerCpuArray<MapData, u64>,
    /// Anomaly lines the kernel writes through aya-log, forwarded to `tracing`.
    kernel_log: kernel_log::KernelLog,
    cgroup: PathBuf,
    connect_exit: &'static str,
    /// The `tcp_receive_reset` tracepoint is attached: a refusal without an RST is known for
    /// one (an ICMP port unreachable).
    resets_seen: bool,
    // Dropped last: detaches every program.
    _ebpf: Ebpf,
}

/// Moves the ring buffer's records into `out`. Without the `tcp_receive_reset` tracepoint
/// (`resets_seen` false), the kernel's "no RST" means "not known".
fn take_events(events: &mut RingBuf<MapData>, resets_seen: bool, out: &mut Vec<ConnectEvent>) {
    while let Some(item) = events.next() {
        if let Some(mut ev) = records::event_from_bytes(&item) {
            if !resets_seen {
                ev.reset = gateway_common::RESET_UNKNOWN;
            }
            out.push(ev);
        }
    }
}

/// Entries of a table walk between two drains of the ring buffer.
pub const WALK_DRAIN_EVERY: usize = 2048;

impl KernelObserver {
    /// Checks privileges and kernel support, loads, and attaches. Every failure says what is
    /// missing and what to do.
    pub fn attach(opts: &ObserverOptions) -> Result<KernelObserver, ObserverError> {
        preflight::check_privileges()?;
        preflight::check_btf()?;
        let cgroup = preflight::resolve_cgroup(opts.cgroup.as_deref())?;
        // Nothing is pinned, so bpffs is only a courtesy to bpftool users: mounting it needs
        // CAP_SYS_ADMIN, which the documented capability set does not include.
        if let Err(e) = preflight::ensure_bpffs() {
            tracing::debug!(error = %e, "bpffs not mounted (nothing is pinned, so nothing needs it)");
        }
        if EBPF_OBJECT.is_empty() {
            return Err(ObserverError::NoObject);
        }
        let offsets = btf::kernel_offsets()?;
        let slots = sock_slots(opts.max_connections);
        let slot_mask = slots - 1;
        let nr_connect = libc::SYS_connect as i32;
        let kernel_btf = aya::Btf::from_sys_fs()
            .map_err(|e| ObserverError::Load(aya::EbpfError::BtfError(e)))?;

        let callbacks_at_connect =
            opts.connect_exit == ConnectExitHook::Auto && preflight::callbacks_at_connect();
        let callbacks_flag = u32::from(callbacks_at_connect);
        let dest_table_flag = u32::from(opts.destination_table);

        let mut loader = EbpfLoader::new();
        loader
            .btf(&kernel_btf)
            .override_global("CALLBACKS_AT_CONNECT", &callbacks_flag, true)
            .override_global("SK_ERR_OFFSET", &offsets.sk_err, true)
            .override_global("SK_ERR_SOFT_OFFSET", &offsets.sk_err_soft, true)
            .override_global("SK_COOKIE_OFFSET", &offsets.sk_cookie, true)
            .override_global("SOCK_SLOT_MASK", &slot_mask, true)
            .override_global("PT_REGS_SYSCALL_NR_OFFSET", &offsets.syscall_nr, true)
            .override_global("SYSCALL_NR_CONNECT", &nr_connect, true)
            .override_global("DEST_TABLE", &dest_table_flag, true)
            .map_max_entries(
                names::MAP_DEST_STATS,
                if opts.destination_table {
                    opts.max_destinations
                } else {
                    1
                },
            )
            .map_max_entries(names::MAP_CONN_STATS, opts.max_connections)
            .map_max_entries(names::MAP_SOCK_STATE, slots);
        if let Some(bytes) = opts.events_ring_bytes {
            loader.map_max_entries(names::MAP_EVENTS, bytes);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(ObserverError::Load)?;
        let kernel_log = kernel_log::KernelLog::take(&mut ebpf)
            .map_err(|e| ObserverError::KernelLog(e.to_string()))?;

        let cgroup_fd = File::open(&cgroup).map_err(|source| ObserverError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;

        // The tracepoint first: it only finishes records that connect4/6 open, so attaching it
        // first means no record is opened that cannot be finished.
        let connect_exit = if callbacks_at_connect {
            STATE_CALLBACK
        } else {
            attach_connect_exit(&mut ebpf, opts.connect_exit)?
        };
        // Before the cgroup programs, so that every connect they record can tell an RST.
        let resets_seen = attach_reset_hook(&mut ebpf);
        attach_cgroup_programs(&mut ebpf, &cgroup_fd)?;

        Ok(KernelObserver {
            events: take_map(&mut ebpf, names::MAP_EVENTS)?,
            dest_stats: take_map(&mut ebpf, names::MAP_DEST_STATS)?,
            conn_stats: take_map(&mut ebpf, names::MAP_CONN_STATS)?,
            counters: take_map(&mut ebpf, names::MAP_COUNTERS)?,
            kernel_log,
            cgroup,
            connect_exit,
            resets_seen,
            _ebpf: ebpf,
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// What sees a connect that fails before its SYN: [`STATE_CALLBACK`] (no extra hook),
    /// `tracepoint syscalls:sys_exit_connect` or `raw tracepoint sys_exit`.
    pub fn connect_exit_hook(&self) -> &'static str {
        self.connect_exit
    }

    /// Moves every record waiting in the ring buffer into `out`, and forwards the kernel's
    /// anomaly log lines. Never blocks. Only the observer stream reads the ring
    /// ([`stream::ObserverStream`]): every reader goes through it.
    pub(crate) fn drain(&mut self, out: &mut Vec<ConnectEvent>) {
        self.kernel_log.flush();
        take_events(&mut self.events, self.resets_seen, out);
    }

    /// Per-destination aggregates, as the kernel holds them now. Copies the whole map: for a
    /// large map use [`KernelObserver::for_each_dest`].
    pub fn dest_stats(&self) -> Vec<(UpstreamKey, DestStats)> {
        self.dest_stats.iter().filter_map(Result::ok).collect()
    }

    /// Calls `f` for each destination the kernel holds, one at a time (memory stays constant
    /// however big the map); returns how many there were. Entries the LRU evicts during the
    /// walk are skipped.
    pub fn for_each_dest(&self, mut f: impl FnMut(&UpstreamKey, &DestStats)) -> usize {
        let mut n = 0;
        for (k, v) in self.dest_stats.iter().filter_map(Result::ok) {
            f(&k, &v);
            n += 1;
        }
        n
    }

    /// As [`KernelObserver::for_each_dest`], and drains the ring buffer into `events` every
    /// [`WALK_DRAIN_EVERY`] entries: a walk of a large table takes two syscalls per entry, and
    /// the ring must not overflow meanwhile (at 100,000 entries it did, at 26,000 connects/s).
    pub fn for_each_dest_draining(
        &mut self,
        events: &mut Vec<ConnectEvent>,
        mut f: impl FnMut(&UpstreamKey, &DestStats),
    ) -> usize {
        let mut n = 0;
        for (k, v) in self.dest_stats.iter().filter_map(Result::ok) {
            f(&k, &v);
            n += 1;
            if n % WALK_DRAIN_EVERY == 0 {
                self.kernel_log.flush();
                take_events(&mut self.events, self.resets_seen, events);
            }
        }
        n
    }

    /// Established-connection signals of one socket, by `SO_COOKIE`.
    pub fn conn_stats(&self, cookie: u64) -> Option<ConnStats> {
        self.conn_stats.get(&cookie, 0).ok()
    }

    /// Kernel-side health counters, summed over CPUs (see `gateway_common::counter`).
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Records the kernel could not put in the ring buffer because it was full.
    pub fn events_lost(&self) -> u64 {
        self.counter(counter::EVENTS_LOST)
    }

    /// Every kernel-side health counter, summed over CPUs, by `gateway_common::counter` index.
    pub fn counters(&self) -> KernelCounters {
        let mut c = KernelCounters::default();
        for (i, slot) in c.0.iter_mut().enumerate() {
            *slot = self.counter(i as u32);
        }
        c
    }
}

/// The kernel side's own health counters (`gateway_common::counter`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; counter::COUNT as usize]);

impl KernelCounters {
    pub fn get(&self, index: u32) -> u64 {
        self.0.get(index as usize).copied().unwrap_or(0)
    }

    /// Destinations the LRU evicted from `DEST_STATS`, given how many it holds now.
    pub fn dest_evicted(&self, entries: usize) -> u64 {
        self.get(counter::DEST_INSERTED)
            .saturating_sub(entries as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_records_is_max_connections_rounded_up_to_a_power_of_two() {
        assert_eq!(sock_slots(65_536), 65_536);
        assert_eq!(sock_slots(1_000), 1_024);
        assert_eq!((sock_slots(0), sock_slots(1), sock_slots(3)), (1, 1, 4));
        assert_eq!(sock_slots(u32::MAX), 1 << 31);
    }
}
