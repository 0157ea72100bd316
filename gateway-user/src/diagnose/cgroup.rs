//! The cgroup `diagnose` probes from. A socket's cgroup is fixed when the socket is created
//! (docs/kernel.md, "Joining a process's socket to the kernel's record"), and the observer's
//! programs only see sockets of the cgroup they are attached to, so `diagnose` makes a cgroup v2
//! child of its own cgroup, `gateway-diagnose-<pid>`, moves itself (the whole process) into it
//! before it opens any probe socket, and attaches there. The observer then sees exactly the
//! probes and nothing else on the host.
//!
//! The placement rules (a child of the own cgroup, never a new one at the root; stale
//! siblings of dead pids removed first) and the undoing are [`SelfCgroup`]'s: dropping it
//! (also on an error or an interrupt) moves the process back and removes the directory.

use crate::config::ObserverCgroup;
pub use crate::observer::cgroup::{SelfCgroup, SelfCgroupError};

/// Name pattern of the cgroups `diagnose` creates.
pub const PATTERN: &str = "gateway-diagnose-{pid}";

/// Creates `<own cgroup>/gateway-diagnose-<pid>` and moves this process into it.
pub fn enter() -> Result<SelfCgroup, SelfCgroupError> {
    let cgroup = SelfCgroup::enter(&ObserverCgroup::Child(PATTERN.to_owned()))?;
    tracing::debug!(cgroup = %cgroup.path().display(), "diagnose moved into its own cgroup");
    Ok(cgroup)
}
