//! A future polled only when one of its own wakers fired ([`WhenWoken`]), for the rare
//! branches of a `select!` that sits beside a busy one.
//!
//! `select!` polls every branch at each wake-up of its task. A client connection's task is
//! woken several times per request by hyper's connection, and polling its other branches
//! each time cost about 500 instructions per request on a plain HTTP/1 connection (the park
//! check's timer and the drain's watch, `park`) and 300 on an HTTPS one (the drain's watch,
//! `serve_with`). Behind this gate, they are polled once, then again only when their own waker
//! fired: the gate gives them a waker of its own that notes the wake-up, then wakes the task.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::task::AtomicWaker;

/// Polls `F` only at its first poll and after one of its wakers fired.
pub(super) struct WhenWoken<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
    /// The gate as a waker, made once.
    waker: Waker,
}

/// Whether the inner future was woken since it was last polled, and the task to wake.
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    pub(super) fn new(inner: F) -> Self {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        WhenWoken {
            inner: Box::pin(inner),
            waker: Waker::from(gate.clone()),
            gate,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake-up in between is not lost.
        self.gate.task.register(cx.waker());
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Counts its polls; ready once `ready` is set (by the test, which then wakes it).
    struct Counted<'a> {
        polls: &'a std::cell::Cell<u32>,
        ready: &'a std::cell::Cell<bool>,
        waker: &'a std::cell::RefCell<Option<Waker>>,
    }

    impl Future for Counted<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.set(self.polls.get() + 1);
            if self.ready.get() {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn the_inner_future_is_polled_only_after_its_own_wake_up() {
        let (polls, ready, waker) = Default::default();
        let mut f = std::pin::pin!(WhenWoken::new(Counted {
            polls: &polls,
            ready: &ready,
            waker: &waker,
        }));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 1, "not woken: not polled again");
        ready.set(true);
        waker.borrow_mut().take().unwrap().wake();
        assert!(f.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_behind_the_gate_wakes_its_task() {
        let sleep = tokio::time::sleep(Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        WhenWoken::new(sleep).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
