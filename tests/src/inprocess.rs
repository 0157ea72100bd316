//! The gateway started inside the test's own process and runtime (`gateway::proxy::start`,
//! userspace timing: no privileges), from [`base_config`](crate::config::base_config) plus the
//! test's clusters; and its JSON access log, read back.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{config::base_config, tempdir::temp_dir};

/// The gateway in this process.
pub struct InProcess {
    pub handle: gateway::proxy::GatewayHandle,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub dir: PathBuf,
}

/// Starts the gateway in-process from `base_config` + `extra` (a config fragment).
pub async fn gateway(label: &str, extra: &str) -> InProcess {
    gateway_with(label, |base| format!("{base}\n{extra}")).await
}

/// Starts the gateway in-process from the config `text` makes of `base_config` (for a test
/// that changes the base's own tables, e.g. a key of `[router]`).
pub async fn gateway_with(label: &str, text: impl FnOnce(String) -> String) -> InProcess {
    let dir = temp_dir(label);
    let log = dir.join("access.log");
    let text = text(base_config(&log));
    let settings = gateway::config::load_str(&text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config refused: {e}\n{text}"))
        .settings;
    let handle = gateway::proxy::start(
        settings,
        Arc::new(gateway::signals::UserspaceOnly::new("test")),
    )
    .await
    .expect("gateway starts");
    let addr = handle.listen_addrs()[0];
    InProcess {
        handle,
        addr,
        log,
        dir,
    }
}

/// Access-log lines (JSON) once at least `n` are written, or panics after 5 s.
pub fn log_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Whole lines only: the gateway may be writing the last one as it is read.
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        let lines: Vec<serde_json::Value> = whole
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} access log lines, got {}: {text}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every complete JSON line of the access log at `path` so far (none if it does not exist
/// yet; a line still being written is left out).
pub fn read_access_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
