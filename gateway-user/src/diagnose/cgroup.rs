//! The cgroup `diagnose` probes from. A socket's cgroup is fixed when the socket is created
//! (docs/kernel.md, "Joining a process's socket to the kernel's record"), and the observer's
//! programs only see sockets of the cgroup they are attached to, so `diagnose` makes a cgroup v2
//! child of its own, `<v2 mount>/gateway-diagnose-<pid>`, moves itself (the whole process) into
//! it before it opens any probe socket, and attaches there. The observer then sees exactly the
//! probes and nothing else on the host.
//!
//! The move and its undoing are [`SelfCgroup`]'s: dropping it (also on an error or an
//! interrupt) moves the process back and removes the directory. A `SIGKILL` leaves an empty
//! directory behind; the next `diagnose` removes those of dead pids ([`sweep_stale`]).

use std::{fs, path::Path};

pub use crate::observer::cgroup::{SelfCgroup, SelfCgroupError};
use crate::observer::preflight;

/// Name prefix of the cgroups `diagnose` creates under the v2 mount.
pub const PREFIX: &str = "gateway-diagnose-";

/// Creates `<v2 mount>/gateway-diagnose-<pid>` and moves this process into it.
pub fn enter() -> Result<SelfCgroup, SelfCgroupError> {
    let mount = preflight::cgroup2_mount()?;
    sweep_stale(&mount);
    let cgroup = SelfCgroup::enter(&mount.join(format!("{PREFIX}{}", std::process::id())))?;
    tracing::debug!(cgroup = %cgroup.path().display(), "diagnose moved into its own cgroup");
    Ok(cgroup)
}

/// Removes `gateway-diagnose-<pid>` directories of processes that no longer exist.
pub fn sweep_stale(mount: &Path) {
    let Ok(entries) = fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive && fs::remove_dir(entry.path()).is_ok() {
            tracing::info!(cgroup = %entry.path().display(), "removed a stale diagnose cgroup");
        }
    }
}
