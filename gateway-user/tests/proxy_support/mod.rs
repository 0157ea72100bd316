//! Transition shim, to be deleted once the branches that were written against it are merged:
//! the old `mod proxy_support;` names, re-exported from the test-support library
//! (`gateway_testkit`). New tests import from `gateway_testkit` directly.

#![allow(
    dead_code,
    unused_imports,
    reason = "a shim: each test binary uses a different subset of the old names"
)]

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use gateway_testkit::{
    config::{base_config, write_config},
    http::{
        Body, Got, HttpClient, client, empty, full, generated, get, get_host, h2_client,
        raw_exchange, send,
    },
    inprocess::{InProcess, gateway, log_lines},
    ports::refused_addr,
    tempdir::temp_dir,
    upstream::{
        HoldListener, SilentListener, Upstream, hold_listener, raw_responder, silent_listener,
    },
};

/// The old `GatewayProcess`: `spawn(config)` and `spawn_with(command)`, ready once `/readyz`
/// answers; `admin` is an `Option` as it was, and `stderr` the lines it printed (stdout's
/// too, now). Everything else is the library's
/// [`gateway_testkit::process::GatewayProcess`] (and its `ChildProcess`), through `Deref`.
pub struct GatewayProcess {
    inner: gateway_testkit::process::GatewayProcess,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    pub fn spawn(config: &Path) -> GatewayProcess {
        GatewayProcess::spawn_with(gateway_testkit::gateway_bin!().run(config))
    }

    pub fn spawn_with(cmd: Command) -> GatewayProcess {
        let inner = gateway_testkit::process::GatewayProcess::spawn(cmd);
        GatewayProcess {
            addr: inner.addr,
            admin: Some(inner.admin),
            stderr: inner.shared_lines(),
            inner,
        }
    }

    /// Whether a line contains `needle` within `limit`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while !self.inner.contains(needle) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    pub fn stderr_text(&self) -> String {
        self.inner.text()
    }
}

impl std::ops::Deref for GatewayProcess {
    type Target = gateway_testkit::process::GatewayProcess;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for GatewayProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}
