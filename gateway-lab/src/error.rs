//! Typed errors of the fault lab. Each one names the command, path, namespace or address that
//! failed, so a failing privileged test says what to run by hand to reproduce it.

use std::{io, net::SocketAddr, path::PathBuf, process::ExitStatus};

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// Network namespaces, veths, iptables and cgroups need root.
    #[error(
        "the fault lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) but runs as euid {euid}; \
         run it with sudo"
    )]
    NotRoot { euid: u32 },

    /// A helper program could not be started at all.
    #[error(
        "could not start `{command}`: {source} (the lab needs `ip` from iproute2 and \
         `iptables-legacy` from iptables: `apt-get install -y iproute2 iptables`)"
    )]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    /// A helper program ran and exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },

    /// A file or directory operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `setns(CLONE_NEWNET)` failed, or a thread to run it on could not be started.
    #[error("entering network namespace {netns}: {source}")]
    Setns {
        netns: String,
        #[source]
        source: io::Error,
    },

    /// There is no cgroup v2 hierarchy to create cgroups in.
    #[error(
        "no cgroup2 mount in /proc/self/mounts; mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,

    /// A veth end did not come up (no IPv6 link-local address) in time.
    #[error(
        "link {dev} in network namespace {netns} was not ready after {waited:?} \
         (no IPv6 link-local address; see `ip -n {netns} addr show {dev}`)"
    )]
    LinkNotReady {
        netns: String,
        dev: String,
        waited: std::time::Duration,
    },

    /// `Lab::upstream(index)` with an index past the end.
    #[error("upstream index {index} is out of range: the lab has {count} upstreams")]
    NoSuchUpstream { index: usize, count: usize },

    /// `LabSpec::upstreams` outside 1..=max.
    #[error("a lab has 1 to {max} upstreams, not {requested}")]
    UpstreamCount { requested: usize, max: usize },

    /// A fault or sysctl value that the kernel would refuse or that makes no sense.
    #[error("invalid fault {fault}: {reason}")]
    InvalidFault { fault: String, reason: &'static str },

    /// A socket operation inside a lab namespace failed.
    #[error("{action} {addr} in network namespace {netns}: {source}")]
    Socket {
        action: &'static str,
        netns: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// The NFQUEUE delayer could not open or bind its netlink queue.
    #[error("NFQUEUE {queue} in network namespace {netns}: {action}: {source}")]
    Nfqueue {
        netns: String,
        queue: u16,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    /// The accept queue of a tiny-backlog listener would not fill up.
    #[error(
        "the accept queue of {addr} in network namespace {netns} still took connections \
         after {attempts} connects"
    )]
    OverflowNotReached {
        netns: String,
        addr: SocketAddr,
        attempts: usize,
    },

    /// A lab thread panicked or hung up before it reported back.
    #[error("lab thread `{thread}` died before it reported back")]
    ThreadDied { thread: String },
}

/// Result of a lab operation.
pub type LabResult<T> = Result<T, LabError>;
