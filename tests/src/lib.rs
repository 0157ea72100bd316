//! The one test-support library of the workspace: what the end-to-end tests share, by concept.
//! gateway-user's integration tests use it as a dev-dependency, and so do this crate's own
//! tests (`tests/`, the ones that run `connect-probe`). Where an end-to-end test lives is a rule
//! of the README's Layout section. Nothing here is part of a build of the gateway.
//!
//! | module | what it owns |
//! |---|---|
//! | [`root`] | [`require_root`](root::require_root): a privileged test fails loudly without root, never skips |
//! | [`bins`] | the binaries a test runs: [`gateway_bin!`] and [`connect_probe!`] evaluate cargo's paths in the test crate |
//! | [`process`] | `gateway run` as a child: spawned, its output captured, ready once `/readyz` answers; signal, wait, peak RSS |
//! | [`observe`] | `gateway observe` as a child: ready once attached, its JSON records by cookie |
//! | [`config`] | the config text the process and in-process gateways start from |
//! | [`tempdir`] | scratch directories under the system temp dir |
//! | [`ports`] | loopback ports: a free one to listen on, a refused one |
//! | [`http`] | clients: hyper (async) and one blocking request per connection, and [`Got`](http::Got) |
//! | [`admin`] | the admin API read back: `/status`, `/metrics` samples checked against the catalogue |
//! | [`upstream`] | scripted loopback upstreams: HTTP, silent, holding, raw |
//! | [`peers`] | real third-party peers: Python `websockets`, `grpcio` and `h2` (venv from `./dev`), nginx as an h2c upstream, `h2load` |
//! | [`inprocess`] | the gateway started in the test's own process; its JSON access log |
//! | [`lab_gateway`] | `gateway run` in the fault lab's client namespace with the kernel observer |
//! | [`scenario`] | three lab upstreams behind the gateway, an open-loop load generator, fault timing |
//! | [`service`] | the process as a service manager starts it: cgroups, capabilities, a closed-loop load |
//! | [`deploy`] | the Debian package and a systemd-nspawn container booted from a Debian 12 root |
//! | [`observer`] | the observer attached in-process to a lab's client cgroup, and `connect-probe` |
//! | [`diagnose`] | `gateway diagnose` runs and their JSON contract; slow servers for its verdicts |

pub mod admin;
pub mod bins;
pub mod config;
pub mod deploy;
pub mod diagnose;
pub mod http;
pub mod inprocess;
pub mod lab_gateway;
pub mod observe;
pub mod observer;
pub mod peers;
pub mod ports;
pub mod process;
pub mod root;
pub mod scenario;
pub mod service;
pub mod tempdir;
pub mod upstream;
