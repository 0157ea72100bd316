//! `gateway demo` (built only with the `demo` feature: the fault lab compiled in). By default
//! the proxy's main job ([`proxy`]): `gateway run` in front of the fault lab under steady load
//! while upstreams break one by one, and what it saw and decided. `--observer`: the host-wide
//! observer alone in front of the same kind of lab ([`observer`]).

use std::process::ExitCode;

use clap::Args;

mod judge;
mod observer;
mod proxy;

pub use observer::{DemoClientArgs, demo_client};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// The observer demo (`gateway observe` in front of the lab) instead of the proxy's.
    #[arg(long)]
    pub observer: bool,
    /// Observer demo: how long to send traffic, in seconds.
    #[arg(long, default_value_t = 12.0)]
    pub duration: f64,
    /// Observer demo: print the connect records as JSON lines instead of the live table.
    #[arg(long)]
    pub json: bool,
    /// Proxy demo: requests per second sent through the gateway.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Proxy demo: how long each upstream stays broken, in seconds.
    #[arg(long, default_value_t = 4.0)]
    pub fault_for: f64,
    /// Proxy demo: how long after each repair before the next upstream breaks, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub recover_for: f64,
}

pub fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.observer {
        observer::demo(args)
    } else {
        proxy::demo(args)
    }
}
