#![no_std]
// Empty: the eBPF programs are the `gateway` binary in src/main.rs. This library exists so that
// gateway-user can name this crate as a build-dependency and be rebuilt when it changes.
