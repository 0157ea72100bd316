//! `connect()` itself: cgroup connect4/6 open the record. The one failure that never sends a
//! SYN (EADDRNOTAVAIL) is seen, on Linux 6.12 and later, by sock_ops' state callback, which
//! connect4/6 turn on (`callbacks_on`). On older kernels the return of `connect()` catches it,
//! watched in one of two ways, the loader's choice: the classic `syscalls:sys_exit_connect`
//! tracepoint (the kernel filters by syscall, so it runs only for connect(), but it is opened
//! through tracefs, which is root-only), or the raw `sys_exit` tracepoint (opened by name with
//! bpf(2), so CAP_BPF and CAP_PERFMON suffice, but it runs for every syscall and filters by
//! number itself).

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::bpf_probe_read_kernel,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_setsockopt},
    },
    macros::{cgroup_sock_addr, raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, SockAddrContext, TracePointContext},
};
use gateway_common::{
    AF_INET, AF_INET6, ConnectEvent, Outcome, SO_ERROR_NONE, UpstreamKey, counter, errno,
};

use crate::{
    anomaly, emit,
    maps::{
        CALLBACKS_AT_CONNECT, F_CALLBACKS_ON, F_CONNECT_SENT, F_EMITTED, PENDING_CONNECT,
        PT_REGS_SYSCALL_NR_OFFSET, SYSCALL_NR_CONNECT, Taken, take_slot,
    },
    sockops,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const SOL_TCP: i32 = 6;
/// include/uapi/linux/bpf.h: a `bpf_setsockopt()` option since Linux 6.12.
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
/// Offset of `long ret` in the `syscalls:sys_exit_connect` record
/// (/sys/kernel/tracing/events/syscalls/sys_exit_connect/format).
const SYS_EXIT_RET_OFFSET: usize = 16;

/// cgroup `connect4`: runs inside `connect()` in the caller's context, before any SYN
/// (`__inet_stream_connect` → `tcp_v4_pre_connect`). The only hook that sees pid and comm
/// reliably, so it opens the record. Always returns 1 (allow).
#[cgroup_sock_addr(connect4)]
pub fn gw_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ == SOCK_STREAM && sa.protocol == IPPROTO_TCP {
        open(&ctx, key_v4(sa.user_ip4, port_of(sa)));
    }
    anomaly::flush();
    1
}

/// cgroup `connect6`: as `gw_connect4`.
#[cgroup_sock_addr(connect6)]
pub fn gw_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ == SOCK_STREAM && sa.protocol == IPPROTO_TCP {
        // The verifier only allows 4-byte loads of user_ip6[i].
        let w = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        open(&ctx, key_v6(w, port_of(sa)));
    }
    anomaly::flush();
    1
}

/// The destination key of an IPv4 address as the kernel keeps it (network order in a `u32`).
#[inline(always)]
pub fn key_v4(ip: u32, port: u16) -> UpstreamKey {
    let mut dst = UpstreamKey {
        family: AF_INET,
        port,
        addr: [0; 16],
    };
    let ip = ip.to_ne_bytes();
    dst.addr[0] = ip[0];
    dst.addr[1] = ip[1];
    dst.addr[2] = ip[2];
    dst.addr[3] = ip[3];
    dst
}

/// The destination key of an IPv6 address given as four `u32` words. A v4-mapped address
/// (`::ffff:a.b.c.d`) is keyed as IPv4, so that both paths to one host share an aggregate.
#[inline(always)]
pub fn key_v6(w: [u32; 4], port: u16) -> UpstreamKey {
    if w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0xffff) {
        return key_v4(w[3], port);
    }
    let mut dst = UpstreamKey {
        family: AF_INET6,
        port,
        addr: [0; 16],
    };
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        dst.addr[i * 4] = b[0];
        dst.addr[i * 4 + 1] = b[1];
        dst.addr[i * 4 + 2] = b[2];
        dst.addr[i * 4 + 3] = b[3];
        i += 1;
    }
    dst
}

#[inline(always)]
fn port_of(sa: &bpf_sock_addr) -> u16 {
    // user_port holds the port in network byte order in its low 16 bits.
    u16::from_be(sa.user_port as u16)
}

#[inline(always)]
fn open(ctx: &SockAddrContext, dst: UpstreamKey) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((st, taken)) = take_slot(cookie, now) else {
        return;
    };
    let st = unsafe { &mut *st };
    match taken {
        // A second connect() on a socket whose first is still in flight must not reset the
        // attempt. (The kernel runs this hook only for a socket in CLOSE, so this is a guard.)
        Taken::Mine if st.flags & F_CONNECT_SENT != 0 && st.flags & F_EMITTED == 0 => return,
        // Every candidate slot holds a connect still in flight: the table is too small for
        // the connects in flight. The first one's record is lost; say so.
        Taken::Lost => {
            anomaly::report(counter::SLOT_REUSED, st.ev.cookie, &st.ev.dst, st.ev.pid);
        }
        _ => {}
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    st.flags = 0;
    st.data_retransmits = 0;
    st.rtos = 0;
    st.app_error = 0;
    st.last_rto_ns = 0;
    st.ev = ConnectEvent {
        cookie,
        ts_connect_ns: now,
        ts_event_ns: 0,
        syn_rtt_ns: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        dst,
        pid: (pid_tgid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        src_port: 0,
        syn_retransmits: 0,
        errno: 0,
        so_error: SO_ERROR_NONE,
        kind: 0,
        outcome: 0,
        reset: gateway_common::RESET_UNKNOWN,
        _pad: [0; 5],
    };
    if unsafe { core::ptr::read_volatile(&CALLBACKS_AT_CONNECT) } != 0 && callbacks_on(ctx) {
        st.flags |= F_CALLBACKS_ON;
        return;
    }
    let _ = PENDING_CONNECT.insert(&pid_tgid, &st.ev, 0);
}

/// Turns on the socket's state, RTO and retransmit callbacks now, before `tcp_v4_connect()`
/// (or `tcp_v6_connect()`) moves it to SYN_SENT and picks a local port, so that a connect that
/// fails there (EADDRNOTAVAIL: no free port) reaches sock_ops as SYN_SENT → CLOSE without a
/// SYN (`sockops.rs`). False when this kernel refuses the option (before Linux 6.12): the
/// caller falls back to `PENDING_CONNECT`.
#[inline(always)]
fn callbacks_on(ctx: &SockAddrContext) -> bool {
    let mut flags = sockops::CALLBACKS as i32;
    let rc = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            core::ptr::from_mut(&mut flags).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    };
    rc == 0
}

/// `syscalls:sys_exit_connect`: `connect()` returned. EADDRNOTAVAIL comes from
/// `inet_hash_connect()` in `tcp_v4_connect()`/`tcp_v6_connect()`, before `tcp_connect()`,
/// so sock_ops never hears of it; this is the only place that does. Classic tracepoint (not
/// tp_btf) because it fires only for connect(), not for every syscall.
#[tracepoint]
pub fn gw_sys_exit_connect(ctx: TracePointContext) -> u32 {
    let ret: i64 = unsafe { ctx.read_at(SYS_EXIT_RET_OFFSET) }.unwrap_or(0);
    connect_returned(ret);
    0
}

/// Raw tracepoint `sys_exit` (`TP_PROTO(struct pt_regs *regs, long ret)`,
/// include/trace/events/syscalls.h): the same job as [`gw_sys_exit_connect`] for a loader
/// without tracefs (a non-root process with CAP_BPF + CAP_PERFMON: /sys/kernel/tracing is
/// 0700). It runs at every syscall's exit, so it returns after one read and one compare unless
/// the syscall was connect(). The syscall number is `regs->orig_ax` on x86-64 (`syscallno` on
/// arm64), whose offset the loader reads from the kernel's BTF (no CO-RE in aya for Rust).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn gw_raw_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    let offset = unsafe { core::ptr::read_volatile(&PT_REGS_SYSCALL_NR_OFFSET) };
    // The low 32 bits hold the number on both architectures (little-endian).
    let nr: i32 =
        unsafe { bpf_probe_read_kernel(regs.wrapping_add(offset as usize).cast::<i32>()) }
            .unwrap_or(-1);
    if nr != unsafe { core::ptr::read_volatile(&SYSCALL_NR_CONNECT) } {
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    connect_returned(ret);
    0
}

/// `connect()` returned `ret` in this thread: finish the record that connect4/6 left pending
/// if it failed for want of a local address.
#[inline(always)]
fn connect_returned(ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(pending) = PENDING_CONNECT.get_ptr_mut(&pid_tgid) else {
        return;
    };
    if ret == -(errno::EADDRNOTAVAIL as i64) {
        // A scratch SockState is too big for the 512-byte stack, so the record is completed in
        // the map value it already lives in.
        let ev = unsafe { &mut *pending };
        ev.kind = gateway_common::EventKind::Outcome as u8;
        ev.outcome = Outcome::AddrUnavailable as u8;
        ev.errno = errno::EADDRNOTAVAIL as u16;
        ev.ts_event_ns = unsafe { bpf_ktime_get_ns() };
        emit::addr_unavailable(ev);
    }
    let _ = PENDING_CONNECT.remove(&pid_tgid);
    // An anomaly found here is logged by the next connect4/6 run on this CPU, or by a sock_ops
    // run that looks before it (`anomaly`).
}
