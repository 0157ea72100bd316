//! Transition shim, to be deleted once the branches that were written against it are merged:
//! the old `mod scenario_support;` names, re-exported from the test-support library
//! (`gateway_testkit`). New tests import from `gateway_testkit` directly.

#![allow(
    dead_code,
    unused_imports,
    reason = "a shim: each test binary uses a different subset of the old names"
)]

use std::time::Duration;

pub use gateway_testkit::{
    root::require_root,
    scenario::{ADMIN, CLIENT_TIMEOUT, Change, PORT, Sample, failures, quantile, secs},
};

/// The old `Scenario::start(name, behaviour, max_idle, response_timeout_ms, extra)`, with the
/// binary cargo built; everything else is the library's
/// [`gateway_testkit::scenario::Scenario`], through `Deref` (its `gateway` is a
/// `GatewayProcess` now, its log read with `log_lines`).
pub struct Scenario(gateway_testkit::scenario::Scenario);

impl Scenario {
    pub fn start(
        name: &str,
        behaviour: gateway_lab::HttpBehaviour,
        max_idle: usize,
        response_timeout_ms: u64,
        extra: &str,
    ) -> Scenario {
        Scenario(gateway_testkit::scenario::Scenario::start(
            gateway_testkit::gateway_bin!(),
            name,
            behaviour,
            max_idle,
            response_timeout_ms,
            extra,
        ))
    }

    /// Waits until a log line contains `needle`; panics otherwise.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.0.gateway.expect_log(needle, timeout);
    }
}

impl std::ops::Deref for Scenario {
    type Target = gateway_testkit::scenario::Scenario;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
