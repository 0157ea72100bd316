//! Transition shim, to be deleted once the branches that were written against it are merged:
//! the old `mod deploy_support;` names, re-exported from the test-support library
//! (`gateway_testkit::deploy`). New tests import from `gateway_testkit` directly.

#![allow(
    unused_imports,
    reason = "a shim: each test binary uses a different subset of the old names"
)]

pub use gateway_testkit::deploy::*;
