//! What a lab has running in the background (servers, NFQUEUE delayers, iptables rules, held
//! sockets), so that dropping the [`Lab`](super::Lab) stops all of it even when the guards that
//! the caller holds outlive it, were detached, or the test panicked.

use std::sync::{Arc, Mutex, PoisonError};

/// Something a lab started and must stop. `stop` is idempotent: a guard may stop the item first
/// and the lab again later.
pub(crate) trait Background: Send + Sync {
    fn stop(&self);
    fn is_stopped(&self) -> bool;
}

/// The lab's list of background items.
#[derive(Default)]
pub(crate) struct Registry {
    items: Mutex<Vec<Arc<dyn Background>>>,
}

impl Registry {
    /// Tracks `item` until the lab is dropped; forgets items that were already stopped.
    pub(crate) fn register(&self, item: Arc<dyn Background>) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.retain(|i| !i.is_stopped());
        items.push(item);
    }

    /// Stops every item, newest first (a fault on a server is cleared before the server stops).
    pub(crate) fn stop_all(&self) {
        let items = std::mem::take(&mut *self.items.lock().unwrap_or_else(PoisonError::into_inner));
        for item in items.iter().rev() {
            item.stop();
        }
    }
}
