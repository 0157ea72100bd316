//! The cgroup `diagnose` probes from. A socket's cgroup is fixed when the socket is created
//! (KERNEL.md), and the observer's programs only see sockets of the cgroup they are attached
//! to, so `diagnose` makes a cgroup v2 child of its own, `<v2 mount>/gateway-diagnose-<pid>`,
//! moves itself (every thread: `cgroup.procs`) into it before it opens any probe socket, and
//! attaches there. The observer then sees exactly the probes and nothing else on the host.
//!
//! [`SelfCgroup`] undoes it on drop, also on an error or an interrupt: it moves the process
//! back where it was and removes the directory. A `SIGKILL` leaves an empty directory behind;
//! the next `diagnose` removes those of dead pids ([`sweep_stale`]).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::observer::preflight;

/// Name prefix of the cgroups `diagnose` creates under the v2 mount.
pub const PREFIX: &str = "gateway-diagnose-";

/// How long drop retries `rmdir` while the kernel finishes moving us out (EBUSY).
const RMDIR_RETRY_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// This process, inside a cgroup of its own until dropped.
#[derive(Debug)]
pub struct SelfCgroup {
    path: PathBuf,
    home: PathBuf,
    mount: PathBuf,
}

impl SelfCgroup {
    /// Creates `<v2 mount>/gateway-diagnose-<pid>` and moves this process into it.
    pub fn enter() -> Result<SelfCgroup, CgroupError> {
        let mount = preflight::cgroup2_mount()?;
        let home = current_cgroup(&mount);
        sweep_stale(&mount);
        let path = mount.join(format!("{PREFIX}{}", std::process::id()));
        if path.exists() {
            // Left by an earlier process with our pid (the sweep only removes dead pids' ones).
            let _ = fs::remove_dir(&path);
        }
        fs::create_dir(&path).map_err(|source| CgroupError::Io {
            action: "creating cgroup",
            path: path.clone(),
            source,
        })?;
        // From here on, drop cleans up.
        let guard = SelfCgroup { path, home, mount };
        write_self(&guard.path).map_err(|source| CgroupError::Io {
            action: "moving this process into cgroup",
            path: guard.path.clone(),
            source,
        })?;
        tracing::debug!(cgroup = %guard.path.display(), "diagnose moved into its own cgroup");
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SelfCgroup {
    fn drop(&mut self) {
        if let Err(err) = write_self(&self.home) {
            // The original cgroup may be gone meanwhile; the root always exists.
            tracing::debug!(home = %self.home.display(), error = %err, "could not move back");
            if let Err(err) = write_self(&self.mount) {
                tracing::warn!(error = %err, "could not leave the diagnose cgroup");
            }
        }
        let deadline = Instant::now() + RMDIR_RETRY_FOR;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(cgroup = %self.path.display(), error = %e, "cgroup left behind");
                    break;
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// Writes "0" (the writing process, all its threads) to `dir/cgroup.procs`.
fn write_self(dir: &Path) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?
        .write_all(b"0")
}

/// This process's cgroup v2 directory, from the `0::/path` line of /proc/self/cgroup.
fn current_cgroup(mount: &Path) -> PathBuf {
    fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|rel| mount.join(rel.trim().trim_start_matches('/')))
        })
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| mount.to_path_buf())
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
