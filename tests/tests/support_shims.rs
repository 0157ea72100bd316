//! Keeps the transition shim `common` compiling: the old support module of this crate's
//! tests, now thin re-exports of `gateway_testkit`, kept for branches written against it.
//! Delete this file with the shim once those branches are merged.

mod common;

use std::net::SocketAddr;

/// The old entry points keep their signatures (a compile-time check; nothing runs).
#[test]
fn old_support_names_keep_their_signatures() {
    let _: fn() = common::require_root;
    let _: fn(usize) -> (gateway_lab::Lab, common::Recorder) = common::observed_lab;
    let _: fn(&gateway_lab::Lab, &str, SocketAddr, &[&str]) -> Vec<common::Probe> = common::probe;
    let _: fn(&[&str]) -> common::diagnose::Run = common::diagnose::diagnose_here;
}
