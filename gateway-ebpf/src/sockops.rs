//! cgroup `sock_ops`: the TCP state machine of tracked sockets, from the kernel's own callbacks
//! (`tcp_call_bpf()` in include/net/tcp.h).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
        BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use gateway_common::{AF_INET, ConnStats, Outcome, counter};

use crate::{
    anomaly, connect, emit,
    maps::{
        CONN_STATS, F_CALLBACKS_ON, F_CONNECT_SENT, F_ESTABLISHED, F_FINISHED, F_RST_RECEIVED,
        SK_ERR_OFFSET, SK_ERR_SOFT_OFFSET, SockState, sock_state, stale,
    },
};

/// `enum tcp_state` in include/net/tcp_states.h.
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;

/// The callbacks a tracked socket gets, off by default: turned on by connect4/6 where the
/// kernel allows it (`connect.rs`), and again here at TCP_CONNECT for kernels where it does not.
pub const CALLBACKS: u32 =
    BPF_SOCK_OPS_RTO_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG;

/// Always returns 1: sock_ops replies are only read for a few ops we do not handle.
#[sock_ops]
pub fn gw_sock_ops(ctx: SockOpsContext) -> u32 {
    // Only a run that may have parked an anomaly looks for one to log (`anomaly`): of a
    // connection's eight or nine runs, the outcome and anything remarkable, not the five that
    // return at once, the SYN, or a clean close (docs/kernel.md, "Cost"). One parked by
    // getsockopt waits for the next that looks, or for the next connect4/6 on this CPU.
    if wanted(&ctx) && try_sock_ops(&ctx) {
        crate::anomaly::flush();
    }
    1
}

/// Whether this callback may need the record: one of the ops handled below, except two of the
/// four state changes of every connection, which need nothing: into SYN_SENT, and SYN_SENT →
/// ESTABLISHED (ACTIVE_ESTABLISHED, which follows, reports it). Five of a connection's eight
/// or nine runs end here.
#[inline(always)]
fn wanted(ctx: &SockOpsContext) -> bool {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        return ctx.arg(1) != TCP_SYN_SENT
            && !(ctx.arg(0) == TCP_SYN_SENT && ctx.arg(1) == TCP_ESTABLISHED);
    }
    op == BPF_SOCK_OPS_TCP_CONNECT_CB
        || op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        || op == BPF_SOCK_OPS_RTO_CB
        || op == BPF_SOCK_OPS_RETRANS_CB
}

/// A callback that [`wanted`] lets through. False when it cannot have parked an anomaly.
#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) -> bool {
    let op = ctx.op();
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let st = sock_state(cookie);
    // Past SYN_SENT: an RTO or retransmit of an established connection, or a state change out
    // of anything but SYN_SENT.
    let past_syn = || match op {
        BPF_SOCK_OPS_STATE_CB => ctx.arg(0) != TCP_SYN_SENT,
        BPF_SOCK_OPS_RTO_CB | BPF_SOCK_OPS_RETRANS_CB => ctx_state(ctx) != TCP_SYN_SENT,
        _ => false,
    };
    if st.is_null() || stale(unsafe { &*st }, past_syn) {
        // Not opened by connect4/6 (a passive socket, or one older than the attachment), or
        // opened but its record since overwritten by a newer connect: see `reused`. A stale
        // record is an earlier connect of the same socket (`maps::stale`).
        return (op == BPF_SOCK_OPS_RTO_CB
            || op == BPF_SOCK_OPS_RETRANS_CB
            || op == BPF_SOCK_OPS_STATE_CB)
            && reused(ctx, cookie, op);
    }
    let st = unsafe { &mut *st };
    // The clock is read only where a time is kept: it costs more than the rest of most
    // callbacks (a `read_tsc` on this kind of VM).
    let now = || unsafe { bpf_ktime_get_ns() };
    match op {
        // tcp_connect(): the first SYN is about to leave. Switch on the callbacks that are off
        // by default (docs/kernel.md, "What loads and attaches here": RTO/RETRANS/STATE must
        // be enabled per socket), unless connect4/6 already did (Linux 6.12+).
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            st.flags |= F_CONNECT_SENT;
            st.ev.src_port = ctx.local_port() as u16;
            if st.flags & F_CALLBACKS_ON == 0 {
                let _ = ctx.set_cb_flags(CALLBACKS as i32);
            }
            false
        }
        // tcp_finish_connect(): the SYN-ACK arrived.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            st.flags |= F_ESTABLISHED;
            let now = now();
            st.ev.syn_rtt_ns = syn_rtt_ns(ctx, st, now);
            emit::outcome(st, Outcome::Established, 0, now);
            true
        }
        // tcp_retransmit_skb(): args = seq, segs, err. Counted only when the retransmit was
        // sent (err == 0), which is also when TcpExtTCPSynRetrans counts it.
        BPF_SOCK_OPS_RETRANS_CB => {
            if ctx.arg(2) != 0 {
                return false;
            }
            if ctx_state(ctx) == TCP_SYN_SENT {
                st.ev.syn_retransmits = st.ev.syn_retransmits.saturating_add(1);
            } else if st.flags & F_ESTABLISHED != 0 {
                st.data_retransmits += 1;
                established_event(ctx, st, false);
            }
            true
        }
        // tcp_write_timeout(): args = retransmits so far, rto (jiffies), expired.
        BPF_SOCK_OPS_RTO_CB => {
            if st.flags & F_ESTABLISHED != 0 && ctx_state(ctx) != TCP_SYN_SENT {
                st.rtos += 1;
                st.last_rto_ns = now();
                established_event(ctx, st, true);
            }
            true
        }
        // tcp_set_state(): args = old state, new state.
        BPF_SOCK_OPS_STATE_CB => {
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            if old == TCP_SYN_SENT && new == TCP_CLOSE && st.flags & F_CONNECT_SENT == 0 {
                // Into SYN_SENT and out again with no SYN sent: the callbacks were on before
                // the connect (connect4/6), and `tcp_v4_connect()`/`tcp_v6_connect()` failed
                // between setting SYN_SENT and `tcp_connect()`. That is `inet_hash_connect()`
                // finding no free local port (EADDRNOTAVAIL), or, rarely, the route changing
                // under `ip_route_newports()`; the first is the one that happens.
                emit::outcome(
                    st,
                    Outcome::AddrUnavailable,
                    gateway_common::errno::EADDRNOTAVAIL,
                    now(),
                );
            } else if old == TCP_SYN_SENT && new == TCP_CLOSE {
                // Every kernel path that ends a connect writes sk_err first and wakes the
                // application after this callback (`tcp_done_with_error()` in
                // net/ipv4/tcp_input.c: WRITE_ONCE(sk_err) → tcp_done() → tcp_set_state() → here
                // → wake-up). So
                // sk_err is read here, before the application can clear it with SO_ERROR or
                // connect()'s return. With no hard error, the owner closed the socket itself:
                // a soft error (ICMP received while the socket was locked, in sk_err_soft or
                // already read by the app through SO_ERROR) says why; none means it gave up
                // on its own (aborted).
                let mut err = sk_int(sk.cast(), unsafe {
                    core::ptr::read_volatile(&SK_ERR_OFFSET)
                });
                if err == 0 {
                    err = st.app_error;
                }
                if err == 0 {
                    err = sk_int(sk.cast(), unsafe {
                        core::ptr::read_volatile(&SK_ERR_SOFT_OFFSET)
                    });
                }
                // ECONNREFUSED is an RST, or an ICMP port unreachable (`tcp_v4_err()`):
                // `tcp_reset()` runs the tracepoint that sets the flag before it ends the
                // connect, in this same call chain.
                st.ev.reset = if st.flags & F_RST_RECEIVED != 0 {
                    gateway_common::RESET_SEEN
                } else {
                    gateway_common::RESET_NONE
                };
                emit::outcome(st, Outcome::from_errno(err), err, now());
            } else if (old == TCP_ESTABLISHED || old == TCP_CLOSE_WAIT)
                && st.flags & F_ESTABLISHED != 0
            {
                return closing(ctx, st, new);
            } else if (old == TCP_SYN_SENT && new != TCP_ESTABLISHED)
                || (old == TCP_ESTABLISHED && st.flags & F_ESTABLISHED == 0)
            {
                // SYN_SENT only ever becomes ESTABLISHED or CLOSE (`tcp_rcv_synsent_state_process`,
                // `tcp_done`), and ESTABLISHED is reported before the socket can leave it
                // (`tcp_finish_connect` runs the ACTIVE_ESTABLISHED callback). Anything else
                // means this state machine has a hole: say so rather than miscount.
                anomaly::report(
                    counter::UNEXPECTED_STATE,
                    st.ev.cookie,
                    &st.ev.dst,
                    st.ev.pid,
                );
            }
            true
        }
        _ => false,
    }
}

/// A callback of a connection whose record later connects have taken (a finished record is the
/// first a new one may take, and a pooled connection outlives many). Only a socket whose
/// callbacks connect4/6 or TCP_CONNECT turned on gets these callbacks at all. What the
/// connection reports once established is rebuilt from the context (its destination, what is
/// unACKed when it closes) and from its `CONN_STATS` record (its RTO and retransmit counts).
/// Lost with the record: the pid (anomaly log lines show it), and the destination as
/// connect4/6 saw it, before any rewrite. A connect still in flight when its record was taken
/// was counted then (`SLOT_REUSED`). docs/kernel.md, "The table of records". False when it
/// cannot have parked an anomaly.
#[inline(always)]
fn reused(ctx: &SockOpsContext, cookie: u64, op: u32) -> bool {
    let state = ctx_state(ctx);
    if state == TCP_SYN_SENT {
        return false;
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        let old = ctx.arg(0);
        if old != TCP_ESTABLISHED && old != TCP_CLOSE_WAIT {
            return false;
        }
    } else if op == BPF_SOCK_OPS_RETRANS_CB && ctx.arg(2) != 0 {
        return false;
    }
    // On the stack, not in a per-CPU map: a softirq (another connection's RTO) can interrupt
    // this program on its CPU and run it again.
    let st: &mut SockState = &mut unsafe { core::mem::zeroed() };
    // sock_ops' remote_port holds the port in network order in its upper 16 bits (the context
    // rewrite shifts it there on little-endian), unlike local_port, which is in host order.
    let port = u16::from_be((ctx.remote_port() >> 16) as u16);
    st.ev.dst = if ctx.family() == u32::from(AF_INET) {
        connect::key_v4(ctx.remote_ip4(), port)
    } else {
        connect::key_v6(ctx.remote_ip6(), port)
    };
    st.ev.cookie = cookie;
    st.flags = F_ESTABLISHED;
    // Every RTO and retransmit so far wrote the connection's CONN_STATS record, so the counts
    // go on from there.
    (st.rtos, st.data_retransmits, st.last_rto_ns) = match CONN_STATS.get_ptr(&cookie) {
        Some(cs) => unsafe { ((*cs).rtos, (*cs).data_retransmits, (*cs).last_rto_ns) },
        None => (0, 0, 0),
    };
    match op {
        BPF_SOCK_OPS_RETRANS_CB => {
            st.data_retransmits += 1;
            established_event(ctx, st, false);
        }
        BPF_SOCK_OPS_RTO_CB => {
            st.rtos += 1;
            st.last_rto_ns = unsafe { bpf_ktime_get_ns() };
            established_event(ctx, st, true);
        }
        _ => return closing(ctx, st, ctx.arg(1)),
    }
    true
}

/// The connection leaves ESTABLISHED, or CLOSE_WAIT. Its `CONN_STATS` record is written when
/// someone may ask about it: a reset or an abort (→ CLOSE), or anything to tell (a data
/// retransmit, an RTO, bytes left unACKed). A clean close writes nothing: the map insert was
/// about a fifth of what the observer cost each connection, and the proxy never asks about
/// such a connection (it asks after a reset, a stall or a timeout; what closes a connection
/// first and then asks reads `TCP_INFO` before the close). After the peer's FIN (CLOSE_WAIT)
/// the callbacks stay on: a request written into that window is reset, and that is recorded.
/// Otherwise they stop here, as they would fire for every step of the close. False when it
/// wrote nothing (so it cannot have parked an anomaly).
#[inline(always)]
fn closing(ctx: &SockOpsContext, st: &mut SockState, new: u32) -> bool {
    // Whether there is anything to tell, from the two fields it needs: the rest of the record
    // is read only when it is written, since a clean close's reads of the socket's other
    // fields showed in the profile (docs/kernel.md, "Cost").
    let ops = unsafe { &*ctx.ops };
    let remarkable =
        st.data_retransmits != 0 || st.rtos != 0 || ops.snd_nxt.wrapping_sub(ops.snd_una) != 0;
    if new != TCP_CLOSE_WAIT {
        let _ = ctx.set_cb_flags(0);
        st.flags |= F_FINISHED;
    }
    if new != TCP_CLOSE && !remarkable {
        return false;
    }
    let mut cs = conn_stats(ctx, st);
    cs.closed_ns = unsafe { bpf_ktime_get_ns() };
    if CONN_STATS.insert(&st.ev.cookie, &cs, 0).is_err() {
        conn_insert_failed(st);
    }
    true
}

/// SYN sent to SYN-ACK received, at ACTIVE_ESTABLISHED. When the SYN was sent once, that is the
/// kernel's own first RTT sample, taken from the SYN's send timestamp before this callback
/// (`tcp_rcv_synsent_state_process()`: `tcp_ack()` → `tcp_ack_update_rtt()` sets
/// `srtt_us = rtt << 3`, then `tcp_finish_connect()` calls us), so TCP_CONNECT need not read
/// the clock: one clock read less per connect (docs/kernel.md, "Cost"). After SYN retransmits
/// Karn's rule leaves no clean sample, so it is the time since `connect()`, which includes the
/// retransmit timeouts, as it always did; a microsecond or two of it is the work between
/// `connect()` and the first SYN.
#[inline(always)]
fn syn_rtt_ns(ctx: &SockOpsContext, st: &SockState, now: u64) -> u64 {
    let srtt_us = unsafe { (*ctx.ops).srtt_us } >> 3;
    if st.ev.syn_retransmits == 0 && srtt_us != 0 {
        u64::from(srtt_us) * 1000
    } else {
        now.saturating_sub(st.ev.ts_connect_ns)
    }
}

/// An `int` field of `struct sock` (`sk_err`, `sk_err_soft`), read through the BTF-typed
/// `tcp_sock` since sock_ops' own `bpf_sock` view has no such fields. The offset comes from the
/// running kernel's BTF; 0 = unknown.
#[inline(always)]
fn sk_int(sk: *mut core::ffi::c_void, offset: u32) -> u32 {
    if offset == 0 {
        return 0;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    if tp.is_null() {
        return 0;
    }
    let err: i32 =
        unsafe { bpf_probe_read_kernel(tp.cast::<u8>().add(offset as usize).cast::<i32>()) }
            .unwrap_or(0);
    if err > 0 { err as u32 } else { 0 }
}

#[inline(always)]
fn ctx_state(ctx: &SockOpsContext) -> u32 {
    unsafe { (*ctx.ops).state }
}

/// An RTO or data retransmit on an established connection: count it per destination and
/// refresh the connection's record.
#[inline(always)]
fn established_event(ctx: &SockOpsContext, st: &mut SockState, rto: bool) {
    if let Some(stats) = emit::dest_stats(&st.ev.dst, st.ev.cookie, st.ev.pid) {
        let stats = unsafe { &mut *stats };
        if rto {
            emit::add(&mut stats.rtos, 1);
        } else {
            emit::add(&mut stats.data_retransmits, 1);
        }
    }
    let cs = conn_stats(ctx, st);
    if CONN_STATS.insert(&st.ev.cookie, &cs, 0).is_err() {
        conn_insert_failed(st);
    }
}

#[inline(always)]
fn conn_insert_failed(st: &SockState) {
    anomaly::report(
        counter::CONN_INSERT_FAILED,
        st.ev.cookie,
        &st.ev.dst,
        st.ev.pid,
    );
}

#[inline(always)]
fn conn_stats(ctx: &SockOpsContext, st: &SockState) -> ConnStats {
    let ops = unsafe { &*ctx.ops };
    ConnStats {
        // tcp_sock.bytes_acked covers sequence space, which includes our SYN; ConnStats
        // reports data bytes only (tcp_snd_una_update() in net/ipv4/tcp_input.c).
        bytes_acked: ops.bytes_acked.saturating_sub(1),
        bytes_received: ops.bytes_received,
        last_rto_ns: st.last_rto_ns,
        closed_ns: 0,
        data_retransmits: st.data_retransmits,
        rtos: st.rtos,
        // tcp_sock.srtt_us is stored left-shifted by 3 (tcp_rtt_estimator()).
        srtt_us: ops.srtt_us >> 3,
        unacked_bytes: ops.snd_nxt.wrapping_sub(ops.snd_una),
    }
}
