//! Names of maps and programs in the eBPF object. The loader looks them up by these names.

pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_SOCK_STATE: &str = "SOCK_STATE";
pub const MAP_DEST_STATS: &str = "DEST_STATS";
pub const MAP_CONN_STATS: &str = "CONN_STATS";
pub const MAP_PENDING_CONNECT: &str = "PENDING_CONNECT";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_ANOMALY_LOGGED: &str = "ANOMALY_LOGGED";

pub const PROG_CONNECT4: &str = "gw_connect4";
pub const PROG_CONNECT6: &str = "gw_connect6";
pub const PROG_SOCK_OPS: &str = "gw_sock_ops";
pub const PROG_GETSOCKOPT: &str = "gw_getsockopt";
pub const PROG_SYS_EXIT_CONNECT: &str = "gw_sys_exit_connect";
pub const PROG_RAW_SYS_EXIT: &str = "gw_raw_sys_exit";
pub const PROG_TCP_RECEIVE_RESET: &str = "gw_tcp_receive_reset";

/// Default capacities; userspace may override them at load time.
pub const DEFAULT_MAX_DESTINATIONS: u32 = 16_384;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// The largest table of connect records userspace asks for (2 GiB at 128 bytes a record).
pub const MAX_CONNECTIONS_LIMIT: u32 = 1 << 24;
pub const DEFAULT_MAX_PENDING: u32 = 8_192;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
