//! Running the lab's helper programs (`ip`, `iptables-legacy`, `ip6tables-legacy`) and turning a
//! failure into a [`LabError`] that shows the exact command line and its stderr.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use super::error::{LabError, LabResult};

/// How long `iptables-legacy -w` waits for the global xtables lock, in seconds. Parallel labs in
/// one process (or several test binaries) share that lock, so a rule change may have to queue.
const XTABLES_LOCK_WAIT_SECS: &str = "5";

/// The command line as a user would type it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        out.push(' ');
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            out.push('\'');
            out.push_str(&arg);
            out.push('\'');
        } else {
            out.push_str(&arg);
        }
    }
    out
}

/// Runs `cmd` to completion, optionally feeding `stdin`, and returns its stdout.
pub(crate) fn run(cmd: &mut Command, stdin: Option<&str>) -> LabResult<String> {
    let command = match stdin {
        Some(input) => format!(
            "{} <<<'{}'",
            describe(cmd),
            input.trim_end().replace('\n', "; ")
        ),
        None => describe(cmd),
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (EPIPE) means the program exited early; its status and stderr say why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `ip ARGS…` in the root namespace (only used for `ip netns add/del/list`).
pub(crate) fn ip(args: &[&str]) -> LabResult<String> {
    run(Command::new("ip").args(args), None)
}

/// `ip -n NETNS -batch -` with one `ip` command per line, so setting up a namespace costs one
/// process instead of one per address. With `force`, later lines still run after a failure.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &[String], force: bool) -> LabResult<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"]);
    let mut input = lines.join("\n");
    input.push('\n');
    run(&mut cmd, Some(&input))
}

/// Which iptables binary: the lab always uses the legacy (xtables) backend, because this kernel
/// has no nft `queue` expression and the legacy tables are per network namespace too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables-legacy",
            Family::V6 => "ip6tables-legacy",
        }
    }
}

/// `ip netns exec NETNS {ip,ip6}tables-legacy -w 5 ARGS…`.
pub(crate) fn iptables(netns: &str, family: Family, args: &[String]) -> LabResult<String> {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        family.iptables(),
        "-w",
        XTABLES_LOCK_WAIT_SECS,
    ]);
    cmd.args(args);
    run(&mut cmd, None)
}
