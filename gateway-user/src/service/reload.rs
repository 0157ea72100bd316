//! `gateway reload --config FILE --pid PID`, systemd's `ExecReload=`: validates the config,
//! then sends SIGHUP to the gateway at PID.

use std::{path::Path, process::ExitCode};

use anyhow::{Context as _, bail};

use crate::config;

/// Validates the config, then sends SIGHUP to `pid`. Exits non-zero, sending nothing, when
/// the config is refused or `pid` is not a gateway.
pub fn cli_reload(path: &Path, pid: u32) -> anyhow::Result<ExitCode> {
    let loaded = config::load(path)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let target = gateway_pid(pid)?;
    // SAFETY: kill(2) with a positive pid (one process, never a group) and a signal.
    if unsafe { libc::kill(target, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sending SIGHUP to gateway pid {pid}"));
    }
    println!("{}: ok; sent SIGHUP to pid {pid}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `pid` as kill(2) takes it, when it is a process running this program. A SIGHUP ends most
/// other programs, and init (systemd) reloads its own configuration on one; to kill(2), 0 is
/// the caller's whole process group (a shell and all it runs). In a container the gateway is
/// pid 1 itself (`--pid 1` through `kubectl exec`): the name tells it from an init.
fn gateway_pid(pid: u32) -> anyhow::Result<libc::pid_t> {
    let target = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("--pid {pid} is not a gateway's process id"))?;
    let name = |p: &str| {
        std::fs::read_to_string(format!("/proc/{p}/comm")).map(|c| c.trim_end().to_owned())
    };
    let theirs = name(&pid.to_string()).with_context(|| format!("no process {pid}"))?;
    let ours = name("self").context("reading /proc/self/comm")?;
    if theirs != ours {
        bail!("process {pid} is {theirs:?}, not {ours:?}: not signalled");
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_process_running_this_program_is_signalled() {
        for pid in [0, u32::MAX] {
            let e = gateway_pid(pid).unwrap_err().to_string();
            assert!(e.contains("not a gateway's process id"), "{pid}: {e}");
        }
        // The test harness's own process runs this program; its parent (cargo, a shell) does not.
        assert_eq!(
            gateway_pid(std::process::id()).unwrap() as u32,
            std::process::id()
        );
        let parent = std::os::unix::process::parent_id();
        let e = gateway_pid(parent).unwrap_err().to_string();
        assert!(e.contains("not signalled"), "{e}");
    }
}
