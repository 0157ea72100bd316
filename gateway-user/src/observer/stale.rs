//! Cgroups left behind by a gateway that died without cleaning up (SIGKILL, OOM kill, power
//! cut): `gateway run` names its cgroup after its pid (`gateway-{pid}`), and only a clean exit
//! removes it. The eBPF programs attached there went with the dead process's file descriptors;
//! the empty directory stays. At start the next gateway removes its dead siblings.
//!
//! A sibling is removed only if its name is the gateway's own with another number in place of
//! the pid, no process with that pid exists, and the kernel agrees it is empty (`rmdir` of a
//! cgroup with members or children fails with EBUSY, and it is then left alone).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Removes the dead siblings of `own` (this process's cgroup, e.g. `/sys/fs/cgroup/gateway-42`
/// for pid 42); returns the directories removed. Nothing to do when `own`'s name does not end
/// in this process's pid (a configured fixed name).
pub fn remove_dead_siblings(own: &Path) -> Vec<PathBuf> {
    let pid = std::process::id().to_string();
    let (Some(parent), Some(name)) = (own.parent(), own.file_name().and_then(|n| n.to_str()))
    else {
        return Vec::new();
    };
    let Some(prefix) = name.strip_suffix(pid.as_str()) else {
        return Vec::new();
    };
    if prefix.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(other) = file_name.to_str() else {
            continue;
        };
        let Some(other_pid) = other.strip_prefix(prefix) else {
            continue;
        };
        if other_pid == pid
            || other_pid.is_empty()
            || !other_pid.bytes().all(|b| b.is_ascii_digit())
            || Path::new("/proc").join(other_pid).exists()
        {
            continue;
        }
        let path = entry.path();
        match fs::remove_dir(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(%err, cgroup = %path.display(), "a dead gateway's cgroup could not be removed");
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_numbered_siblings_go() {
        let dir = std::env::temp_dir().join(format!("gateway-stale-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        let own = dir.join(format!("gateway-{me}"));
        // pid 1 is alive; 4194304 is above the kernel's pid limit, so never alive.
        for name in [
            format!("gateway-{me}"),
            "gateway-1".to_owned(),
            "gateway-4194304".to_owned(),
            "gateway-4194305x".to_owned(),
            "other-4194306".to_owned(),
        ] {
            fs::create_dir(dir.join(name)).unwrap();
        }
        let removed = remove_dead_siblings(&own);
        assert_eq!(removed, vec![dir.join("gateway-4194304")]);
        for kept in [
            format!("gateway-{me}"),
            "gateway-1".into(),
            "gateway-4194305x".into(),
            "other-4194306".into(),
        ] {
            assert!(dir.join(&kept).exists(), "{kept} must stay");
        }
        // A fixed name (no pid in it) removes nothing.
        fs::create_dir(dir.join("gateway-4194307")).unwrap();
        assert!(remove_dead_siblings(&dir.join("fixed")).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
