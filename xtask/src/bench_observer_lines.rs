//! `cargo xtask bench observer-lines [CONNECTS] [--gateway-bin PATH] [--top N]`: where inside the
//! observer's eBPF programs a connecting process's CPU goes, source line by source line.
//!
//! `bench observer` says how much of the client's CPU the hooks take; this says where inside
//! them. The observer attaches to a fresh cgroup, and `perf record` (cpu-clock at 4,999 Hz, no
//! call graphs: the sampled instruction is what counts) runs the same loopback connect+close
//! client in it. Each sample inside a program is mapped to the BPF instruction whose JIT code
//! holds it, and that instruction to its Rust source line: the kernel keeps both tables for a
//! program loaded with BTF (`jited_line_info` and `line_info`, read with
//! `BPF_OBJ_GET_INFO_BY_FD`), and `bpftool prog dump xlated` prints the source lines by
//! instruction. Samples land just after an instruction that stalls (a cache miss, a call's
//! return), so a line's count includes the stall of the one before it.
//!
//! It also prints the self time of the kernel functions around the programs: the hook dispatch
//! (`__cgroup_bpf_run_filter_*`) and the helpers the programs call ([`AROUND`]). Stop 37 found the memset calls with this (docs/kernel.md, "Memsets written as
//! stores").

use std::{
    collections::BTreeMap, os::unix::process::CommandExt as _, path::Path, process::Command,
};

use anyhow::{Context as _, bail};

use crate::{bench, bench_observer};

const DEFAULT_CONNECTS: usize = 60_000;
const DEFAULT_TOP: usize = 15;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let usage = "usage: cargo xtask bench observer-lines [CONNECTS] [--gateway-bin PATH] [--top N]";
    let (mut connects, mut top) = (DEFAULT_CONNECTS, DEFAULT_TOP);
    let mut gateway_bin: Option<std::path::PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--gateway-bin" => gateway_bin = Some(it.next().context(usage)?.into()),
            "--top" => top = it.next().context(usage)?.parse().context(usage)?,
            n => connects = n.parse().context(usage)?,
        }
    }
    bench::require("perf", "linux-perf")?;
    bench::require("bpftool", "bpftool")?;
    let bin = crate::release_gateway(gateway_bin.as_deref())?;
    let cgroup = bench_observer::Cgroup::create()?;
    let addr = bench_observer::accept_and_close_server()?;
    let obs = bench_observer::Observer::start_settled(&bin, &cgroup.0, &["--json"])?;
    // Read while the observer holds the programs: they are unloaded when it exits. (An error
    // returned here stops the observer as it is dropped.)
    let programs = held_program_ids(obs.pid())?
        .into_iter()
        .map(Program::read)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let samples = sample_client(&cgroup.0, addr, connects)?;
    obs.stop()?;
    report(&programs, &samples, connects, top)
}

/// One loaded program: its JIT code's address ranges (one per subprogram), the start address of
/// each source line's code with its instruction, and the source line of each instruction.
struct Program {
    name: String,
    ranges: Vec<(u64, u64)>,
    lines: Vec<(u64, u32)>,
    source: BTreeMap<u32, String>,
}

impl Program {
    fn read(id: u32) -> anyhow::Result<Program> {
        let info = prog_info(id)?;
        let dump = crate::output(
            Command::new("bpftool").args(["prog", "dump", "xlated", "id", &id.to_string()]),
            "bpftool prog dump xlated",
        )?;
        Ok(Program {
            name: info.name,
            ranges: info.ranges,
            lines: info.lines,
            source: source_by_insn(&String::from_utf8_lossy(&dump.stdout)),
        })
    }

    fn contains(&self, ip: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(a, len)| (a..a + len).contains(&ip))
    }

    /// The source line whose JIT code holds `ip`.
    fn line_of(&self, ip: u64) -> (u32, &str) {
        let start = self
            .ranges
            .iter()
            .find(|&&(a, len)| (a..a + len).contains(&ip))
            .map_or(0, |r| r.0);
        let i = self.lines.partition_point(|&(a, _)| a <= ip);
        match i.checked_sub(1).map(|i| self.lines[i]) {
            Some((a, insn)) if a >= start => {
                let text = self
                    .source
                    .range(..=insn)
                    .next_back()
                    .map_or("?", |(_, s)| s.as_str());
                (insn, text)
            }
            _ => (0, "(prologue)"),
        }
    }
}

/// `bpftool prog dump xlated` output: each instruction (`  123: (85) call …`) under the last
/// source line printed before it (`; let x = …`).
fn source_by_insn(dump: &str) -> BTreeMap<u32, String> {
    let mut map = BTreeMap::new();
    let mut current = String::new();
    for line in dump.lines() {
        if let Some(src) = line.strip_prefix("; ") {
            current = src.trim().to_owned();
        } else if let Some((n, _)) = line.trim_start().split_once(':')
            && let Ok(n) = n.parse::<u32>()
        {
            map.entry(n).or_insert_with(|| current.clone());
        }
    }
    map
}

/// The BPF programs `pid` holds open (`prog_id:` in /proc/PID/fdinfo).
fn held_program_ids(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse::<u32>().ok()),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        bail!("gateway observe (pid {pid}) holds no BPF programs");
    }
    Ok(ids)
}

/// What `prog_info` reads from `struct bpf_prog_info` (include/uapi/linux/bpf.h).
struct Info {
    name: String,
    ranges: Vec<(u64, u64)>,
    lines: Vec<(u64, u32)>,
}

/// Offsets in `struct bpf_prog_info`.
const NAME: usize = 64;
const NR_JITED_KSYMS: usize = 104;
const NR_JITED_FUNC_LENS: usize = 108;
const JITED_KSYMS: usize = 112;
const JITED_FUNC_LENS: usize = 120;
const NR_LINE_INFO: usize = 148;
const LINE_INFO: usize = 152;
const JITED_LINE_INFO: usize = 160;
const NR_JITED_LINE_INFO: usize = 168;
const LINE_INFO_REC_SIZE: usize = 172;
const JITED_LINE_INFO_REC_SIZE: usize = 176;
/// Larger than the kernel's struct (232 bytes in 6.18): the kernel accepts a longer buffer
/// whose tail is zero.
const INFO_LEN: usize = 256;
/// `struct bpf_line_info`: insn_off, file_name_off, line_off, line_col.
const LINE_INFO_SIZE: usize = 16;

fn prog_info(id: u32) -> anyhow::Result<Info> {
    const BPF_PROG_GET_FD_BY_ID: i64 = 13;
    const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| format!("program {id}"))?;
    let fd = Fd(fd as i32);
    let get = |info: &mut [u8; INFO_LEN]| -> anyhow::Result<()> {
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(fd.0 as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(INFO_LEN as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
    };
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    let mut info = [0u8; INFO_LEN];
    get(&mut info).with_context(|| format!("the info of program {id}"))?;
    let nr_ksyms = u32_at(&info, NR_JITED_KSYMS) as usize;
    let nr_lines = u32_at(&info, NR_LINE_INFO) as usize;
    if u32_at(&info, NR_JITED_LINE_INFO) as usize != nr_lines || nr_lines == 0 {
        bail!("program {id} has no line info (loaded without BTF?)");
    }
    let name_bytes = &info[NAME..NAME + 16];
    let name = String::from_utf8_lossy(
        &name_bytes[..name_bytes.iter().position(|&b| b == 0).unwrap_or(16)],
    )
    .into_owned();
    let mut ksyms = vec![0u64; nr_ksyms];
    let mut lens = vec![0u32; nr_ksyms];
    let mut line_info = vec![0u8; nr_lines * LINE_INFO_SIZE];
    let mut jited_lines = vec![0u64; nr_lines];
    let mut req = [0u8; INFO_LEN];
    let mut put = |o: usize, v: &[u8]| req[o..o + v.len()].copy_from_slice(v);
    put(NR_JITED_KSYMS, &(nr_ksyms as u32).to_ne_bytes());
    put(NR_JITED_FUNC_LENS, &(nr_ksyms as u32).to_ne_bytes());
    put(JITED_KSYMS, &(ksyms.as_mut_ptr() as u64).to_ne_bytes());
    put(JITED_FUNC_LENS, &(lens.as_mut_ptr() as u64).to_ne_bytes());
    put(NR_LINE_INFO, &(nr_lines as u32).to_ne_bytes());
    put(LINE_INFO, &(line_info.as_mut_ptr() as u64).to_ne_bytes());
    put(LINE_INFO_REC_SIZE, &(LINE_INFO_SIZE as u32).to_ne_bytes());
    put(
        JITED_LINE_INFO,
        &(jited_lines.as_mut_ptr() as u64).to_ne_bytes(),
    );
    put(NR_JITED_LINE_INFO, &(nr_lines as u32).to_ne_bytes());
    put(JITED_LINE_INFO_REC_SIZE, &8u32.to_ne_bytes());
    get(&mut req).with_context(|| format!("the line info of program {id}"))?;
    if ksyms.first().is_none_or(|&a| a == 0) {
        // The kernel leaves the addresses at 0 when it will not show kernel pointers
        // (`bpf_dump_raw_ok()`: kernel.kptr_restrict, or no CAP_SYSLOG).
        bail!(
            "the kernel gave no JIT addresses for program {id} (kernel.kptr_restrict, or run as root)"
        );
    }
    let mut lines: Vec<(u64, u32)> = jited_lines
        .iter()
        .enumerate()
        .map(|(i, &addr)| (addr, u32_at(&line_info, i * LINE_INFO_SIZE)))
        .collect();
    lines.sort_unstable();
    Ok(Info {
        name,
        ranges: ksyms
            .into_iter()
            .zip(lens)
            .map(|(a, l)| (a, u64::from(l)))
            .collect(),
        lines,
    })
}

/// `bpf(2)` with a zero-padded `union bpf_attr`.
fn bpf(cmd: i64, attr: &mut [u8; 128]) -> anyhow::Result<i64> {
    // SAFETY: attr is a valid, writable bpf_attr-sized buffer, and every pointer inside it
    // points to a live buffer of the length given beside it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf(2)");
    }
    Ok(rc)
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closes a descriptor this process opened and owns.
        unsafe { libc::close(self.0) };
    }
}

/// Runs `connects` connect+close cycles in `cgroup` under `perf record`; every sample's
/// instruction pointer and kernel symbol.
fn sample_client(
    cgroup: &Path,
    addr: std::net::SocketAddr,
    connects: usize,
) -> anyhow::Result<Vec<(u64, String)>> {
    let data =
        std::env::temp_dir().join(format!("gateway-bench-lines-{}.data", std::process::id()));
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-e", "cpu-clock", "-F", "4999", "-o"])
        .arg(&data)
        .arg("--")
        .arg(format!("/proc/{}/exe", std::process::id()))
        .args(["bench-client", &addr.to_string(), &connects.to_string()]);
    // SAFETY: as in bench_observer's client_round: the child only writes one file.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let recorded = crate::output(&mut cmd, "perf record of the bench client");
    let script = recorded.and_then(|_| {
        crate::output(
            Command::new("perf")
                .args(["script", "-F", "ip,sym", "-i"])
                .arg(&data),
            "perf script",
        )
    });
    let _ = std::fs::remove_file(&data);
    Ok(String::from_utf8_lossy(&script?.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ip = u64::from_str_radix(f.next()?, 16).ok()?;
            Some((ip, f.next().unwrap_or("[unknown]").to_owned()))
        })
        .collect())
}

/// The kernel functions around the programs: the hook dispatch, and the helpers these
/// programs call (other programs on the host may call some of them too; the control rounds of
/// `bench observer` say how much).
const AROUND: &[&str] = &[
    "__cgroup_bpf_run_filter",
    "bpf_get_socket_cookie",
    "bpf_ktime_get",
    "bpf_get_current_",
    "bpf_sock_addr_setsockopt",
    "__bpf_setsockopt",
    "bpf_sock_ops_",
    "bpf_ringbuf_",
    "__bpf_ringbuf_",
    "__htab_map_",
    "htab_lru_",
    "bpf_probe_read_kernel",
    "bpf_skc_to_",
];

fn report(
    programs: &[Program],
    samples: &[(u64, String)],
    connects: usize,
    top: usize,
) -> anyhow::Result<()> {
    let total = samples.len().max(1) as f64;
    let pct = |n: usize| n as f64 * 100.0 / total;
    let mut by_line: Vec<BTreeMap<(u32, &str), usize>> = vec![BTreeMap::new(); programs.len()];
    let mut around: BTreeMap<&str, usize> = BTreeMap::new();
    for (ip, sym) in samples {
        if let Some(i) = programs.iter().position(|p| p.contains(*ip)) {
            *by_line[i].entry(programs[i].line_of(*ip)).or_default() += 1;
        } else if AROUND.iter().any(|p| sym.starts_with(p)) {
            *around.entry(sym.as_str()).or_default() += 1;
        }
    }
    let in_programs: usize = by_line.iter().flat_map(|m| m.values()).sum();
    if in_programs == 0 {
        // About 1 % of the client's samples fall inside the programs: none means the address
        // tables and perf's samples do not match, not a free observer.
        bail!(
            "none of {} samples fell inside the observer's programs ({})",
            samples.len(),
            programs
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "bench observer-lines: {connects} loopback connects under perf (cpu-clock, 4999 Hz): {} samples of the client; {} ({:.2} %) inside the observer's programs",
        samples.len(),
        in_programs,
        pct(in_programs)
    );
    for (program, lines) in programs.iter().zip(&by_line) {
        let n: usize = lines.values().sum();
        if n == 0 {
            continue;
        }
        println!(
            "\n  {}: {n} samples, {:.2} % of the client",
            program.name,
            pct(n)
        );
        let mut sorted: Vec<_> = lines.iter().collect();
        sorted.sort_by_key(|&(_, n)| std::cmp::Reverse(*n));
        for ((insn, text), n) in sorted.into_iter().take(top) {
            println!("    {:5.2} %  insn {insn:5}  {text}", pct(*n));
        }
    }
    let mut sorted: Vec<_> = around.into_iter().collect();
    sorted.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    println!("\n  kernel functions around them, by their own samples:");
    for (sym, n) in sorted.into_iter().take(top) {
        println!("    {:5.2} %  {sym}", pct(n));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An excerpt of `bpftool prog dump xlated` of gw_sock_ops (this VM, 2026-12-04).
    const DUMP: &str = "\
u32 gw_sock_ops(struct bpf_sock_ops * ctx):
; unsafe { (*self.ops).op }
   0: (71) r9 = *(u8 *)(r1 +48)
; if op == BPF_SOCK_OPS_STATE_CB {
   1: (15) if r9 == 0xa goto pc+39
   2: (bf) r3 = r9
; fun(ctx)
  52: (85) call bpf_get_socket_cookie_sock_ops#10510944
";

    #[test]
    fn each_instruction_takes_the_source_line_printed_before_it() {
        let source = source_by_insn(DUMP);
        assert_eq!(source[&0], "unsafe { (*self.ops).op }");
        assert_eq!(source[&2], "if op == BPF_SOCK_OPS_STATE_CB {");
        assert_eq!(source[&52], "fun(ctx)");
        assert_eq!(source.len(), 4);
    }

    #[test]
    fn a_sample_is_the_line_whose_code_starts_at_or_before_it_in_its_own_subprogram() {
        let program = Program {
            name: "gw_sock_ops".into(),
            // The main program at 0x1000 and a subprogram at 0x500, as the JIT places them.
            ranges: vec![(0x1000, 0x100), (0x500, 0x40)],
            lines: vec![(0x500, 90), (0x1000, 0), (0x1010, 1), (0x1080, 52)],
            source: source_by_insn(DUMP),
        };
        assert!(program.contains(0x10ff) && program.contains(0x53f));
        assert!(!program.contains(0x1100) && !program.contains(0x540));
        assert_eq!(program.line_of(0x100f), (0, "unsafe { (*self.ops).op }"));
        assert_eq!(
            program.line_of(0x1010),
            (1, "if op == BPF_SOCK_OPS_STATE_CB {")
        );
        assert_eq!(program.line_of(0x10a0), (52, "fun(ctx)"));
        // Insn 90 is past the dump's last line: it takes the last one before it.
        assert_eq!(program.line_of(0x520), (90, "fun(ctx)"));
    }
}
