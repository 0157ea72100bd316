//! The observer's share of a connecting process's CPU, sampled by `perf`: what `bench observer`
//! holds against the goal of at most 3 %.
//!
//! Comparing the client's CPU time in rounds with and without the observer cannot resolve a
//! few per cent on a small VM: the unobserved cost of one loopback connect moves between about
//! 29 and 60 µs from one run to the next, and by ±10 % between neighbouring rounds. Sampling
//! the client while the observer is attached measures the observer's part inside the same
//! connects instead. `perf record -g` (cpu-clock, which works without hardware counters) runs
//! the client; its samples whose kernel stack passes through one of [`OBSERVER_SYMBOLS`] are
//! the observer's. Those functions are entered from different places in the connect and close
//! paths and never from one another, so their inclusive shares add up.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

/// Where the kernel runs the observer's work in the client's context, and what each is.
/// The hooks include their dispatch and their programs. `bpf_sk_storage_free` is for builds
/// that kept their records in per-socket storage (before the table of records, stop 26: an A/B
/// with `--against` needs it); with today's observer it counts only other programs' storage,
/// as the control does. The last two are the connect-return hooks of kernels before 6.12.
pub const OBSERVER_SYMBOLS: &[(&str, &str)] = &[
    ("__cgroup_bpf_run_filter_sock_addr", "connect4/6 hook"),
    ("__cgroup_bpf_run_filter_sock_ops", "sock_ops hook"),
    ("__cgroup_bpf_run_filter_getsockopt", "getsockopt hook"),
    ("bpf_sk_storage_free", "socket storage freed"),
    ("trace_call_bpf", "sys_exit_connect tracepoint"),
    ("bpf_trace_run2", "raw sys_exit tracepoint"),
];

/// Connects in a sampled round, at least: about 3,000 samples at 30 µs a connect, so that a
/// share of 3 % rests on some 90 of them.
pub const MIN_CONNECTS: usize = 30_000;

/// Sampled rounds per mode; the median one is reported (a single round moved between 3.5 and
/// 6.5 % from run to run).
pub const ROUNDS: usize = 3;

/// The round whose total share is the median of `rounds` (the upper one of an even count).
pub fn median_round(rounds: &[Share]) -> Option<&Share> {
    let mut sorted: Vec<&Share> = rounds.iter().collect();
    sorted.sort_by(|a, b| a.total().total_cmp(&b.total()));
    sorted.get(sorted.len() / 2).copied()
}

/// One sampled round: the share (per cent of the client's samples) of each of
/// [`OBSERVER_SYMBOLS`] that was seen, the number of samples and of connects.
pub struct Share {
    pub parts: Vec<(&'static str, f64)>,
    pub samples: u64,
    pub connects: usize,
}

impl Share {
    pub fn total(&self) -> f64 {
        // A fold from +0.0: `sum()` of no floats is -0.0.
        self.parts.iter().fold(0.0, |t, (_, p)| t + p)
    }

    /// `connect4/6 hook 2.47 %, sock_ops hook 2.31 %, …`, largest first.
    pub fn breakdown(&self) -> String {
        let mut parts = self.parts.clone();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        parts
            .iter()
            .map(|(what, p)| format!("{what} {p:.2} %"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Runs `cycles` connect+close cycles to `addr` in `cgroup` under `perf record`, and reads the
/// observer's share from the samples. `dir` holds the perf data, removed afterwards.
pub fn sampled_round(
    cgroup: &Path,
    addr: SocketAddr,
    cycles: usize,
    dir: &Path,
) -> anyhow::Result<Share> {
    crate::bench::require("perf", "linux-perf")?;
    let data = dir.join(format!("observer-share-{}.data", std::process::id()));
    // perf execs the client, so /proc/self/exe would be perf itself; this process's own link
    // still works after a rebuild has replaced the file (`./dev test` builds xtask as it runs).
    let client = format!("/proc/{}/exe", std::process::id());
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-F", "4999", "-g", "-o"])
        .arg(&data)
        .arg("--")
        .arg(&client)
        .args(["bench-client", &addr.to_string(), &cycles.to_string()]);
    // SAFETY: as in bench_observer's client_round: the child only writes one file. perf, and
    // the client it starts, then run inside the cgroup.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let _removed = Removed(data.clone());
    crate::output(&mut cmd, "perf record of the bench client")?;
    let report = crate::output(
        Command::new("perf")
            .args([
                "report",
                "--children",
                "--sort",
                "sym",
                "-g",
                "none",
                "--stdio",
                "-i",
            ])
            .arg(&data),
        "perf report",
    )?;
    parse_report(&String::from_utf8_lossy(&report.stdout), cycles)
}

struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads `perf report --children --sort sym -g none --stdio`: the sample count from its
/// header (`# Samples: 21K of event 'cpu-clock:pppH'`, or an exact number) and each kernel
/// symbol's inclusive share (`     2.47%     0.18%  [k] __cgroup_bpf_run_filter_sock_addr`), for a
/// round of `connects` connects.
pub fn parse_report(text: &str, connects: usize) -> anyhow::Result<Share> {
    let samples = text
        .lines()
        .find_map(|l| l.strip_prefix("# Samples: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| match n.strip_suffix('K') {
            Some(k) => k.parse::<u64>().ok().map(|k| k * 1000),
            None => n.parse().ok(),
        })
        .context("perf report printed no sample count")?;
    let mut parts = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [children, _self, "[k]", symbol] = fields[..] else {
            continue;
        };
        let Some((_, what)) = OBSERVER_SYMBOLS.iter().find(|(s, _)| *s == symbol) else {
            continue;
        };
        let share: f64 = children
            .strip_suffix('%')
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("perf report line {line:?}"))?;
        parts.push((*what, share));
    }
    Ok(Share {
        parts,
        samples,
        connects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An excerpt of a real report (this VM, observer attached, 2026-12-02).
    const REPORT: &str = "\
# To display the perf.data header info, please use --header/--header-only options.
#
#
# Total Lost Samples: 0
#
# Samples: 21K of event 'cpu-clock:pppH'
# Event count (approx.): 4336200000
#
# Children      Self  Symbol
# ........  ........  ..........................................
#
    96.60%     0.00%  [k] entry_SYSCALL_64_after_hwframe
    49.28%     0.01%  [k] __sys_connect
     2.47%     0.18%  [k] __cgroup_bpf_run_filter_sock_addr
     2.31%     0.54%  [k] __cgroup_bpf_run_filter_sock_ops
     2.30%     0.18%  [k] bpf_prog_827f688183d4d20e_gw_connect4
     2.11%     0.53%  [k] bpf_sk_storage_get
     0.89%     0.02%  [k] bpf_sk_storage_free
     0.20%     0.20%  [.] xtask::bench_observer::client
";

    #[test]
    fn sums_the_observer_entry_points_and_nothing_they_call() {
        let share = parse_report(REPORT, 30_000).unwrap();
        assert_eq!(share.samples, 21_000);
        assert_eq!(
            share.parts,
            vec![
                ("connect4/6 hook", 2.47),
                ("sock_ops hook", 2.31),
                ("socket storage freed", 0.89)
            ]
        );
        assert!((share.total() - 5.67).abs() < 1e-9, "{}", share.total());
        assert_eq!(
            share.breakdown(),
            "connect4/6 hook 2.47 %, sock_ops hook 2.31 %, socket storage freed 0.89 %"
        );
    }

    #[test]
    fn no_part_seen_is_zero_not_minus_zero() {
        let share = parse_report("# Samples: 1234 of event 'cpu-clock'\n", 30_000).unwrap();
        assert_eq!((share.samples, share.parts.len()), (1234, 0));
        assert_eq!(format!("{:.2}", share.total()), "0.00");
    }

    #[test]
    fn the_median_round_is_the_middle_total() {
        let round = |p: f64| Share {
            parts: vec![("sock_ops hook", p)],
            samples: 1000,
            connects: 30_000,
        };
        let rounds = [round(6.5), round(3.6), round(4.2)];
        assert_eq!(median_round(&rounds).unwrap().total(), 4.2);
        assert!(median_round(&[]).is_none());
    }

    #[test]
    fn a_report_without_samples_is_an_error() {
        assert!(parse_report("# Children  Self  Symbol\n", 30_000).is_err());
    }
}
