//! Transition shim, to be deleted once the branches that were written against it are merged:
//! the old `mod service_support;` names, re-exported from the test-support library
//! (`gateway_testkit`). New tests import from `gateway_testkit` directly.

#![allow(
    dead_code,
    unused_imports,
    reason = "a shim: each test binary uses a different subset of the old names"
)]

use std::{path::Path, process::Command};

pub use gateway_lab::{CgroupGuard, NetnsCommandExt};
pub use gateway_testkit::{
    config::with_ports as config,
    http::get_once,
    ports::free_port,
    process::ChildProcess as Proc,
    root::require_root,
    service::{LoadReport, cap_eff, cgroup_of, delegate, load, with_exact_caps},
    tempdir::TempDir,
    upstream::BlockingUpstream as Upstream,
};

pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gateway")
}

/// The `gateway run` command for `config`, with the environment a service manager gives.
pub fn gateway_run(config: &Path) -> Command {
    gateway_testkit::gateway_bin!().run(config)
}

/// The pid of every process in a cgroup v2 directory.
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}
