//! The `gateway` library: the kernel observer, the reverse proxy, and the fault lab they are
//! tested against. `main.rs` only parses the command line and dispatches here.

pub mod config;
pub mod decide;
pub mod demo;
pub mod diagnose;
pub mod lab;
pub mod metrics;
pub mod observe;
pub mod observer;
pub mod proxy;
pub mod service;
pub mod signals;
