//! The observer's cgroup: where a process that attaches the observer to watch its own sockets
//! moves itself first. A socket's cgroup is fixed when the socket is created (docs/kernel.md), so
//! the move happens before the first upstream or probe socket is opened.
//!
//! The cgroup is a child of the process's **own** cgroup, never a new one at the root of the
//! hierarchy: under systemd with `Delegate=yes` it sits inside the unit
//! (`/system.slice/gateway.service/gateway-<pid>`), in a container inside the container's
//! cgroup, and elsewhere beside nothing the operator did not put there. The process's limits
//! and accounting therefore still apply, and when the unit or container goes, so does the
//! cgroup. Creating a child and moving into it needs write access to the own cgroup (which is
//! what delegation grants); without it the error says so and what to do.
//!
//! A process started from inside another gateway's observer cgroup (a binary upgrade: the new
//! process is forked by the old one) takes that cgroup's parent as its home, so that the two
//! sit side by side. A cgroup left behind by a killed process (SIGKILL gives no chance to
//! remove it) is removed at the next start: an empty directory named by the same pattern whose
//! pid no longer exists.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::preflight::{self, PreflightError};
use crate::config::ObserverCgroup;

/// A cgroup this process moved itself into (or attached in place); dropping it moves the
/// process back and removes what it created.
#[derive(Debug)]
pub struct SelfCgroup {
    path: PathBuf,
    /// Where to move back to on drop; `None` when the process was not moved.
    back_to: Option<PathBuf>,
    /// Created by this process, so removed on drop.
    created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SelfCgroupError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("cannot tell this process's cgroup v2: {reason}")]
    Unknown { reason: String },
    #[error("creating the observer cgroup {path}: {source}{hint}")]
    Create {
        path: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("moving this process into the observer cgroup {path}: {source}{hint}")]
    Enter {
        path: String,
        source: io::Error,
        hint: &'static str,
    },
}

/// What to do about a cgroup that cannot be written, by errno.
fn hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            "; the gateway creates its observer cgroup as a child of its own cgroup, which must \
             be delegated to it: under systemd set `Delegate=yes` in the unit (the packaged \
             gateway.service does), otherwise give the gateway's user write access to its \
             cgroup directory and its cgroup.procs (as systemd's delegation does), or run it as \
             root; in a container whose cgroup cannot be written, set `[observer] cgroup = \".\"` \
             to attach to the container's own cgroup without a child"
        }
        Some(libc::EROFS) => {
            "; the cgroup filesystem is mounted read-only (as in most containers): set \
             `[observer] cgroup = \".\"` to attach to the own cgroup without a child, or give \
             the container a writable, delegated cgroup"
        }
        _ => "",
    }
}

/// A child name pattern such as `gateway-{pid}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePattern {
    prefix: String,
    /// `None`: no `{pid}` in the pattern, the name is `prefix` alone.
    suffix: Option<String>,
}

impl NamePattern {
    pub fn new(pattern: &str) -> NamePattern {
        match pattern.split_once("{pid}") {
            Some((prefix, suffix)) => NamePattern {
                prefix: prefix.to_owned(),
                suffix: Some(suffix.to_owned()),
            },
            None => NamePattern {
                prefix: pattern.to_owned(),
                suffix: None,
            },
        }
    }

    pub fn name(&self, pid: u32) -> String {
        match &self.suffix {
            Some(suffix) => format!("{}{pid}{suffix}", self.prefix),
            None => self.prefix.clone(),
        }
    }

    /// `Some(pid)` (0 for a pattern without `{pid}`) when `name` is one this pattern makes.
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        match &self.suffix {
            None => (name == self.prefix).then_some(0),
            Some(suffix) => {
                let digits = name
                    .strip_prefix(&self.prefix)?
                    .strip_suffix(suffix.as_str())?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                digits.parse().ok()
            }
        }
    }
}

/// This process's cgroup v2 directory, from `/proc/self/cgroup` (`0::/path`) and the mount.
pub fn own_cgroup(mount: &Path) -> Result<PathBuf, SelfCgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup").map_err(|e| SelfCgroupError::Unknown {
        reason: format!("reading /proc/self/cgroup: {e}"),
    })?;
    own_cgroup_in(&text, mount)
}

fn own_cgroup_in(proc_self_cgroup: &str, mount: &Path) -> Result<PathBuf, SelfCgroupError> {
    let rel = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| SelfCgroupError::Unknown {
            reason: "/proc/self/cgroup has no cgroup v2 (`0::`) line".into(),
        })?;
    let rel = rel.trim_end().trim_start_matches('/');
    if rel.split('/').any(|part| part == "..") {
        return Err(SelfCgroupError::Unknown {
            reason: format!(
                "/proc/self/cgroup says `0::/{rel}`: this process sits outside its cgroup namespace's root (entered with nsenter?); start it inside the namespace"
            ),
        });
    }
    Ok(mount.join(rel))
}

/// Where a child named by `pattern` goes for a process whose own cgroup is `own`: `own`, or
/// its parent when `own` is itself one of those children (another gateway's, which started
/// this process), so that the two end up side by side.
pub fn home_for(own: &Path, mount: &Path, pattern: &NamePattern) -> PathBuf {
    let nested = own != mount
        && own
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| pattern.pid_of(n))
            .is_some_and(|pid| pid != std::process::id());
    match own.parent() {
        Some(parent) if nested => parent.to_path_buf(),
        _ => own.to_path_buf(),
    }
}

/// Whether a process with this pid exists (in this pid namespace).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the pid exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the children of `home` named by `pattern` that hold no process and whose pid is
/// gone: what a SIGKILLed gateway leaves. Returns the directories removed.
pub fn sweep_stale(home: &Path, pattern: &NamePattern) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(home) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| pattern.pid_of(n)) else {
            continue;
        };
        if pid == 0 || pid == std::process::id() || alive(pid) {
            continue;
        }
        let path = entry.path();
        let empty =
            fs::read_to_string(path.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        if empty && fs::remove_dir(&path).is_ok() {
            tracing::info!(cgroup = %path.display(), pid, "removed a cgroup left behind by a gateway that no longer runs");
            removed.push(path);
        }
    }
    removed
}

fn move_into(path: &Path) -> io::Result<()> {
    fs::write(path.join("cgroup.procs"), std::process::id().to_string())
}

impl SelfCgroup {
    /// Places the process per `[observer] cgroup`: creates the child (removing stale siblings
    /// first) and moves the whole process into it; `Own` attaches in place.
    pub fn enter(placement: &ObserverCgroup) -> Result<SelfCgroup, SelfCgroupError> {
        let mount = preflight::cgroup2_mount()?;
        let own = own_cgroup(&mount)?;
        match placement {
            ObserverCgroup::Own => Ok(SelfCgroup {
                path: own,
                back_to: None,
                created: false,
            }),
            ObserverCgroup::Path(path) => {
                // Checked before anything is made or written: the process is about to write
                // its pid into `cgroup.procs` there, which in any other directory (`/etc`, a
                // tmpfs beside the v2 mount) is a file created or overwritten, as root.
                let checked = if path.exists() {
                    path
                } else {
                    path.parent().unwrap_or(path)
                };
                if !preflight::in_cgroup2(checked) {
                    return Err(PreflightError::NotCgroup2 {
                        path: path.display().to_string(),
                        mount: mount.display().to_string(),
                    }
                    .into());
                }
                Self::create_and_enter(path.clone(), own)
            }
            ObserverCgroup::Child(pattern) => {
                let pattern = NamePattern::new(pattern);
                let home = home_for(&own, &mount, &pattern);
                sweep_stale(&home, &pattern);
                let path = home.join(pattern.name(std::process::id()));
                Self::create_and_enter(path, home)
            }
        }
    }

    fn create_and_enter(path: PathBuf, back_to: PathBuf) -> Result<SelfCgroup, SelfCgroupError> {
        let created = match fs::create_dir(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(source) => {
                return Err(SelfCgroupError::Create {
                    path: path.display().to_string(),
                    hint: hint(&source),
                    source,
                });
            }
        };
        if let Err(source) = move_into(&path) {
            if created {
                let _ = fs::remove_dir(&path);
            }
            return Err(SelfCgroupError::Enter {
                path: path.display().to_string(),
                hint: hint(&source),
                source,
            });
        }
        Ok(SelfCgroup {
            path,
            back_to: Some(back_to),
            created,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SelfCgroup {
    fn drop(&mut self) {
        let Some(back_to) = &self.back_to else {
            return;
        };
        if let Err(err) = move_into(back_to) {
            // E.g. EBUSY when controllers are enabled in its subtree_control (cgroup v2's "no
            // internal processes" rule): the next start removes the directory.
            tracing::warn!(%err, cgroup = %back_to.display(), "could not move back out of the observer cgroup; it is removed at the next start");
            return;
        }
        if self.created
            && let Err(err) = fs::remove_dir(&self.path)
        {
            tracing::warn!(%err, cgroup = %self.path.display(), "could not remove the observer cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_names_and_recognises_its_children() {
        let p = NamePattern::new("gateway-{pid}");
        assert_eq!(p.name(42), "gateway-42");
        assert_eq!(p.pid_of("gateway-42"), Some(42));
        for other in [
            "gateway-",
            "gateway-x1",
            "gateway-diagnose-7",
            "gw-1",
            "gateway-1a",
        ] {
            assert_eq!(p.pid_of(other), None, "{other}");
        }
        let fixed = NamePattern::new("observed");
        assert_eq!(fixed.name(7), "observed");
        assert_eq!(fixed.pid_of("observed"), Some(0));
        let mid = NamePattern::new("gw.{pid}.obs");
        assert_eq!(mid.pid_of("gw.12.obs"), Some(12));
        assert_eq!(mid.pid_of("gw.12.ob"), None);
    }

    #[test]
    fn own_cgroup_is_read_from_the_v2_line() {
        let mount = Path::new("/sys/fs/cgroup");
        let text = "9:name=systemd:/x\n0::/system.slice/gateway.service\n";
        assert_eq!(
            own_cgroup_in(text, mount).unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/gateway.service")
        );
        assert_eq!(own_cgroup_in("0::/\n", mount).unwrap(), mount);
        let outside = own_cgroup_in("0::/../payload\n", mount).unwrap_err();
        assert!(
            outside.to_string().contains("outside its cgroup namespace"),
            "{outside}"
        );
        assert!(matches!(
            own_cgroup_in("4:memory:/x\n", mount),
            Err(SelfCgroupError::Unknown { .. })
        ));
    }

    #[test]
    fn a_gateway_started_inside_another_gateways_cgroup_goes_beside_it() {
        let mount = Path::new("/sys/fs/cgroup");
        let unit = mount.join("system.slice/gateway.service");
        let p = NamePattern::new("gateway-{pid}");
        assert_eq!(home_for(&unit, mount, &p), unit);
        // The old process's cgroup (a pid that is not ours).
        let old = unit.join("gateway-1");
        assert_eq!(home_for(&old, mount, &p), unit);
        // Never above the mount.
        assert_eq!(home_for(mount, mount, &p), mount);
    }

    #[test]
    fn permission_errors_say_how_to_delegate() {
        let text = SelfCgroupError::Create {
            path: "/sys/fs/cgroup/x/gateway-1".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
            hint: hint(&io::Error::from_raw_os_error(libc::EACCES)),
        }
        .to_string();
        assert!(
            text.contains("Permission denied") && text.contains("Delegate=yes"),
            "{text}"
        );
        let ro = hint(&io::Error::from_raw_os_error(libc::EROFS));
        assert!(
            ro.contains("read-only") && ro.contains("cgroup = \".\""),
            "{ro}"
        );
    }
}
