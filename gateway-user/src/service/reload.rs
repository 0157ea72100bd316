//! `gateway reload --config FILE --pid PID`, systemd's `ExecReload=`: validates the config,
//! then sends SIGHUP to the gateway at PID.

use std::{
    ffi::OsString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

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
    match running_config(pid) {
        Some(theirs) if !same_file(&theirs, path) => bail!(
            "pid {pid} runs with {}, which a SIGHUP makes it read again, not {}: not signalled \
             (check and reload with --config {})",
            theirs.display(),
            path.display(),
            theirs.display()
        ),
        Some(_) => {}
        None => eprintln!(
            "warning: cannot tell which config pid {pid} runs with (/proc/{pid}/cmdline and cwd); \
             it reads its own again, which may not be {}",
            path.display()
        ),
    }
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

/// The config the gateway at `pid` runs with (its `run --config`), as an absolute path, when
/// `/proc` tells: a SIGHUP makes it read that file again, whichever `gateway reload` checked.
fn running_config(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let path = PathBuf::from(config_arg(&cmdline)?);
    if path.is_absolute() {
        return Some(path);
    }
    Some(
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()?
            .join(path),
    )
}

/// `--config X`, `--config=X`, `-c X` or `-cX` in a NUL-separated command line.
fn config_arg(cmdline: &[u8]) -> Option<OsString> {
    let mut args = cmdline.split(|b| *b == 0);
    let mut found = None;
    while let Some(a) = args.next() {
        let value = match a {
            b"--config" | b"-c" => args.next(),
            _ => a
                .strip_prefix(b"--config=")
                .or_else(|| a.strip_prefix(b"-c").filter(|v| !v.is_empty())),
        };
        if let Some(v) = value {
            found = Some(std::ffi::OsStr::from_bytes(v).to_owned());
        }
    }
    found
}

/// Both name one file (through links, or written differently).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_a_gateway_runs_with_is_read_off_its_command_line() {
        for (line, want) in [
            (
                &b"gateway\0run\0--config\0/etc/gateway/gateway.toml\0"[..],
                Some("/etc/gateway/gateway.toml"),
            ),
            (b"gateway\0run\0--config=gw.toml\0", Some("gw.toml")),
            (b"gateway\0run\0-c\0a.toml\0", Some("a.toml")),
            (b"gateway\0run\0-ca.toml\0", Some("a.toml")),
            (b"gateway\0run\0", None),
        ] {
            assert_eq!(
                config_arg(line),
                want.map(OsString::from),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

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
