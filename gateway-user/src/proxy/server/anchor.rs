//! The worker's helper tasks: the timer anchor, and their end with the worker.

use std::time::Duration;

/// How far ahead [`timer_anchor`] keeps a timer due: below the shortest timer a request
/// registers on the way (`HOST_DIED_CHECK`, 200 ms, in `request::attempt`).
const ANCHOR_EVERY: Duration = Duration::from_millis(100);

/// Keeps a timer of the worker's runtime due within [`ANCHOR_EVERY`], so that a request's own
/// timers never wake the event loop it runs on.
///
/// tokio writes to its runtime's eventfd whenever a timer is registered earlier than the
/// earliest one the event loop knew of when it last went to sleep, or when it knew of none
/// (`reregister` in tokio's `runtime/time/mod.rs`). It does so even from the runtime's own,
/// running thread, where the wake-up is useless: the loop then returns from its next
/// `epoll_wait` at once. A worker that goes to sleep with no request in flight (common under
/// load on a few cores: it drains its queue, then waits for the clients) paid one `write(2)`
/// for every request until it slept again: 0.36 per request in `bench profile`'s load, a
/// third of the gateway's extra system calls against HAProxy. With this timer, every
/// request's timers are due later than one the loop already knows. The cost is ten wake-ups a
/// second per worker when idle.
pub(super) async fn timer_anchor() {
    loop {
        tokio::time::sleep(ANCHOR_EVERY).await;
    }
}

/// Aborts the task when dropped (the worker's helper tasks end with the worker, also when it
/// runs as a task on a test's runtime).
pub(super) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
