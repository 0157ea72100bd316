//! Names of everything the lab creates, and removal of what a dead process left behind.
//!
//! Every namespace and cgroup is named `gwlab-<pid>-<instance>-<role>`: the pid of the creating
//! process and a per-process counter make names unique across parallel labs and test binaries,
//! and the pid lets [`sweep_stale`] tell leftovers of a crashed run (pid dead) from labs that are
//! still in use (pid alive).

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use super::{
    cgroup::{cgroup2_mount, remove_cgroup},
    cmd,
    error::LabResult,
    netns::pids_in_netns,
};

/// Common prefix of every lab namespace and cgroup.
pub const NAME_PREFIX: &str = "gwlab-";

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(0);

/// `gwlab-<pid>-<n>`, fresh on every call.
pub(crate) fn instance_name() -> String {
    let n = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}-{n}", std::process::id())
}

/// `gwlab-<pid>-<n>-<label>`, for a cgroup that is not part of a lab.
pub(crate) fn cgroup_name(label: &str) -> String {
    format!("{}-{label}", instance_name())
}

/// The pid that created a lab object named `name`, if it is one.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(NAME_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// What [`sweep_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Namespaces deleted (names under `/run/netns`).
    pub namespaces: Vec<String>,
    /// Cgroup directories removed.
    pub cgroups: Vec<PathBuf>,
}

/// Removes lab namespaces and cgroups whose creating process is dead. Processes still inside a
/// stale namespace are killed first. Labs of live processes are left alone.
pub fn sweep_stale() -> LabResult<SweepReport> {
    let mut report = SweepReport::default();
    let listing = cmd::ip(&["netns", "list"])?;
    let stale: Vec<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| owner_pid(name).is_some_and(|pid| !pid_alive(pid)))
        .map(str::to_owned)
        .collect();
    if !stale.is_empty() {
        for name in &stale {
            if let Ok(meta) = fs::metadata(format!("/run/netns/{name}")) {
                kill_all(&pids_in_netns(std::os::unix::fs::MetadataExt::ino(&meta)));
            }
        }
        let lines: Vec<String> = stale.iter().map(|n| format!("netns del {n}")).collect();
        cmd::ip_batch(None, &lines, true)?;
        report.namespaces = stale;
    }

    let root = cgroup2_mount()?;
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if owner_pid(name).is_some_and(|pid| !pid_alive(pid)) {
                remove_cgroup(&entry.path())?;
                report.cgroups.push(entry.path());
            }
        }
    }
    if report != SweepReport::default() {
        tracing::info!(
            namespaces = ?report.namespaces,
            cgroups = ?report.cgroups,
            "removed leftovers of dead lab processes"
        );
    }
    Ok(report)
}

/// SIGKILL for processes left inside lab namespaces that are being deleted.
pub(crate) fn kill_all(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: plain kill(2) on a pid found inside a lab namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
