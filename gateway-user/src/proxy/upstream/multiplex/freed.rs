//! Wake-ups of requests waiting for room on an endpoint's HTTP/2 connections.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Wakes requests waiting for a stream or a connection of an endpoint; costs nothing when
/// none waits.
#[derive(Default)]
pub(crate) struct Freed {
    notify: Notify,
    waiters: AtomicUsize,
}

impl Freed {
    pub fn notify(&self) {
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// A future that completes at the next [`Freed::notify`] after this call: registered at
    /// once, so that the caller may look for a stream afterwards and still not miss a
    /// wake-up in between.
    pub fn waiter(&self) -> Waiter<'_> {
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let count = Decrement(&self.waiters);
        let mut notified = Box::pin(self.notify.notified());
        notified.as_mut().enable();
        Waiter {
            notified,
            _count: count,
        }
    }
}

/// See [`Freed::waiter`].
pub(crate) struct Waiter<'a> {
    notified: std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>,
    _count: Decrement<'a>,
}

impl std::future::Future for Waiter<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.notified.as_mut().poll(cx)
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
