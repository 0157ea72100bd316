//! BTF tracepoints that finish a failed connect's record: the error that ended it, or the
//! owner closing it first.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use gateway_common::Outcome;

use crate::{
    emit,
    maps::{F_CONNECT_SENT, F_EMITTED, F_ESTABLISHED, F_SYN_SENT_CLOSED, SK_ERR_OFFSET, sock_state},
};

/// `sock:inet_sk_error_report` (tp_btf, arg 0 = `struct sock *`). Called from
/// `tcp_done_with_error()` (net/ipv4/tcp.c) for RST (ECONNREFUSED), SYN timeout (ETIMEDOUT)
/// and ICMP errors (EHOSTUNREACH, ...), around the same `tcp_set_state(TCP_CLOSE)` that
/// sock_ops reports; either may come first, so whichever comes second sends the record.
#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn gw_error_report(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    let st = sock_state(sk);
    if st.is_null() {
        return 0;
    }
    let st = unsafe { &mut *st };
    if st.flags & F_CONNECT_SENT == 0 || st.flags & (F_EMITTED | F_ESTABLISHED) != 0 {
        return 0;
    }
    let offset = unsafe { core::ptr::read_volatile(&SK_ERR_OFFSET) };
    if offset == 0 {
        return 0;
    }
    let err: i32 = unsafe { bpf_probe_read_kernel(sk.cast::<u8>().add(offset as usize).cast::<i32>()) }
        .unwrap_or(0);
    if err <= 0 {
        return 0;
    }
    st.errno = err as u32;
    if st.flags & F_SYN_SENT_CLOSED != 0 {
        emit::outcome(st, Outcome::from_errno(st.errno), st.errno, unsafe { bpf_ktime_get_ns() });
    }
    0
}

/// `tcp:tcp_destroy_sock` (tp_btf, arg 0 = `struct sock *`), from `tcp_v4_destroy_sock()`.
/// A socket that left SYN_SENT with no error report was closed by its owner before the
/// handshake finished: a userspace connect timeout. `sk_storage` is freed after this point
/// (`__sk_destruct()` → `bpf_sk_storage_free()`), so the state is still here.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn gw_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    let st = sock_state(sk);
    if st.is_null() {
        return 0;
    }
    let st = unsafe { &mut *st };
    if st.flags & F_SYN_SENT_CLOSED != 0 && st.flags & F_EMITTED == 0 {
        let t = st.t_closed_ns;
        emit::outcome(st, Outcome::Aborted, 0, t);
    }
    0
}
