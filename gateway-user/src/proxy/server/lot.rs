//! A worker's parking lot: its parked client connections, each one entry of a slab (the
//! socket, who the client is, its place in `max_client_connections`, its deadline), all
//! waited on through one epoll set of the lot's own.
//!
//! A parked connection has no task, no hyper connection and no tokio registration: about a
//! hundred bytes in one array, instead of the scattered objects a waiting task keeps, which
//! with glibc's allocator also pinned the pages around them (10 KiB of RSS per idle
//! connection with the task waiting, measured). When its socket becomes readable (a new
//! request, a close, an error), the lot hands it back to tokio and starts its task again
//! (`park::resume`); when its deadline passes (the head-read timeout, which bounds an idle
//! keep-alive connection), or at the drain, the lot closes it.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap},
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::Arc,
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    time::Instant,
};
use tracing::warn;

use super::{
    super::{admission, io::peek, shared::Drain},
    Listener, Phase, Shared, park,
};

/// A connection handed to the lot.
pub(super) struct Parked {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub on: Listener,
    pub permit: admission::Permit,
    /// When it is closed if the client sends nothing.
    pub deadline: Instant,
}

/// A handle to the worker's lot.
#[derive(Clone)]
pub(super) struct Lot(mpsc::UnboundedSender<Parked>);

impl Lot {
    /// Starts the lot of the calling worker: a task that ends at the drain, closing the
    /// connections it holds.
    pub fn start(shared: Arc<Shared>, drain: Drain) -> Lot {
        let (tx, rx) = mpsc::unbounded_channel();
        let lot = Lot(tx);
        match Epoll::new() {
            Ok(ep) => {
                tokio::spawn(run(ep, rx, shared, drain, lot.clone()));
            }
            // No lot: connections are closed instead of parked (`park` fails).
            Err(e) => warn!(error = %e, "no parking lot for idle connections: epoll_create1"),
        }
        lot
    }

    /// Parks a connection; gives it back if the lot is gone (the drain started).
    pub fn park(&self, p: Parked) -> Result<(), Parked> {
        self.0.send(p).map_err(|e| e.0)
    }
}

/// An entry of the slab.
struct Entry {
    conn: Parked,
    generation: u32,
    _counted: admission::Parked,
}

struct Slab {
    entries: Vec<Option<Entry>>,
    /// Free slots; the lowest is taken first, so that the entries stay at the front and the
    /// array shrinks after a burst.
    free: BTreeSet<u32>,
    /// Entries in use.
    used: usize,
    generation: u32,
    /// Deadlines, the earliest first; an entry that left before its deadline is skipped by
    /// its generation.
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
}

impl Slab {
    fn new() -> Slab {
        Slab {
            entries: Vec::new(),
            free: BTreeSet::new(),
            used: 0,
            generation: 0,
            deadlines: BinaryHeap::new(),
        }
    }

    fn insert(&mut self, conn: Parked, counted: admission::Parked) -> (u32, u32) {
        self.generation = self.generation.wrapping_add(1);
        let slot = self.free.pop_first().unwrap_or_else(|| {
            self.entries.push(None);
            (self.entries.len() - 1) as u32
        });
        self.deadlines
            .push(Reverse((conn.deadline, slot, self.generation)));
        self.entries[slot as usize] = Some(Entry {
            conn,
            generation: self.generation,
            _counted: counted,
        });
        self.used += 1;
        (slot, self.generation)
    }

    fn take(&mut self, slot: u32, generation: u32) -> Option<Parked> {
        let e = self.entries.get_mut(slot as usize)?;
        if e.as_ref().is_none_or(|e| e.generation != generation) {
            return None;
        }
        let conn = e.take().map(|e| e.conn);
        self.used -= 1;
        self.free.insert(slot);
        self.shrink();
        conn
    }

    /// Gives back what a burst of parked connections left behind: the free entries at the
    /// end of the array, and the deadlines of entries that are gone.
    fn shrink(&mut self) {
        while matches!(self.entries.last(), Some(None)) {
            self.entries.pop();
            self.free.remove(&(self.entries.len() as u32));
        }
        if self.entries.capacity() > 64 && self.entries.capacity() > 4 * self.entries.len() {
            self.entries.shrink_to(2 * self.entries.len());
        }
        if self.deadlines.len() > 64 && self.deadlines.len() > 4 * self.used {
            let entries = &self.entries;
            self.deadlines.retain(|Reverse((_, slot, generation))| {
                entries
                    .get(*slot as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|e| e.generation == *generation)
            });
            self.deadlines.shrink_to(2 * self.deadlines.len());
        }
    }

    /// Closes the connections whose deadline passed; the next deadline.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&Reverse((at, slot, generation))) = self.deadlines.peek() {
            if at > now {
                return Some(at);
            }
            self.deadlines.pop();
            // Dropped: the socket closes, its permit and count are given back.
            drop(self.take(slot, generation));
        }
        None
    }
}

/// The lot's own epoll set, registered with tokio as one readable descriptor.
struct Epoll(AsyncFd<OwnedFd>);

impl Epoll {
    fn new() -> std::io::Result<Epoll> {
        // SAFETY: epoll_create1 with a valid flag; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an OwnedFd keeps its descriptor open until dropped and always returns the
        // same one from as_raw_fd().
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => Ok(Epoll(fd)),
            Err(e) => Err(e.into()),
        }
    }

    fn ctl(&self, op: libc::c_int, fd: i32, key: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: key,
        };
        // SAFETY: both descriptors are open; `ev` is a valid event for the call.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The keys and events of the sockets that are ready, without waiting; empty when none is.
    fn ready(&self, out: &mut Vec<(u64, u32)>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: `events` has room for `events.len()` entries; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.0.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n <= 0 {
                return;
            }
            let n = n as usize;
            out.extend(events[..n].iter().map(|e| (e.u64, e.events)));
            if n < events.len() {
                return;
            }
        }
    }
}

fn key(slot: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(slot)
}

async fn run(
    ep: Epoll,
    mut rx: mpsc::UnboundedReceiver<Parked>,
    shared: Arc<Shared>,
    drain: Drain,
    lot: Lot,
) {
    let mut phase = drain.phase.clone();
    let mut slab = Slab::new();
    let mut next: Option<Instant> = None;
    let mut keys = Vec::new();
    loop {
        if matches!(*phase.borrow(), Phase::Drain | Phase::Force) {
            return;
        }
        tokio::select! {
            Some(p) = rx.recv() => {
                let fd = p.stream.as_raw_fd();
                let deadline = p.deadline;
                let (slot, generation) = slab.insert(p, shared.admission.park());
                if let Err(e) = ep.ctl(libc::EPOLL_CTL_ADD, fd, key(slot, generation)) {
                    warn!(error = %e, "cannot park an idle connection: epoll_ctl; closing it");
                    drop(slab.take(slot, generation));
                } else if next.is_none_or(|n| deadline < n) {
                    next = Some(deadline);
                }
            }
            guard = ep.0.readable() => {
                let Ok(mut guard) = guard else { return };
                keys.clear();
                ep.ready(&mut keys);
                if keys.is_empty() {
                    guard.clear_ready();
                }
                for &(k, events) in &keys {
                    if let Some(p) = slab.take(k as u32, (k >> 32) as u32) {
                        if closed(&p.stream, events) {
                            // Dropped: closed here, without a task and a parser to read the EOF
                            // (a burst of clients going away would otherwise start one each).
                            continue;
                        }
                        let _ = ep.ctl(libc::EPOLL_CTL_DEL, p.stream.as_raw_fd(), 0);
                        wake(p, &shared, &drain, &lot);
                    }
                }
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                next = slab.expire(Instant::now());
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Whether the client closed (or reset) the connection and left nothing to read: a hang-up
/// event, and a peek that finds the end of the stream or an error.
fn closed(stream: &std::net::TcpStream, events: u32) -> bool {
    let hangup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
    if events & hangup == 0 {
        return false;
    }
    !matches!(peek(stream.as_raw_fd(), &mut [0u8]), Ok(1..))
}

/// Hands a connection whose client sent something (or closed) back to tokio and serves it.
fn wake(p: Parked, shared: &Arc<Shared>, drain: &Drain, lot: &Lot) {
    let Parked {
        stream,
        peer,
        on,
        permit,
        ..
    } = p;
    match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => {
            let client = super::client(peer, on, None, drain.clone());
            tokio::spawn(park::resume(
                stream,
                client,
                permit,
                shared.clone(),
                lot.clone(),
            ));
        }
        Err(e) => warn!(client = %peer, error = %e, "cannot serve a parked connection again"),
    }
}
