//! What the `deploy_*` tests install and boot: the package `./dev package` built, the Debian 12 root
//! `./dev setup` debootstrapped, and a container booted from an overlay of that root with a
//! real systemd (systemd-nspawn), torn down on drop (also on panic): the container stopped,
//! the overlay unmounted, the cgroups nspawn made removed.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// `~/.cache/gateway`, where `./dev setup` keeps the tools and the root.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/gateway")
}

/// The package built by `./dev package` (`cargo xtask test` builds it before these tests).
pub fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("GATEWAY_DEB") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "deb"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        found.len(),
        1,
        "expected one gateway_*.deb in {} (built by `./dev package`, which `./dev test` runs first); found {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// The Debian 12 root with systemd that `./dev setup` made with debootstrap.
pub fn debian_root() -> PathBuf {
    let root = cache_dir().join("bookworm-root");
    assert!(
        root.join(".complete").exists(),
        "no Debian 12 root at {}: run ./dev setup (debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm)",
        root.display()
    );
    root
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `cmd` and returns its stdout; panics with both streams if it fails.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CGROUP_NAMED_SYSTEMD: &str = "/sys/fs/cgroup/systemd";

/// The cgroup v2 mount (the root of the hierarchy).
fn cgroup2() -> PathBuf {
    gateway_lab::cgroup2_mount().expect("cgroup v2 is mounted")
}

/// A Debian 12 container running systemd, booted from an overlay of the cached root.
pub struct Container {
    pub name: String,
    dir: PathBuf,
    pub root: PathBuf,
    nspawn: Child,
    /// The container's init (systemd), as a host pid.
    pub leader: u32,
    /// The cgroups the container lives in, one per hierarchy nspawn uses.
    cgroups: Vec<PathBuf>,
}

impl Container {
    /// Boots the container with `files` (host path, path in the container) copied in first,
    /// and waits until systemd reports the system running.
    pub fn boot(label: &str, files: &[(&Path, &str)]) -> Container {
        let lower = debian_root();
        let name = format!("gwtest-{label}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        for d in ["upper", "work", "root"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        ok(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                dir.join("upper").display(),
                dir.join("work").display()
            ))
            .arg(&root));
        for (from, to) in files {
            let dest = root.join(to.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(from, &dest)
                .unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
        }
        // Cgroups of the test's own for nspawn to create its payload and supervisor groups
        // in, so that everything is removed with them (with --keep-unit and no host systemd
        // it creates them beside itself).
        let mut cgroups = vec![cgroup2().join(&name)];
        if Path::new(CGROUP_NAMED_SYSTEMD)
            .join("cgroup.procs")
            .exists()
        {
            cgroups.push(Path::new(CGROUP_NAMED_SYSTEMD).join(&name));
        }
        for c in &cgroups {
            std::fs::create_dir_all(c).unwrap();
        }
        let moves: String = cgroups
            .iter()
            .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.display()))
            .collect();
        let log = std::fs::File::create(dir.join("console.log")).unwrap();
        // --register=no --keep-unit: there is no systemd on the host to register with.
        // CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN are outside nspawn's default bounding set,
        // and bpf(2) outside its default system call filter: the units need them.
        let nspawn = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{moves}exec systemd-nspawn --register=no --keep-unit --quiet --boot \
                 --directory={} --machine={name} \
                 --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN \
                 --system-call-filter='bpf perf_event_open'",
                root.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (Debian package systemd-container; ./dev setup installs it)");
        let mut c = Container {
            name,
            dir,
            root,
            leader: 0,
            nspawn,
            cgroups,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::from("(systemd not started)");
        let state = loop {
            if let Ok(Some(status)) = c.nspawn.try_wait() {
                panic!("systemd-nspawn exited with {status}:\n{}", c.console());
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not finish booting in 60 s (last `systemctl is-system-running`: {last}):\n{}",
                c.console()
            );
            // nspawn's first child becomes the container's systemd (it execs it).
            let leader = child_of(c.nspawn.id()).filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|n| n.trim() == "systemd")
            });
            let Some(leader) = leader else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            c.leader = leader;
            let out = run(&mut c.exec(&["systemctl", "is-system-running", "--wait"]));
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            // "offline" is what systemctl says before the booting systemd has made
            // /run/systemd/system (sd_booted() is still false), which a fast nsenter can
            // meet; "unknown" while its bus is not up yet. Both mean: not booted yet.
            if !matches!(
                state.as_str(),
                "" | "offline" | "unknown" | "starting" | "initializing"
            ) {
                break state;
            }
            last = state;
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            state,
            "running",
            "systemctl is-system-running:\n{}",
            c.console()
        );
        c
    }

    /// `nsenter -t <init> -a ARGS`: a command inside every namespace of the container.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .args(args);
        cmd
    }

    /// Runs ARGS inside and returns stdout; panics if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        ok(&mut self.exec(args))
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub fn prop(&self, unit: &str, prop: &str) -> String {
        self.ok(&["systemctl", "show", "-p", prop, "--value", unit])
            .trim()
            .to_owned()
    }

    pub fn journal(&self, unit: &str) -> String {
        String::from_utf8_lossy(
            &run(&mut self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])).stdout,
        )
        .into_owned()
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The container's cgroup v2 directory on the host (its cgroup namespace's root).
    pub fn cgroup_root(&self) -> PathBuf {
        self.cgroups[0].join("payload")
    }

    /// A path inside the container, seen from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }
}

/// The first child process of `pid`.
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Removes a cgroup directory and everything under it, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM makes nspawn shut the container down in order (SIGRTMIN+3 to its init).
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.nspawn.try_wait().ok().flatten().is_none() {
            for c in &self.cgroups {
                let _ = std::fs::write(c.join("cgroup.kill"), "1");
            }
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        let _ = Command::new("umount").arg(&self.root).status();
        for c in &self.cgroups {
            remove_tree(c);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
