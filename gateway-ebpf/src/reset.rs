//! Raw tracepoint `tcp_receive_reset` (`TP_PROTO(const struct sock *sk)`,
//! include/trace/events/tcp.h): an RST arrived for a socket. It runs in `tcp_reset()`, before
//! the connect is ended, so sock_ops' SYN_SENT → CLOSE callback can tell an RST from an ICMP
//! port unreachable, which ends a connect with the same `ECONNREFUSED` (`tcp_v4_err()`) and
//! means something else: a firewall's `REJECT` (iptables' default reply; kube-proxy's for a
//! Service with no ready endpoints), not a host whose port has no listener. Raw, so that it
//! needs no tracefs; it runs for every RST the host receives, which is rare next to packets,
//! and does one read and a lookup.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::maps::{F_ESTABLISHED, F_RST_RECEIVED, sock_cookie, sock_state};

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn gw_tcp_receive_reset(ctx: RawTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let Ok(cookie) = sock_cookie(sk) else {
        return 0;
    };
    let st = sock_state(cookie);
    if st.is_null() {
        return 0;
    }
    // Only a connect in flight asks: an established connection's RST is told by its close.
    let st = unsafe { &mut *st };
    if st.flags & F_ESTABLISHED == 0 {
        st.flags |= F_RST_RECEIVED;
    }
    0
}
