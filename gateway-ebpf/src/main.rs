//! The kernel side of `gateway`: one outcome record per TCP connect made by processes in the
//! attached cgroup, per-destination aggregates, and per-connection signals of established
//! connections.
//!
//! How a connect is followed (one `SockState` per connect in `SOCK_STATE`, a preallocated
//! table indexed by socket cookie: the join point of every hook):
//!
//! | hook | file | what it records |
//! |---|---|---|
//! | cgroup `connect4` / `connect6` | `connect.rs` | destination, pid, comm, cgroup, cookie, t_connect; turns the socket's sock_ops callbacks on (Linux 6.12+) |
//! | tracepoint `syscalls:sys_exit_connect`, or raw tracepoint `sys_exit` without tracefs, only before Linux 6.12 | `connect.rs` | EADDRNOTAVAIL: no SYN was ever sent |
//! | cgroup `sock_ops` | `sockops.rs` | SYN retransmits, SYN-RTT (the kernel's sample of a SYN sent once), the errno (or its absence: aborted) when it leaves SYN_SENT, EADDRNOTAVAIL (SYN_SENT left with no SYN, Linux 6.12+), established RTOs/retransmits |
//! | cgroup `getsockopt` | `sockopt.rs` | the `SO_ERROR` the application read |
//! | raw tracepoint `tcp_receive_reset` | `reset.rs` | an RST arrived: tells a refusal by RST from one by ICMP port unreachable |
//!
//! Records go to a ring buffer without a wake-up; userspace drains it on a timer
//! (docs/kernel.md, "Cost": a wake-up per record costs 14–19 µs per connect, a timer drain
//! 2–12 µs).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "atomic_xadd: see emit::add")
)]

#[cfg(target_arch = "bpf")]
mod anomaly;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod emit;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod reset;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod sockopt;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects any program that could get here. Every index is
    // bounds-checked with `get`, and nothing unwraps.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
