//! cgroup `getsockopt`: the `SO_ERROR` an application actually received.

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};

use crate::{
    emit,
    maps::{sock_cookie, sock_state},
};

const SOL_SOCKET: i32 = 1;
const SO_ERROR: i32 = 4;

/// Runs after the kernel's own getsockopt (`__cgroup_bpf_run_filter_getsockopt`), so `optval`
/// holds the value the application is about to read. Must return 1: 0 would turn the caller's
/// getsockopt into EPERM. `bpf_get_socket_cookie` is refused in this program type, so the
/// cookie is read from the socket (`maps::sock_cookie`).
#[cgroup_sockopt(getsockopt)]
pub fn gw_getsockopt(ctx: SockoptContext) -> i32 {
    // An anomaly found here is logged by the next connect4/6 run on this CPU, or by a sock_ops
    // run that looks before it (see `anomaly`): one log call site fewer for the verifier.
    let _ = try_getsockopt(&ctx);
    1
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) -> Result<(), ()> {
    let so = unsafe { &*ctx.sockopt };
    if so.level != SOL_SOCKET || so.optname != SO_ERROR || so.retval != 0 {
        return Ok(());
    }
    let optval = unsafe { so.__bindgen_anon_2.optval }.cast::<u8>();
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end }.cast::<u8>();
    // The verifier demands this exact bounds check before the load.
    if unsafe { optval.add(4) } > optval_end {
        return Err(());
    }
    let value = unsafe { *optval.cast::<i32>() };
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Err(());
    }
    let st = sock_state(sock_cookie(sk.cast::<u8>())?);
    if st.is_null() {
        return Ok(());
    }
    emit::so_error(unsafe { &mut *st }, value as u32);
    Ok(())
}
