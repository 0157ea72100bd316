//! The `gateway` library: the kernel observer and what it feeds, the reverse proxy, and the
//! `observe` and `diagnose` commands. `main.rs` only parses the command line and dispatches
//! here. Data flows kernel (`gateway-ebpf`) → `observer` → `signals` → `decide` → `proxy`.
//! The fault lab is its own crate (`gateway-lab`), compiled in only for `gateway demo` (the
//! `demo` feature).

pub mod config;
pub mod decide;
#[cfg(feature = "demo")]
pub mod demo;
pub mod diagnose;
pub mod metrics;
pub mod observe;
pub mod observer;
pub mod proxy;
pub mod service;
pub mod signals;
