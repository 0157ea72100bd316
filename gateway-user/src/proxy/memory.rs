//! Giving memory back after a burst of client connections.
//!
//! mimalloc (the binary's global allocator) keeps the pages freed on a thread in that thread's
//! heap until the thread allocates again and their purge delay has passed; a worker that went
//! quiet after a burst of 10,000 connections would keep them for the rest of its life. So each
//! worker (and the metrics refresher on the main runtime) checks every [`RELEASE_CHECK`]
//! whether the process's client connections fell by [`RELEASE_DROP`] or more since the highest
//! count it saw, and if so asks the allocator to return this thread's free pages
//! (`mi_collect(true)`). Under a steady load nothing happens; after a burst, once.
//! Without mimalloc (tests that run the proxy in their own process) the call finds an empty
//! heap and does nothing.

use std::time::Duration;

// The allocator of the `gateway` binary; linked here so that `mi_collect` resolves in every
// build of the library.
extern crate mimalloc as _;

unsafe extern "C" {
    /// mimalloc's `void mi_collect(bool force)`: frees this thread's empty pages and returns
    /// them to the system (`force`: without waiting for the purge delay).
    fn mi_collect(force: bool);
}

/// How often the connection count is checked.
pub(crate) const RELEASE_CHECK: Duration = Duration::from_secs(1);

/// A fall in open client connections that is worth returning memory for.
pub(crate) const RELEASE_DROP: usize = 256;

/// The highest connection count since memory was last returned.
#[derive(Default)]
pub(crate) struct Releaser {
    high: usize,
}

impl Releaser {
    /// Called every [`RELEASE_CHECK`] with the open client connections; returns this
    /// thread's free memory to the system after a fall of [`RELEASE_DROP`] or more.
    pub fn check(&mut self, open: usize) {
        self.high = self.high.max(open);
        if self.high >= open + RELEASE_DROP {
            // SAFETY: mi_collect has no preconditions; it works on the calling thread's heap.
            unsafe { mi_collect(true) };
            self.high = open;
        }
    }
}

/// A worker's releaser, until the worker ends (the task is aborted then).
pub(crate) async fn release_after_bursts(shared: std::sync::Arc<super::shared::Shared>) {
    let mut every = tokio::time::interval(RELEASE_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut r = Releaser::default();
    loop {
        every.tick().await;
        r.check(shared.admission.open());
    }
}
