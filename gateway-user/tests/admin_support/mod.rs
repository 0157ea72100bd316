//! Transition shim, to be deleted once the branches that were written against it are merged:
//! the old `mod admin_support;` names, re-exported from the test-support library
//! (`gateway_testkit`). New tests import from `gateway_testkit` directly.

#![allow(
    dead_code,
    unused_imports,
    reason = "a shim: each test binary uses a different subset of the old names"
)]

pub use gateway_testkit::{
    admin::{
        SETTLE, admin_get, admin_request, catalogued, endpoint, metrics, sample, status, value,
        wait_for,
    },
    http::BlockingReply as AdminReply,
    lab_gateway::{LAB_ADMIN, LAB_LISTEN, Reply},
    tempdir::TempDir,
};

/// The old `require_root(test_name)`; the library's needs no name.
pub fn require_root(_test: &str) {
    gateway_testkit::root::require_root();
}

/// The old `LabGateway::start(lab, name, extra)`, with the binary cargo built; everything
/// else is the library's [`gateway_testkit::lab_gateway::LabGateway`], through `Deref` (its
/// child is `process`, its output `log()`).
pub struct LabGateway<'a>(gateway_testkit::lab_gateway::LabGateway<'a>);

impl<'a> LabGateway<'a> {
    pub fn start(lab: &'a gateway_lab::Lab, name: &str, extra: &str) -> LabGateway<'a> {
        LabGateway(gateway_testkit::lab_gateway::LabGateway::start(
            gateway_testkit::gateway_bin!(),
            lab,
            name,
            extra,
        ))
    }
}

impl<'a> std::ops::Deref for LabGateway<'a> {
    type Target = gateway_testkit::lab_gateway::LabGateway<'a>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
