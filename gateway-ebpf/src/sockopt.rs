//! cgroup `getsockopt`: the `SO_ERROR` an application actually received.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::cgroup_sockopt, programs::SockoptContext};

use crate::{
    emit,
    maps::{SCRATCH, SK_COOKIE_OFFSET, sock_state},
};

const SOL_SOCKET: i32 = 1;
const SO_ERROR: i32 = 4;

/// Runs after the kernel's own getsockopt (`__cgroup_bpf_run_filter_getsockopt`), so `optval`
/// holds the value the application is about to read. Must return 1: 0 would turn the caller's
/// getsockopt into EPERM. `bpf_get_socket_cookie` is refused in this program type, so the
/// cookie is read from the socket (`cookie_of`).
#[cgroup_sockopt(getsockopt)]
pub fn gw_getsockopt(ctx: SockoptContext) -> i32 {
    // An anomaly found here is logged by the next sock_ops or connect program on this CPU
    // (see `anomaly`): one log call site fewer for the verifier.
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
    let st = sock_state(cookie_of(sk.cast::<u8>())?);
    if st.is_null() {
        return Ok(());
    }
    emit::so_error(unsafe { &mut *st }, value as u32);
    Ok(())
}

/// The socket's cookie, read from `struct sock` at the offset the loader found in the kernel's
/// BTF; 0 when none was ever assigned (no connect4/6 saw the socket). The verifier forbids
/// adding an offset to a socket pointer, so the pointer goes through a per-CPU map word first,
/// from which it reads back as a number (allowed to a loader with CAP_PERFMON, which the
/// observer needs anyway).
#[inline(always)]
fn cookie_of(sk: *const u8) -> Result<u64, ()> {
    let word = SCRATCH.get_ptr_mut(0).ok_or(())?;
    let addr = unsafe {
        core::ptr::write_volatile(word, sk as u64);
        core::ptr::read_volatile(word)
    };
    let offset = unsafe { core::ptr::read_volatile(&SK_COOKIE_OFFSET) };
    if offset == 0 {
        return Err(());
    }
    unsafe { bpf_probe_read_kernel((addr + u64::from(offset)) as *const u64) }.map_err(|_| ())
}
