//! The stream's memory of connects, by socket cookie: the pure half of
//! [`super::ObserverStream`]. Time is passed in (the kernel's CLOCK_MONOTONIC, in ns, the time
//! base of the records), so it is tested without a kernel and without sleeping.
//!
//! Two jobs on one table:
//!
//! - **The `SO_ERROR` join.** The kernel sends a connect's outcome the moment it happens, and
//!   the application reads `SO_ERROR` only after it has been woken (poll-style clients: Go's
//!   net package, tokio). That read arrives as a follow-up record with the same cookie. A new
//!   outcome is *pending* until its follow-up arrives or the join window passes; then it is
//!   *released*, complete, exactly once.
//! - **Lookups by cookie.** Every connect stays findable, with its follow-up once that came,
//!   for `remember_for` after its outcome arrived (and at least until it is released). At most
//!   `max_remembered` are kept: the oldest go first, and a pending one is released as it goes.

use std::collections::{HashMap, VecDeque};

use super::{Drained, StreamOptions};
use crate::observer::records::{Connect, Decoded, SoErrorRead};

struct Entry {
    connect: Connect,
    arrived_ns: u64,
    pending: bool,
}

pub struct ConnectIndex {
    window_ns: u64,
    /// How long an entry is kept: `remember_for`, but at least the join window.
    keep_ns: u64,
    max: usize,
    entries: HashMap<u64, Entry>,
    /// `(arrived_ns, cookie)` of every outcome, oldest first. A pair whose cookie arrived
    /// again later (a socket that connected again) no longer matches its entry and is skipped.
    arrivals: VecDeque<(u64, u64)>,
    /// The same, for outcomes waiting for their `SO_ERROR` read.
    pending: VecDeque<(u64, u64)>,
    late_so_errors: u64,
}

fn ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl ConnectIndex {
    pub fn new(options: &StreamOptions) -> ConnectIndex {
        let window_ns = ns(options.join_window);
        ConnectIndex {
            window_ns,
            keep_ns: ns(options.remember_for).max(window_ns),
            max: options.max_remembered,
            entries: HashMap::new(),
            arrivals: VecDeque::new(),
            pending: VecDeque::new(),
            late_so_errors: 0,
        }
    }

    /// Feeds one decoded record, drained at `now_ns`.
    pub fn push(&mut self, d: Decoded, now_ns: u64, out: &mut Drained) {
        match d {
            Decoded::Outcome(c) => self.outcome(c, now_ns, &mut out.connects),
            Decoded::SoError(read) => {
                self.so_error(&read, &mut out.connects);
                out.so_error_reads.push(read);
            }
        }
    }

    fn outcome(&mut self, connect: Connect, now_ns: u64, released: &mut Vec<Connect>) {
        let entry = Entry {
            connect,
            arrived_ns: now_ns,
            pending: true,
        };
        // A socket can connect again after a failure (same cookie): release the old one.
        if let Some(old) = self.entries.insert(connect.cookie, entry)
            && old.pending
        {
            released.push(old.connect);
        }
        self.arrivals.push_back((now_ns, connect.cookie));
        self.pending.push_back((now_ns, connect.cookie));
    }

    fn so_error(&mut self, read: &SoErrorRead, released: &mut Vec<Connect>) {
        match self.entries.get_mut(&read.cookie) {
            Some(e) => {
                e.connect.so_error = Some(read.value);
                if e.pending {
                    e.pending = false;
                    released.push(e.connect);
                } else {
                    self.late_so_errors += 1;
                }
            }
            None => self.late_so_errors += 1,
        }
    }

    /// Releases the outcomes whose join window has passed at `now_ns` (every pending one when
    /// `now_ns` is `u64::MAX`), in the order they happened, and forgets what is older than
    /// `remember_for` or beyond `max_remembered`.
    pub fn expire(&mut self, now_ns: u64, released: &mut Vec<Connect>) {
        let start = released.len();
        while let Some(&(t, cookie)) = self.pending.front() {
            if now_ns.saturating_sub(t) < self.window_ns {
                break;
            }
            self.pending.pop_front();
            if let Some(e) = self.entries.get_mut(&cookie)
                && e.pending
                && e.arrived_ns == t
            {
                e.pending = false;
                released.push(e.connect);
            }
        }
        while let Some(&(t, cookie)) = self.arrivals.front() {
            if self.entries.len() <= self.max && now_ns.saturating_sub(t) < self.keep_ns {
                break;
            }
            self.arrivals.pop_front();
            if self.entries.get(&cookie).is_some_and(|e| e.arrived_ns == t)
                && let Some(e) = self.entries.remove(&cookie)
                && e.pending
            {
                released.push(e.connect);
            }
        }
        released[start..].sort_by_key(|c| c.ts_event_ns);
    }

    pub fn get(&self, cookie: u64) -> Option<&Connect> {
        self.entries.get(&cookie).map(|e| &e.connect)
    }

    pub fn late_so_errors(&self) -> u64 {
        self.late_so_errors
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests;
