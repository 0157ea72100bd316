//! The `gateway` library. Kernel signals flow through it in this order: the kernel side
//! (`gateway-ebpf`) → [`observer`] (loads it, and reads it as one stream of decoded connects) →
//! [`signals`] (the proxy's view of that stream) → [`decide`] (pure policy) → [`proxy`].
//! [`observe`] and [`diagnose`] are the stream's two other readers; [`config`] and [`metrics`]
//! serve them all. The fault lab is its own crate (`gateway-lab`), compiled in only for
//! `gateway demo` (the `demo` feature). `main.rs` only parses the command line and dispatches
//! here.

// The nightly that builds the fuzz targets proves a client connection's future `Send` through
// more than the default 128 levels (parked and resumed connections serve each other's futures),
// and warns that this will become an error.
#![recursion_limit = "256"]

pub mod config;
pub mod decide;
#[cfg(feature = "demo")]
pub mod demo;
pub mod diagnose;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod observer;
pub mod proxy;
pub mod service;
pub mod signals;
pub mod tls;
