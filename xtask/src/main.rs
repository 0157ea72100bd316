//! `cargo xtask`: setup checks, the privileged test run, the demo, and benchmarks.
fn main() {}
