//! The config text the gateways of the tests start from: every listener on loopback, the
//! access log in JSON to a file the test reads back, no drain delay unless the test is about
//! it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// The header of every test config: loopback listener and admin on port 0, access log to
/// `log` in JSON, no drain delay (a test that stops the gateway does not wait for load
/// balancers; `service_lifecycle` tests the delay).
pub fn base_config(log: &Path) -> String {
    format!(
        r#"[router]
listen = ["127.0.0.1:0"]
shutdown_grace_ms = 5000
drain_delay_ms = 0

[admin]
listen = "127.0.0.1:0"

[access_log]
format = "json"
output = "{}"
"#,
        log.display()
    )
}

/// Writes `base_config` + `extra` to DIR/gateway.toml; the access log goes to DIR/access.log.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    let text = format!("{}\n{extra}", base_config(&dir.join("access.log")));
    std::fs::write(&path, text).unwrap();
    path
}

/// A config for `gateway run`: loopback listener and admin on the given ports, one upstream,
/// access log in JSON to `log`, plus `extra` (TOML appended at the end; may open new tables).
pub fn with_ports(
    listen: u16,
    admin: u16,
    upstream: SocketAddr,
    log: &Path,
    router_extra: &str,
    extra: &str,
) -> String {
    format!(
        "[router]\nlisten = [\"127.0.0.1:{listen}\"]\nworkers = 2\n{router_extra}\n\n[router.upstream]\nendpoints = [\"{upstream}\"]\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[access_log]\nformat = \"json\"\noutput = \"{}\"\n\n{extra}\n",
        log.display()
    )
}

/// Writes DIR/gateway.toml for an unprivileged test of the real binary: one listener and the
/// admin on loopback port 0, no drain delay, `endpoints` as the default cluster, then `extra`
/// (TOML tables), and the access log and the observer off unless `extra` has their tables.
pub fn loopback(dir: &Path, endpoints: &[SocketAddr], extra: &str) -> PathBuf {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let mut text = format!(
        "[router]\nlisten = [\"127.0.0.1:0\"]\ndrain_delay_ms = 0\n\n\
         [router.upstream]\nendpoints = [{}]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{extra}\n",
        eps.join(", ")
    );
    if !extra.contains("[access_log]") {
        text.push_str("\n[access_log]\noutput = \"off\"\n");
    }
    if !extra.contains("[observer]") {
        text.push_str("\n[observer]\nmode = \"off\"\n");
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}
