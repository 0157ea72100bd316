//! Loading and attaching the programs, and taking the maps, with errors that say what is
//! missing and what to do.

use std::fs::File;

use aya::{
    Ebpf,
    maps::MapError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, RawTracePoint, SockOps,
        TracePoint,
    },
};
use gateway_common::names;

use super::{ConnectExitHook, ObserverError, preflight};

const VERIFIER_TAIL_LINES: usize = 25;

pub(super) fn program_error(
    action: &'static str,
    program: &'static str,
    err: ProgramError,
) -> ObserverError {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(VERIFIER_TAIL_LINES)..].join("\n");
            ObserverError::Verifier {
                program,
                io_error,
                lines: VERIFIER_TAIL_LINES.min(lines.len()),
                tail,
            }
        }
        source => {
            let hint = match &source {
                ProgramError::SyscallError(e)
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    "; another program is already attached there in exclusive mode (bpftool cgroup show <path>)"
                }
                _ => "",
            };
            ObserverError::Program {
                action,
                program,
                source: Box::new(source),
                hint,
            }
        }
    }
}

pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ObserverError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(ObserverError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| ObserverError::Map { name, source })
}

/// Loads sock_ops, getsockopt and connect4/6, and attaches them to the cgroup.
pub(super) fn attach_cgroup_programs(
    ebpf: &mut Ebpf,
    cgroup_fd: &File,
) -> Result<(), ObserverError> {
    {
        let name = names::PROG_SOCK_OPS;
        let prog: &mut SockOps = program(ebpf, name)?;
        prog.load().map_err(|e| program_error("loading", name, e))?;
        prog.attach(cgroup_fd, CgroupAttachMode::Single)
            .map_err(|e| program_error("attaching", name, e))?;
    }
    {
        let name = names::PROG_GETSOCKOPT;
        let prog: &mut CgroupSockopt = program(ebpf, name)?;
        prog.load().map_err(|e| program_error("loading", name, e))?;
        prog.attach(cgroup_fd, CgroupAttachMode::Single)
            .map_err(|e| program_error("attaching", name, e))?;
    }
    for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load().map_err(|e| program_error("loading", name, e))?;
        prog.attach(cgroup_fd, CgroupAttachMode::Single)
            .map_err(|e| program_error("attaching", name, e))?;
    }
    Ok(())
}

/// Attaches the connect-return hook: the classic tracepoint when tracefs is usable, else (or
/// when `Raw` is asked for) the raw one. Returns which, for the start-up log.
pub(super) fn attach_connect_exit(
    ebpf: &mut Ebpf,
    hook: ConnectExitHook,
) -> Result<&'static str, ObserverError> {
    if hook != ConnectExitHook::Raw {
        // tracefs is root-only (mode 0700 here); mounting it needs CAP_SYS_ADMIN.
        let classic = preflight::ensure_tracefs()
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let name = names::PROG_SYS_EXIT_CONNECT;
                let prog: &mut TracePoint = program(ebpf, name).map_err(|e| e.to_string())?;
                prog.load()
                    .map_err(|e| program_error("loading", name, e).to_string())?;
                prog.attach("syscalls", "sys_exit_connect")
                    .map_err(|e| program_error("attaching", name, e).to_string())
            });
        match classic {
            Ok(_) => return Ok("tracepoint syscalls:sys_exit_connect"),
            Err(why) => tracing::debug!(
                reason = %why,
                "classic tracepoint unavailable; watching connect() returns with the raw sys_exit tracepoint"
            ),
        }
    }
    let name = names::PROG_RAW_SYS_EXIT;
    let prog: &mut RawTracePoint = program(ebpf, name)?;
    prog.load().map_err(|e| program_error("loading", name, e))?;
    prog.attach("sys_exit")
        .map_err(|e| program_error("attaching", name, e))?;
    Ok("raw tracepoint sys_exit")
}

/// Attaches the raw tracepoint that sees RSTs (`tcp_receive_reset`, Linux 4.16 and later),
/// which tells a connect refused by an RST from one refused by an ICMP port unreachable:
/// whether it is attached. Optional: without it, a warning, and refusals read as an RST's.
pub(super) fn attach_reset_hook(ebpf: &mut Ebpf) -> bool {
    match reset_hook(ebpf) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "the tcp_receive_reset tracepoint is not attached: a connect refused by an ICMP port unreachable (a firewall's REJECT) reads as one refused by an RST"
            );
            false
        }
    }
}

fn reset_hook(ebpf: &mut Ebpf) -> Result<(), ObserverError> {
    let name = names::PROG_TCP_RECEIVE_RESET;
    let prog: &mut RawTracePoint = program(ebpf, name)?;
    prog.load().map_err(|e| program_error("loading", name, e))?;
    prog.attach("tcp_receive_reset")
        .map_err(|e| program_error("attaching", name, e))?;
    Ok(())
}

pub(super) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, ObserverError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let prog = ebpf.program_mut(name).ok_or(ObserverError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(|_| ObserverError::Missing {
        kind: "program of the expected type",
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_rejection_shows_the_tail_of_the_log() {
        let log: String = (1..=100).map(|i| format!("{i}: insn {i}\n")).collect();
        let err = program_error(
            "loading",
            names::PROG_SOCK_OPS,
            ProgramError::LoadError {
                io_error: std::io::Error::from_raw_os_error(libc::EACCES),
                verifier_log: aya_obj::VerifierLog::new(log),
            },
        );
        let text = err.to_string();
        assert!(
            text.starts_with("the kernel verifier rejected gw_sock_ops"),
            "{text}"
        );
        assert!(
            text.contains("last 25 lines")
                && text.contains("100: insn 100")
                && text.contains("76: insn 76"),
            "{text}"
        );
        assert!(!text.contains("\n75: insn 75"), "only the tail: {text}");
    }
}
