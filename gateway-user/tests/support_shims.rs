//! Keeps the transition shims compiling: `proxy_support`, `admin_support`,
//! `scenario_support`, `service_support` and `deploy_support` are the old per-test-binary
//! support modules, now thin re-exports of `gateway_testkit`, kept for branches written
//! against them. Delete this file with the shims once those branches are merged.

mod admin_support;
mod deploy_support;
mod proxy_support;
mod scenario_support;
mod service_support;

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

/// The old entry points keep their signatures (a compile-time check; nothing runs).
#[test]
fn old_support_names_keep_their_signatures() {
    let _: fn(&Path) -> proxy_support::GatewayProcess = proxy_support::GatewayProcess::spawn;
    let _: fn(Command) -> proxy_support::GatewayProcess = proxy_support::GatewayProcess::spawn_with;
    let _: fn(&proxy_support::GatewayProcess, &str, Duration) -> bool =
        proxy_support::GatewayProcess::wait_for_log;
    let _: fn(&str) -> std::path::PathBuf = proxy_support::temp_dir;
    let _: fn() -> SocketAddr = proxy_support::refused_addr;
    fn _lab_gateway(lab: &gateway_lab::Lab) -> admin_support::LabGateway<'_> {
        admin_support::LabGateway::start(lab, "name", "")
    }
    let _: fn(&str) = admin_support::require_root;
    let _: fn(SocketAddr) -> serde_json::Value = admin_support::status;
    let _: fn(&str, gateway_lab::HttpBehaviour, usize, u64, &str) -> scenario_support::Scenario =
        scenario_support::Scenario::start;
    let _: fn() = scenario_support::require_root;
    let _: fn(Command) -> service_support::Proc = service_support::Proc::start;
    let _: fn(&Path) -> Command = service_support::gateway_run;
    let _: fn() -> &'static str = service_support::gateway_bin;
    let _: fn(u16, u16, SocketAddr, &Path, &str, &str) -> String = service_support::config;
    let _: fn() -> service_support::Upstream = service_support::Upstream::start;
    type Reply = Result<(u16, String), String>;
    let _: fn(SocketAddr, &str, Duration) -> Reply = service_support::get_once;
    let _: fn() -> std::path::PathBuf = deploy_support::deb;
}
