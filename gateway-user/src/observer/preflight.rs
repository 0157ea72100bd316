//! Checks that run before anything is loaded, so that each thing the observer needs and
//! lacks gets its own clear error and next step instead of a raw EPERM from bpf(2).

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::btf::VMLINUX_BTF;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const CAP_NET_ADMIN: u32 = 12;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TRACEFS_MAGIC: i64 = 0x7472_6163;
pub const BPFFS: &str = "/sys/fs/bpf";
pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "the observer needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN (this process has \
         CapEff={cap_eff:#x}); run it with sudo, or grant them: \
         setcap cap_bpf,cap_perfmon,cap_net_admin+ep $(which gateway), or as systemd \
         AmbientCapabilities= (see the packaged units); `gateway run` also needs write access to \
         its own cgroup (Delegate=yes)"
    )]
    NotPrivileged { cap_eff: u64 },
    #[error(
        "kernel BTF is missing: {VMLINUX_BTF} does not exist; this kernel was built without CONFIG_DEBUG_INFO_BTF, which the observer needs"
    )]
    NoBtf,
    #[error(
        "cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mounts); mount it with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` (or boot with systemd.unified_cgroup_hierarchy=1)"
    )]
    NoCgroup2,
    #[error(
        "cgroup {path} does not exist (looked in {looked}); pass a directory under the cgroup v2 mount {mount}, e.g. --cgroup {mount}/system.slice"
    )]
    UnknownCgroup {
        path: String,
        looked: String,
        mount: String,
    },
    #[error(
        "{path} is not a cgroup v2 directory (it is on a different filesystem); pass a directory under {mount}"
    )]
    NotCgroup2 { path: String, mount: String },
    #[error(
        "cgroup v2 is not mounted in this mount namespace (`ip netns exec` remounts /sys and hides it), and mounting it privately failed at {step}: {source}; run the command with `nsenter --net=/run/netns/NAME` instead, which keeps /sys, or with CAP_SYS_ADMIN"
    )]
    PrivateCgroup2 {
        step: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{what} is not mounted at {path} and mounting it failed: {source}; mount it with `mount -t {fstype} {fstype} {path}`"
    )]
    Mount {
        what: &'static str,
        fstype: &'static str,
        path: &'static str,
        source: std::io::Error,
    },
}

/// Effective capabilities of this process, from /proc/self/status.
fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn check_privileges() -> Result<(), PreflightError> {
    let caps = cap_eff();
    let has = |c: u32| caps & (1 << c) != 0;
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let perfmon = has(CAP_PERFMON) || has(CAP_SYS_ADMIN);
    if bpf && perfmon && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged { cap_eff: caps })
    }
}

pub fn check_btf() -> Result<(), PreflightError> {
    if Path::new(VMLINUX_BTF).exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf)
    }
}

/// The cgroup v2 mount point, from /proc/self/mounts.
pub fn cgroup2_mount() -> Result<PathBuf, PreflightError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        // Prefer the shortest path: the hierarchy root, not a bind mount of a subtree.
        .min_by_key(|p| p.as_os_str().len())
        .ok_or(PreflightError::NoCgroup2)
}

/// Whether `path` is in the cgroup v2 filesystem (not merely under its mount's path: a
/// directory in /sys/fs/cgroup on a hybrid host is on tmpfs).
pub fn in_cgroup2(path: &Path) -> bool {
    fs_magic(path) == Some(CGROUP2_SUPER_MAGIC)
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st is a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// Resolves `--cgroup`: an absolute path, or a path relative to the cgroup v2 mount.
/// `None` means the v2 root: every process on the host.
pub fn resolve_cgroup(arg: Option<&Path>) -> Result<PathBuf, PreflightError> {
    let mount = cgroup2_mount()?;
    let path = match arg {
        None => mount.clone(),
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => mount.join(p),
    };
    if !path.is_dir() {
        return Err(PreflightError::UnknownCgroup {
            path: arg.map(|p| p.display().to_string()).unwrap_or_default(),
            looked: path.display().to_string(),
            mount: mount.display().to_string(),
        });
    }
    if !in_cgroup2(&path) {
        return Err(PreflightError::NotCgroup2 {
            path: path.display().to_string(),
            mount: mount.display().to_string(),
        });
    }
    Ok(path)
}

/// Where [`ensure_cgroup2`] mounts cgroup v2 when it has to.
pub const PRIVATE_CGROUP2: &str = "/sys/fs/cgroup";

/// Makes cgroup v2 visible to this process. `ip netns exec` runs its command in a mount
/// namespace of its own whose /sys is a fresh sysfs without the cgroup mounts, so the
/// observer would find no cgroup to attach to. When /proc/self/mounts has no cgroup2, this
/// process moves into a mount namespace of its own whose mounts propagate nowhere (nothing it
/// mounts can reach the host's or `ip netns exec`'s namespace) and mounts cgroup2 at
/// [`PRIVATE_CGROUP2`] there. Returns where it mounted, or `None` when nothing was needed.
///
/// Call it before the process starts any thread: `unshare(CLONE_NEWNS)` refuses a process whose
/// threads share its filesystem context (EINVAL).
pub fn ensure_cgroup2() -> Result<Option<PathBuf>, PreflightError> {
    if cgroup2_mount().is_ok() {
        return Ok(None);
    }
    let fail = |step| PreflightError::PrivateCgroup2 {
        step,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: plain syscalls with valid, NUL-terminated arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(fail("unshare(CLONE_NEWNS)"));
        }
        let root = CString::new("/").expect("static");
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail("making / a slave mount"));
        }
        let fstype = CString::new("cgroup2").expect("static");
        let target = CString::new(PRIVATE_CGROUP2).expect("static");
        if libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail("mount -t cgroup2 cgroup2 /sys/fs/cgroup"));
        }
    }
    tracing::info!(
        path = PRIVATE_CGROUP2,
        "cgroup v2 was not visible in this mount namespace (ip netns exec remounts /sys); mounted it in a private one"
    );
    Ok(Some(PathBuf::from(PRIVATE_CGROUP2)))
}

/// Mounts `fstype` at `path` unless something of that type is already there.
fn ensure_mounted(
    what: &'static str,
    fstype: &'static str,
    path: &'static str,
    magic: i64,
) -> Result<(), PreflightError> {
    if fs_magic(Path::new(path)) == Some(magic) {
        return Ok(());
    }
    let c_path = CString::new(path).expect("static path");
    let c_type = CString::new(fstype).expect("static fstype");
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            c_type.as_ptr(),
            c_path.as_ptr(),
            c_type.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        tracing::info!(path, "mounted {what}");
        Ok(())
    } else {
        Err(PreflightError::Mount {
            what,
            fstype,
            path,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// bpffs: nothing is pinned, but tools like bpftool expect it and the issue asks for it.
pub fn ensure_bpffs() -> Result<(), PreflightError> {
    ensure_mounted("bpffs", "bpf", BPFFS, BPF_FS_MAGIC)
}

/// tracefs: the classic `syscalls:sys_exit_connect` tracepoint is attached through it.
pub fn ensure_tracefs() -> Result<(), PreflightError> {
    ensure_mounted("tracefs", "tracefs", TRACEFS, TRACEFS_MAGIC)
}

/// The first release whose `bpf_setsockopt()` takes `TCP_BPF_SOCK_OPS_CB_FLAGS` (commit
/// 3882dccf48f9, "bpf/bpf_get,set_sockopt: add option to set TCP-BPF sock ops flags").
const CALLBACKS_AT_CONNECT_SINCE: (u32, u32) = (6, 12);

/// Whether connect4/6 can turn sock_ops' callbacks on themselves on this kernel (its release,
/// from /proc/sys/kernel/osrelease, is 6.12 or later).
pub fn callbacks_at_connect() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|text| parse_release(&text))
        .is_some_and(|r| r >= CALLBACKS_AT_CONNECT_SINCE)
}

/// A kernel release ("6.18.44-…") as (major, minor).
fn parse_release(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(parse_release("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_release("6.12-rc1"), Some((6, 12)));
        assert_eq!(parse_release("garbage"), None);
        assert!((6, 18) >= CALLBACKS_AT_CONNECT_SINCE);
        assert!((6, 1) < CALLBACKS_AT_CONNECT_SINCE);
    }

    #[test]
    fn unknown_cgroup_is_a_clear_error() {
        let err = resolve_cgroup(Some(Path::new("definitely/not/a/cgroup"))).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("definitely/not/a/cgroup") && text.contains("does not exist"),
            "{text}"
        );
    }

    #[test]
    fn a_directory_outside_cgroupfs_is_rejected() {
        let err = resolve_cgroup(Some(Path::new("/tmp"))).unwrap_err();
        assert!(matches!(err, PreflightError::NotCgroup2 { .. }), "{err}");
    }

    #[test]
    fn the_v2_root_resolves() {
        let root = resolve_cgroup(None).expect("cgroup v2 is mounted on this machine kind");
        assert!(root.join("cgroup.procs").exists());
    }
}
