//! Builds that `./dev test` runs beside the end-to-end tests instead of before them: the
//! profile-guided package (two release builds of the whole dependency tree and the training
//! between them, about 11 minutes on two cores from cold) and the fuzz targets' build.
//!
//! The end-to-end tests run one at a time and leave part of the two CPUs idle (timeouts,
//! faults, soak traffic at a fixed rate). A background build runs under `SCHED_IDLE`
//! (sched(7)): the kernel gives it a CPU only when nothing else wants one, and a test process
//! that wakes up preempts it at once. Measured from cold on two cores: the suite took 25 to 27
//! minutes instead of 34.5, and the end-to-end tests took no longer (640 s against 671 s).
//!
//! A build's output goes to a log under `target/`, printed when it fails. A build still
//! running when the suite ends early is killed with its process group.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// A build running in the background.
pub struct Background {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    started: Instant,
}

/// Starts `cmd` under `SCHED_IDLE`, in a process group of its own, with its output in
/// `target/suite-NAME.log`.
pub fn spawn(name: &'static str, mut cmd: Command) -> anyhow::Result<Background> {
    let log = crate::workspace_root()
        .join("target")
        .join(format!("suite-{name}.log"));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    // SAFETY: sched_setscheduler is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    eprintln!(
        "\x1b[1m==> in the background (SCHED_IDLE, log {}): {cmd:?}\x1b[0m",
        log.display()
    );
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning the {name} build"))?;
    Ok(Background {
        name,
        child: Some(child),
        log,
        started: Instant::now(),
    })
}

impl Background {
    /// Waits for the build to end; its log when it succeeded, an error with the log's end
    /// when it failed.
    pub fn wait(mut self) -> anyhow::Result<String> {
        let mut child = self.child.take().context("waited twice")?;
        eprintln!("\x1b[1m==> waiting for the {} build\x1b[0m", self.name);
        let status = child.wait()?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if !status.success() {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            bail!(
                "the {} build failed with {status} (whole log: {}):\n{tail}",
                self.name,
                self.log.display()
            );
        }
        eprintln!(
            "\x1b[1m==> the {} build finished {:.0} s after it started (log {})\x1b[0m",
            self.name,
            self.started.elapsed().as_secs_f64(),
            self.log.display()
        );
        Ok(log)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let Ok(pid) = i32::try_from(child.id()) else {
                return;
            };
            // SAFETY: kill has no memory preconditions; -pid names the build's process group.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}
