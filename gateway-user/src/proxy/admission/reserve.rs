//! The reserve descriptor of each accept loop, for when the process runs out of descriptors
//! (see the module doc of `admission`), and the lock that keeps the process's own accepts from
//! taking the descriptor a swap frees.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    sync::{
        PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{ListenerGate, Rejection, answer};
use crate::proxy::headers::Scheme;

impl ListenerGate {
    /// Out of descriptors: gives up `reserve`, accepts one connection on the descriptor freed,
    /// answers it (plain HTTP) and closes it, then takes a reserve again. Returns whether a
    /// connection was answered.
    pub fn answer_on_reserve(
        &self,
        listener: &TcpListener,
        scheme: Scheme,
        reserve: &mut Option<std::fs::File>,
    ) -> bool {
        // No accept of this process between giving up the reserve and taking it back.
        let _swap = RESERVE_SWAP.write().unwrap_or_else(PoisonError::into_inner);
        let Some(r) = reserve.take() else {
            *reserve = open_reserve();
            return false;
        };
        drop(r);
        // SAFETY: accept4 on our own listening socket, with null address pointers.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        let answered = fd >= 0;
        if answered {
            self.out_of_fds(fd, scheme);
            // SAFETY: closing the descriptor accept4 returned, once.
            unsafe { libc::close(fd) };
        }
        *reserve = open_reserve();
        answered
    }

    /// A connection accepted while the loop has no reserve (the descriptor freed in a swap
    /// went to another of the process's allocations: an upstream connect, a resolver, a
    /// scrape): the reserve is taken back, from this connection's descriptor if there is no
    /// other, which is then answered as out of descriptors instead of served. Without this, a
    /// reserve lost stayed lost, and its listener's queue waited unanswered whenever the
    /// process ran out again. `None`: the connection was answered so.
    pub fn restock(
        &self,
        stream: TcpStream,
        scheme: Scheme,
        reserve: &mut Option<std::fs::File>,
    ) -> Option<TcpStream> {
        if reserve.is_some() || UNAVAILABLE.load(Ordering::Relaxed) {
            return Some(stream);
        }
        let _swap = RESERVE_SWAP.write().unwrap_or_else(PoisonError::into_inner);
        *reserve = open_reserve();
        // Only for want of a descriptor: with no `/dev/null` to open, every connection would
        // be turned away.
        if reserve.is_some() || UNAVAILABLE.load(Ordering::Relaxed) {
            return Some(stream);
        }
        self.out_of_fds(stream.as_raw_fd(), scheme);
        drop(stream);
        *reserve = open_reserve();
        None
    }

    /// Counts the connection on `fd` as turned away for want of descriptors, and answers it
    /// (plain HTTP) without waiting; the caller closes it.
    fn out_of_fds(&self, fd: RawFd, scheme: Scheme) {
        self.rejected[Rejection::FdExhausted as usize].inc();
        if scheme == Scheme::Http {
            let text = answer(Rejection::FdExhausted);
            // SAFETY: a valid buffer on a descriptor of an open connection.
            unsafe {
                libc::send(
                    fd,
                    text.as_ptr().cast(),
                    text.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
                libc::shutdown(fd, libc::SHUT_WR);
            }
        }
    }
}

/// Held for writing while an accept loop swaps its reserve descriptor for a connection
/// ([`ListenerGate::answer_on_reserve`]), and for reading by every [`accept`].
static RESERVE_SWAP: RwLock<()> = RwLock::new(());

/// `listener.accept()`, never while an accept loop swaps its reserve (see the module doc).
/// For every listener of the process, the admin one too.
pub(crate) async fn accept(listener: &TcpListener) -> std::io::Result<(TcpStream, SocketAddr)> {
    std::future::poll_fn(|cx| {
        let _swap = RESERVE_SWAP.read().unwrap_or_else(PoisonError::into_inner);
        listener.poll_accept(cx)
    })
    .await
}

/// Set once `/dev/null` failed to open for a reason other than the process being out of
/// descriptors (a chroot without `/dev`): no loop has a reserve then, and none takes one back
/// from a connection ([`ListenerGate::restock`]).
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// The descriptor an accept loop keeps in reserve for when the process runs out. `None` when
/// the process is out of descriptors, or when `/dev/null` cannot be opened (logged once).
pub(crate) fn open_reserve() -> Option<std::fs::File> {
    open_at("/dev/null", &UNAVAILABLE)
}

/// [`open_reserve`], of `path`, setting `unavailable`.
fn open_at(path: &str, unavailable: &AtomicBool) -> Option<std::fs::File> {
    match std::fs::File::open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
            if !out_of_fds && !unavailable.swap(true, Ordering::Relaxed) {
                warn!(error = %e, path, "cannot open the accept loops' reserve descriptor: out of file descriptors, connections will wait in the accept queue instead of being answered 503");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `/dev/null` (a chroot without `/dev`), the reserve is unavailable for good, and
    /// `restock` then serves connections instead of turning each away to get one.
    #[test]
    fn a_reserve_that_cannot_be_opened_is_unavailable_not_out_of_descriptors() {
        let unavailable = AtomicBool::new(false);
        assert!(open_at("/dev/null", &unavailable).is_some());
        assert!(!unavailable.load(Ordering::Relaxed));
        assert!(open_at("/nonexistent/null", &unavailable).is_none());
        assert!(unavailable.load(Ordering::Relaxed));
    }
}
