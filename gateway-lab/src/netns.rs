//! A named network namespace (`ip netns add`) and the three ways to run code inside it: a new OS
//! thread that called `setns(CLONE_NEWNET)` ([`Netns::spawn_thread`], [`Netns::run`]), a child
//! process entered before it execs ([`NetnsCommandExt`]), and `ip netns exec` for the lab's own
//! helper programs. Also per-namespace sysctls and counters, read from a thread inside it.
//!
//! Only the thread that calls `setns` moves; the rest of the process stays where it was. A socket
//! belongs to the namespace of the thread that created it, for its whole life, whichever thread
//! uses it later.

use std::{
    ffi::OsStr,
    fs,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, mpsc},
    thread::{self, JoinHandle},
};

use super::{
    cgroup::CgroupGuard,
    cmd,
    counters::NetStat,
    error::{LabError, LabResult},
};

/// Where `ip netns add NAME` bind-mounts the namespace.
const NETNS_RUN_DIR: &str = "/run/netns";

/// A handle on a named network namespace. Cloning is cheap; the namespace itself is created and
/// deleted by whoever owns it (a [`Lab`](super::Lab)), not by this handle.
#[derive(Clone, Debug)]
pub struct Netns {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    /// An open fd on `/run/netns/NAME`: `setns` takes it, and it keeps the namespace alive for
    /// as long as a thread or child may still need to enter it.
    fd: OwnedFd,
    inode: u64,
}

impl Netns {
    /// `ip netns add NAME` and open it.
    pub(crate) fn create(name: &str) -> LabResult<Self> {
        cmd::ip(&["netns", "add", name])?;
        Self::open(name).inspect_err(|_| {
            let _ = cmd::ip(&["netns", "del", name]);
        })
    }

    /// Opens an existing named namespace.
    pub fn open(name: &str) -> LabResult<Self> {
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let file = fs::File::open(&path).map_err(|source| LabError::Io {
            action: "opening network namespace",
            path: path.clone(),
            source,
        })?;
        let inode = file
            .metadata()
            .map_err(|source| LabError::Io {
                action: "stat of network namespace",
                path,
                source,
            })?
            .ino();
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                fd: file.into(),
                inode,
            }),
        })
    }

    /// The name under `/run/netns`, as `ip netns exec NAME` takes it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.inner.name)
    }

    /// The namespace's inode number: what `readlink /proc/PID/ns/net` shows as `net:[INODE]`,
    /// and what eBPF's `bpf_get_netns_cookie` does *not* return (that is a separate cookie).
    pub fn inode(&self) -> u64 {
        self.inner.inode
    }

    /// Moves the calling thread into this namespace. Private: a thread that moves must never
    /// return to a thread pool, so only threads the lab starts call it.
    fn enter_current_thread(&self) -> LabResult<()> {
        // SAFETY: setns only reads the fd, which `self` keeps open.
        let rc = unsafe { libc::setns(self.inner.fd.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(LabError::Setns {
                netns: self.inner.name.clone(),
                source: std::io::Error::last_os_error(),
            })
        }
    }

    /// Starts a new OS thread named `name`, moves it into this namespace, then runs `f` on it.
    /// Returns once the thread is inside; `f` never runs outside the namespace.
    pub fn spawn_thread<F, T>(&self, name: &str, f: F) -> LabResult<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let entered = ns.enter_current_thread();
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                if !ok {
                    // End the thread without running `f` and without the panic hook's message:
                    // the caller already has the error.
                    std::panic::resume_unwind(Box::new("setns failed"));
                }
                f()
            })
            .map_err(|source| LabError::Setns {
                netns: self.inner.name.clone(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(LabError::ThreadDied {
                thread: name.to_owned(),
            }),
        }
    }

    /// Runs `f` on a fresh thread inside this namespace and waits for it. `f` may borrow from
    /// the caller. A panic in `f` (a failed assertion, say) is resumed on the calling thread.
    pub fn run<F, T>(&self, f: F) -> LabResult<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        thread::scope(|scope| {
            let (tx, rx) = mpsc::sync_channel(1);
            let handle = thread::Builder::new()
                .name(format!("netns-{}", self.inner.inode))
                .spawn_scoped(scope, move || {
                    let entered = self.enter_current_thread();
                    let ok = entered.is_ok();
                    let _ = tx.send(entered);
                    ok.then(f)
                })
                .map_err(|source| LabError::Setns {
                    netns: self.inner.name.clone(),
                    source,
                })?;
            let entered = rx.recv();
            match handle.join() {
                Ok(Some(value)) => Ok(value),
                Ok(None) => Err(match entered {
                    Ok(Err(err)) => err,
                    _ => LabError::ThreadDied {
                        thread: format!("netns-{}", self.inner.inode),
                    },
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `future` to completion on a current-thread tokio runtime, on a fresh thread inside
    /// this namespace (for async clients: hyper, tokio sockets). Panics are resumed here.
    pub fn block_on<F>(&self, future: F) -> LabResult<F::Output>
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(future))
        })?
        .map_err(|source| LabError::Io {
            action: "building a tokio runtime in network namespace",
            path: self.path(),
            source,
        })
    }

    /// A `Command` for `program` that runs inside this namespace (see [`NetnsCommandExt`]).
    /// Unlike `ip netns exec`, the child keeps the caller's mount namespace, so `/sys` still
    /// shows the root namespace's devices; `/proc/self/net` and netlink are the namespace's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.in_netns(self);
        cmd
    }

    /// `ip netns exec NAME program args…`, waited for; returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> LabResult<String> {
        cmd::run(
            Command::new("ip")
                .args(["netns", "exec", &self.inner.name, program])
                .args(args),
            None,
        )
    }

    /// Reads `net.*` sysctl `key` (dotted, e.g. `net.ipv4.tcp_syn_retries`) in this namespace.
    pub fn sysctl(&self, key: &str) -> LabResult<String> {
        let path = sysctl_path(key);
        self.run(|| fs::read_to_string(&path))?
            .map(|v| v.trim().to_owned())
            .map_err(|source| LabError::Io {
                action: "reading sysctl",
                path,
                source,
            })
    }

    /// Sets `net.*` sysctl `key` in this namespace until the returned guard is dropped, when the
    /// previous value comes back. Never touches the root namespace.
    pub fn set_sysctl(&self, key: &str, value: &str) -> LabResult<SysctlGuard> {
        let previous = self.sysctl(key)?;
        self.write_sysctl(key, value)?;
        Ok(SysctlGuard {
            netns: self.clone(),
            key: key.to_owned(),
            previous: Some(previous),
        })
    }

    pub(crate) fn write_sysctl(&self, key: &str, value: &str) -> LabResult<()> {
        let path = sysctl_path(key);
        self.run(|| fs::write(&path, value))?
            .map_err(|source| LabError::Io {
                action: "writing sysctl",
                path,
                source,
            })
    }

    /// This namespace's SNMP and netstat counters (what `ip netns exec NAME nstat -az` shows),
    /// read from `/proc/thread-self/net/{netstat,snmp,snmp6}` on a thread inside it.
    pub fn netstat(&self) -> LabResult<NetStat> {
        self.run(NetStat::read_current_thread)?
            .map_err(|source| LabError::Io {
                action: "reading counters of network namespace",
                path: self.path(),
                source,
            })
    }

    /// Pids of other processes whose network namespace is this one.
    pub(crate) fn foreign_pids(&self) -> Vec<i32> {
        pids_in_netns(self.inner.inode)
    }
}

/// `/proc/sys/net/ipv4/tcp_syn_retries` for `net.ipv4.tcp_syn_retries`.
fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Every pid (other than ours) whose `/proc/PID/ns/net` is the namespace with this inode.
pub(crate) fn pids_in_netns(inode: u64) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == inode))
        .collect()
}

/// Restores a namespace sysctl to its previous value when dropped.
#[derive(Debug)]
#[must_use = "the sysctl is restored as soon as the guard is dropped"]
pub struct SysctlGuard {
    netns: Netns,
    key: String,
    previous: Option<String>,
}

impl SysctlGuard {
    /// The sysctl key this guard restores.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Restores the previous value now and reports whether that worked.
    pub fn restore(mut self) -> LabResult<()> {
        self.restore_inner()
    }

    fn restore_inner(&mut self) -> LabResult<()> {
        match self.previous.take() {
            Some(previous) => self.netns.write_sysctl(&self.key, &previous),
            None => Ok(()),
        }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(err) = self.restore_inner() {
            // The namespace may already be gone with its lab, and the sysctl with it.
            tracing::debug!(key = %self.key, error = %err, "sysctl not restored");
        }
    }
}

/// Runs a child process inside a lab namespace and/or cgroup. Both moves happen in `pre_exec`,
/// between fork and exec, so every socket the program ever opens is in that namespace and
/// charged to that cgroup (a socket's cgroup is fixed when it is created).
pub trait NetnsCommandExt {
    /// Enter `netns` before exec.
    fn in_netns(&mut self, netns: &Netns) -> &mut Self;
    /// Join `cgroup` before exec (writes "0" to its `cgroup.procs`).
    fn in_cgroup(&mut self, cgroup: &CgroupGuard) -> &mut Self;
}

impl NetnsCommandExt for Command {
    fn in_netns(&mut self, netns: &Netns) -> &mut Self {
        let inner = Arc::clone(&netns.inner);
        // SAFETY: the hook only calls setns(2), which is async-signal-safe, on an fd that the
        // Arc keeps open; it allocates nothing.
        unsafe {
            self.pre_exec(move || {
                if libc::setns(inner.fd.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        }
    }

    fn in_cgroup(&mut self, cgroup: &CgroupGuard) -> &mut Self {
        let procs = cgroup.procs_fd();
        // SAFETY: the hook only calls write(2), which is async-signal-safe, on an fd that was
        // opened before fork and is kept open by the Arc; it allocates nothing.
        unsafe {
            self.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        }
    }
}
