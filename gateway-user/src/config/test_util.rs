//! What the config's unit tests share: a config loaded from text as the file `gw.toml`.

use std::path::Path;

use super::*;

pub(super) fn load(text: &str) -> Result<Loaded, ConfigError> {
    load_str(text, Path::new("gw.toml"))
}

/// The error a config that must be refused gets.
pub(super) fn err(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// A router and the cluster `api` (timeouts, retries), no route.
pub(super) const BASE: &str = r#"[router]
listener_port = 8080

[clusters.api]
endpoints = ["127.0.0.1:9000"]
[clusters.api.timeouts]
response_timeout_ms = 900
request_timeout_ms = 5000
[clusters.api.retry]
max_retries = 3
on_response_timeout = true
"#;

/// The one route the tests that are not about routes need.
const ROUTE: &str = "[[routes]]\ncluster = \"api\"\n";

/// `text` with [`ROUTE`] after it.
pub(super) fn with_route(text: &str) -> String {
    format!("{text}{ROUTE}")
}
