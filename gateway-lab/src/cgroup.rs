//! A throw-away cgroup v2 directory for lab workloads. The kernel observer attaches its cgroup
//! programs (sock_ops, getsockopt, connect4/6) to a cgroup; a process placed in this one before
//! it opens sockets is observed, and nothing else on the host is.
//!
//! The v2 hierarchy is found in `/proc/self/mounts` (here `/sys/fs/cgroup/unified`, beside the
//! v1 controllers), never assumed.

use std::{
    fs,
    io::Write as _,
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use super::{
    error::{LabError, LabResult},
    names,
};

/// How long drop keeps retrying `rmdir` while exiting members still pin the cgroup (EBUSY).
const RMDIR_RETRY_FOR: Duration = Duration::from_secs(2);

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mounts`.
pub fn cgroup2_mount() -> LabResult<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|source| LabError::Io {
        action: "reading",
        path: "/proc/self/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            // Mount points with spaces are octal-escaped (\040); cgroup mounts have none here.
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or(LabError::NoCgroup2)
}

/// A cgroup v2 directory that is removed when dropped, after moving any remaining members to
/// its parent.
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
    id: u64,
    /// `cgroup.procs`, opened before any fork so that a `pre_exec` hook can join with a single
    /// `write("0")` (see [`NetnsCommandExt::in_cgroup`](super::NetnsCommandExt::in_cgroup)).
    procs: Arc<OwnedFd>,
}

impl CgroupGuard {
    /// Creates `<cgroup2 mount>/gwlab-<pid>-<n>-<label>`.
    pub fn new(label: &str) -> LabResult<Self> {
        let root = cgroup2_mount()?;
        Self::create(root.join(names::cgroup_name(label)))
    }

    /// Creates the cgroup directory `path` (its parent must be a cgroup v2 directory).
    pub fn create(path: PathBuf) -> LabResult<Self> {
        fs::create_dir(&path).map_err(|source| LabError::Io {
            action: "creating cgroup",
            path: path.clone(),
            source,
        })?;
        let opened = fs::metadata(&path).map(|m| m.ino()).and_then(|id| {
            Ok((
                id,
                fs::OpenOptions::new()
                    .write(true)
                    .open(path.join("cgroup.procs"))?,
            ))
        });
        match opened {
            Ok((id, procs)) => Ok(Self {
                path,
                id,
                procs: Arc::new(procs.into()),
            }),
            Err(source) => {
                let _ = fs::remove_dir(&path);
                Err(LabError::Io {
                    action: "opening cgroup",
                    path,
                    source,
                })
            }
        }
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: the directory's inode number, which is what `bpf_get_current_cgroup_id()`
    /// and `bpf_skb_cgroup_id()` return for tasks and sockets in it (kernfs node id,
    /// `kernel/cgroup/cgroup.c: cgroup_id()`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Moves process `pid` (all its threads) into this cgroup. Sockets it already has stay
    /// charged to their old cgroup; only sockets created afterwards belong to this one.
    pub fn add_pid(&self, pid: u32) -> LabResult<()> {
        write_pid(&self.path.join("cgroup.procs"), pid)
    }

    /// The pids currently in this cgroup.
    pub fn pids(&self) -> LabResult<Vec<u32>> {
        read_pids(&self.path)
    }

    pub(crate) fn procs_fd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.procs)
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(err) = remove_cgroup(&self.path) {
            tracing::warn!(cgroup = %self.path.display(), error = %err, "lab cgroup left behind");
        }
    }
}

fn read_pids(dir: &Path) -> LabResult<Vec<u32>> {
    let path = dir.join("cgroup.procs");
    let text = fs::read_to_string(&path).map_err(|source| LabError::Io {
        action: "reading",
        path,
        source,
    })?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn write_pid(procs: &Path, pid: u32) -> LabResult<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(procs)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
        .map_err(|source| LabError::Io {
            action: "moving pid into cgroup via",
            path: procs.to_owned(),
            source,
        })
}

/// Moves the members of `dir` (and of any child cgroups) to its parent and removes it.
pub(crate) fn remove_cgroup(dir: &Path) -> LabResult<()> {
    if let Ok(children) = fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&child.path())?;
            }
        }
    }
    let parent_procs = dir
        .parent()
        .map(|p| p.join("cgroup.procs"))
        .unwrap_or_else(|| PathBuf::from("/cgroup.procs"));
    let deadline = Instant::now() + RMDIR_RETRY_FOR;
    loop {
        for pid in read_pids(dir).unwrap_or_default() {
            // A pid that exits meanwhile gives ESRCH; the retry loop covers it.
            let _ = write_pid(&parent_procs, pid);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) if Instant::now() >= deadline => {
                return Err(LabError::Io {
                    action: "removing cgroup",
                    path: dir.to_owned(),
                    source,
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}
