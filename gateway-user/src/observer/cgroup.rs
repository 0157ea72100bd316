//! Moving this process into a cgroup of its own, so that the observer attached there sees
//! exactly this process's sockets. A socket's cgroup is fixed when the socket is created
//! (docs/kernel.md), so this must happen before the first upstream socket is opened.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::preflight::{self, PreflightError};

/// The process's own cgroup v2 directory; dropping it moves the process back and removes it.
#[derive(Debug)]
pub struct SelfCgroup {
    path: PathBuf,
    original: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SelfCgroupError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("creating cgroup {path}: {source}")]
    Create { path: String, source: io::Error },
    #[error("moving this process into cgroup {path}: {source}")]
    Enter { path: String, source: io::Error },
}

/// This process's current cgroup v2 directory, from /proc/self/cgroup (`0::/path`).
fn current(mount: &Path) -> PathBuf {
    let rel = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("0::")
                    .map(|p| p.trim_start_matches('/').to_owned())
            })
        })
        .unwrap_or_default();
    mount.join(rel)
}

impl SelfCgroup {
    /// Creates `path` (absolute, or relative to the cgroup v2 mount) and moves the whole process
    /// into it. An existing directory is reused.
    pub fn enter(path: &Path) -> Result<SelfCgroup, SelfCgroupError> {
        let mount = preflight::cgroup2_mount()?;
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            mount.join(path)
        };
        let original = current(&mount);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(SelfCgroupError::Create {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
        fs::write(path.join("cgroup.procs"), std::process::id().to_string()).map_err(|source| {
            SelfCgroupError::Enter {
                path: path.display().to_string(),
                source,
            }
        })?;
        Ok(SelfCgroup { path, original })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SelfCgroup {
    fn drop(&mut self) {
        if let Err(err) = fs::write(
            self.original.join("cgroup.procs"),
            std::process::id().to_string(),
        ) {
            tracing::warn!(%err, cgroup = %self.original.display(), "could not move back to the original cgroup");
        }
        if let Err(err) = fs::remove_dir(&self.path) {
            tracing::warn!(%err, cgroup = %self.path.display(), "could not remove the gateway's cgroup");
        }
    }
}
