//! Transition shim, to be deleted once the branches that were written against it are merged:
//! the old `mod common;` names, re-exported from the test-support library (`gateway_testkit`,
//! this crate's own). New tests import from `gateway_testkit` directly.

#![allow(
    dead_code,
    unused_imports,
    reason = "a shim: each test binary uses a different subset of the old names"
)]

use std::net::SocketAddr;

use gateway_lab::Lab;
pub use gateway_testkit::{
    observer::{Probe, Recorder, observed_lab, observed_lab_with},
    root::require_root,
};

/// Runs `connect-probe` in the lab's client namespace and cgroup; one line per attempt.
pub fn probe(lab: &Lab, style: &str, addr: SocketAddr, extra: &[&str]) -> Vec<Probe> {
    gateway_testkit::connect_probe!().run_in(lab, style, addr, extra)
}

/// Starts `connect-probe` in the lab's client namespace and cgroup without waiting.
pub fn spawn_probe(
    lab: &Lab,
    style: &str,
    addr: SocketAddr,
    extra: &[&str],
) -> std::process::Child {
    gateway_testkit::connect_probe!().spawn_in(lab, style, addr, extra)
}

/// The old `common::diagnose`, whose runs found the gateway binary themselves.
pub mod diagnose {
    use std::path::PathBuf;

    use gateway_lab::Lab;
    pub use gateway_testkit::diagnose::{
        Run, SlowAcceptor, SlowDns, assert_kernel_joined, assert_no_cgroup_left, assert_verdict,
        attempts, check_report, run,
    };

    pub fn gateway_bin() -> PathBuf {
        gateway_testkit::gateway_bin!().path().to_owned()
    }

    pub fn diagnose_in(lab: &Lab, args: &[&str]) -> Run {
        gateway_testkit::diagnose::diagnose_in(gateway_testkit::gateway_bin!(), lab, args)
    }

    pub fn diagnose_here(args: &[&str]) -> Run {
        gateway_testkit::diagnose::diagnose_here(gateway_testkit::gateway_bin!(), args)
    }

    pub fn diagnose_with_resolver(lab: &Lab, nameserver: std::net::IpAddr, args: &[&str]) -> Run {
        gateway_testkit::diagnose::diagnose_with_resolver(
            gateway_testkit::gateway_bin!(),
            lab,
            nameserver,
            args,
        )
    }
}
