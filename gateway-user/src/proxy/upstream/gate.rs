//! The order between a connection's sends and the drop of hyper's dispatcher ([`SendGate`]),
//! and the connection task that keeps it ([`drive`]).

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use tracing::debug;

use crate::signals::SignalSource;

/// Orders a connection's sends before the drop of hyper's dispatcher, which holds the
/// receiving end of the connection's request queue (a tokio unbounded channel).
///
/// A send reserves its place in the queue, then writes the request into it; dropping the
/// receiver closes the queue, then drops the requests in it (each answered "connection closed",
/// with the request handed back, which `request::attempt` sends again). A send that reserved its
/// place before the close but wrote after the drain (a worker preempted in between, as under
/// heavy load) leaves its request in the queue until the last sender of the connection is
/// dropped, and the request itself holds one: nothing answers it until the response timeout
/// (tokio-rs/tokio#7714 is the same race through a `Permit`). So `drive`, once the dispatcher
/// is done, closes the gate and waits for the sends already in it before dropping the
/// dispatcher, and a send that finds the gate closed waits for that drop, then fails at once
/// with its request handed back.
#[derive(Default)]
pub(crate) struct SendGate {
    closed: AtomicBool,
    /// Sends between their look at `closed` and the end of their push into the queue.
    sending: AtomicUsize,
    /// Told by the last send out of the gate once it is closed.
    idle: Notify,
    dropped: AtomicBool,
    on_drop: Notify,
}

/// One send inside the gate; leaves it when dropped (also on a panic in the push).
pub(crate) struct Entered<'a>(&'a SendGate);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let gate = self.0;
        if gate.sending.fetch_sub(1, Ordering::SeqCst) == 1 && gate.closed.load(Ordering::SeqCst) {
            gate.idle.notify_waiters();
        }
    }
}

impl SendGate {
    /// Enters for one send (a push into the queue, no await): `None` when the dispatcher is
    /// going away. `SeqCst` with [`SendGate::close`]: either the send sees `closed`, or
    /// `close` sees the send and waits for it.
    pub(super) fn enter(&self) -> Option<Entered<'_>> {
        self.sending.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(self);
        (!self.closed.load(Ordering::SeqCst)).then_some(entered)
    }

    /// Whether sends are turned away (the dispatcher is done or dropped).
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// The dispatcher is done: no send enters from now on; returns once those in the gate
    /// are out (a push takes microseconds, or the time its thread is preempted).
    pub(super) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if self.sending.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The dispatcher and its queue are dropped: a send now fails at once.
    pub(super) fn dropped(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.dropped.store(true, Ordering::SeqCst);
        self.on_drop.notify_waiters();
    }

    /// For a send that found the gate closed.
    pub(super) async fn wait_dropped(&self) {
        let notified = self.on_drop.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if self.dropped.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

/// Runs a connection's task until it ends, then adds the RTOs of the kernel's final record of
/// it (the socket is closed once the task is done, see `telemetry`). HTTP/2: the task is
/// hyper's dispatcher, which ends at the upstream's GOAWAY while the streams below it go on;
/// it is dropped, with its request queue, only once no send is pushing into that queue (see
/// [`SendGate`]). `rtos` is the endpoint's counter.
pub(super) async fn drive<F>(
    conn: F,
    addr: SocketAddr,
    signals: Arc<dyn SignalSource>,
    rtos: Counter,
    cookie: u64,
    gate: Option<Arc<SendGate>>,
) where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    // Tells the sends waiting for the drop, even when this task is dropped unfinished
    // (declared first: dropped after `conn`).
    let dropped = gate.as_ref().map(|g| GateDropped(g.clone()));
    {
        let mut conn = std::pin::pin!(conn);
        if let Err(e) = conn.as_mut().await {
            debug!(upstream = %addr, cookie, error = %e, "upstream connection ended");
        }
        if let Some(g) = &gate {
            g.close().await;
        }
    }
    drop(dropped);
    if let Some(ev) = signals.established_evidence(cookie)
        && ev.rtos > 0
    {
        rtos.inc_by(u64::from(ev.rtos));
    }
}

/// Marks the dispatcher dropped when dropped (after it: see `drive`).
struct GateDropped(Arc<SendGate>);

impl Drop for GateDropped {
    fn drop(&mut self) {
        self.0.dropped();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::UserspaceOnly;
    use std::pin::Pin;

    /// Polls `f` once, with a waker that does nothing.
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    #[test]
    fn the_dispatcher_is_dropped_only_once_no_send_is_in_the_gate() {
        let gate = SendGate::default();
        // A send in the gate (pushing into hyper's queue) when the dispatcher ends.
        let entered = gate.enter().expect("open");
        let mut close = std::pin::pin!(gate.close());
        assert!(poll_once(close.as_mut()).is_pending(), "waits for the send");
        // From now on a send does not enter: it waits for the drop.
        assert!(gate.enter().is_none());
        let mut waiting = std::pin::pin!(gate.wait_dropped());
        assert!(poll_once(waiting.as_mut()).is_pending());
        drop(entered);
        assert!(poll_once(close.as_mut()).is_ready());
        assert!(poll_once(waiting.as_mut()).is_pending(), "not dropped yet");
        gate.dropped();
        assert!(poll_once(waiting.as_mut()).is_ready());
        // Told before it waited: at once.
        assert!(poll_once(std::pin::pin!(gate.wait_dropped())).is_ready());
    }

    /// A stand-in for hyper's dispatcher: done at once (`done`) or never, and flags its drop
    /// (which drops the connection's request queue).
    struct Dispatcher {
        done: bool,
        dropped: Arc<AtomicBool>,
    }

    impl Future for Dispatcher {
        type Output = hyper::Result<()>;
        fn poll(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Self::Output> {
            if self.done {
                std::task::Poll::Ready(Ok(()))
            } else {
                std::task::Poll::Pending
            }
        }
    }

    impl Drop for Dispatcher {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn drive_with(
        done: bool,
        gate: &Arc<SendGate>,
    ) -> (tokio::task::JoinHandle<()>, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let conn = Dispatcher {
            done,
            dropped: dropped.clone(),
        };
        let signals: Arc<dyn SignalSource> = Arc::new(UserspaceOnly::default());
        let addr = "127.0.0.1:1".parse().unwrap();
        let task = drive(
            conn,
            addr,
            signals,
            Counter::default(),
            1,
            Some(gate.clone()),
        );
        (tokio::spawn(task), dropped)
    }

    /// The order `gate::SendGate` exists for, through `drive` itself: the dispatcher is done
    /// while a send is pushing into its queue; `drive` closes the gate, keeps the dispatcher
    /// (and its queue) until that send is out, and only then drops it and tells the sends that
    /// found the gate closed. Deterministic: one thread, and `drive` runs only when the test
    /// yields.
    #[tokio::test]
    async fn drive_drops_the_dispatcher_only_once_no_send_is_in_the_gate() {
        let gate = Arc::new(SendGate::default());
        let pushing = gate.enter().expect("the gate is open");
        let (task, dropped) = drive_with(true, &gate);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(gate.is_closed(), "the dispatcher is done: no send enters");
        assert!(gate.enter().is_none());
        assert!(
            !dropped.load(Ordering::SeqCst),
            "kept while a send is in the gate"
        );
        assert!(!task.is_finished());
        let mut told = std::pin::pin!(gate.wait_dropped());
        assert!(poll_once(told.as_mut()).is_pending(), "not dropped yet");
        drop(pushing);
        task.await.unwrap();
        assert!(dropped.load(Ordering::SeqCst));
        assert!(
            poll_once(told.as_mut()).is_ready(),
            "the waiting send is told"
        );
    }

    /// A connection task dropped before its dispatcher is done (the runtime shutting down)
    /// still tells the sends waiting for the drop.
    #[tokio::test]
    async fn a_drive_dropped_unfinished_tells_the_waiting_sends() {
        let gate = Arc::new(SendGate::default());
        let (task, dropped) = drive_with(false, &gate);
        tokio::task::yield_now().await;
        assert!(!gate.is_closed());
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(dropped.load(Ordering::SeqCst));
        assert!(
            gate.enter().is_none(),
            "a send after the drop fails at once"
        );
        assert!(poll_once(std::pin::pin!(gate.wait_dropped())).is_ready());
    }
}
