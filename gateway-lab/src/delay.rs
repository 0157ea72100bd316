//! The SYN-ACK delayer. This kernel has neither netem nor fq, so delay is made in userspace: an
//! iptables-legacy rule in the upstream namespace's OUTPUT chain sends each SYN-ACK leaving the
//! port to an NFQUEUE, and a thread inside that namespace holds each queued packet for the
//! configured delay, then accepts it. Other packets never enter the queue, so established
//! traffic is not slowed.
//!
//! The netlink socket is opened on that thread, after `setns`: NFQUEUE instances are per network
//! namespace (`net/netfilter/nfnetlink_queue.c`, `nfnl_queue_net`).

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nfq::{Message, Queue, Verdict};

use super::{
    error::{LabError, LabResult},
    netns::Netns,
};

/// The longest the delayer sleeps between polls of its (non-blocking) queue. The `nfq` crate
/// gives no fd to wait on, so this bounds both the extra delay (≤ 1 ms) and the stop latency.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Bytes of each packet copied to userspace: the verdict never rewrites the packet.
const COPY_RANGE: u16 = 128;

static NEXT_QUEUE: AtomicU16 = AtomicU16::new(0);

/// A fresh NFQUEUE number (queues are per namespace, but a process-wide counter keeps rules easy
/// to tell apart in `iptables -S`).
pub(crate) fn next_queue_num() -> u16 {
    NEXT_QUEUE.fetch_add(1, Ordering::Relaxed)
}

/// A running delayer thread; stopping it accepts every packet it still holds.
pub(crate) struct Delayer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    delayed: Arc<AtomicU64>,
}

impl Delayer {
    /// Binds NFQUEUE `queue` inside `netns` and starts holding packets for `delay`. Returns
    /// only after the queue is bound, so a rule added afterwards never hits an unbound queue.
    pub(crate) fn start(netns: &Netns, queue: u16, delay: Duration) -> LabResult<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::sync_channel(1);
        let thread = format!("nfq-delay-{queue}");
        let handle = {
            let (stop, delayed, ns_name) = (
                Arc::clone(&stop),
                Arc::clone(&delayed),
                netns.name().to_owned(),
            );
            netns.spawn_thread(&thread, move || match open_queue(queue) {
                Ok(q) => {
                    let _ = tx.send(Ok(()));
                    hold_loop(q, delay, &stop, &delayed);
                }
                Err((action, source)) => {
                    let _ = tx.send(Err(LabError::Nfqueue {
                        netns: ns_name,
                        queue,
                        action,
                        source,
                    }));
                }
            })?
        };
        match rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                handle: Some(handle),
                delayed,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(LabError::ThreadDied { thread }),
        }
    }

    /// Packets held and released so far.
    pub(crate) fn delayed_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.delayed)
    }

    /// Releases held packets and ends the thread. Idempotent.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take()
            && handle.join().is_err()
        {
            tracing::warn!("NFQUEUE delayer thread panicked");
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_queue(queue: u16) -> Result<Queue, (&'static str, std::io::Error)> {
    let mut q = Queue::open().map_err(|e| ("opening the netlink socket", e))?;
    q.bind(queue).map_err(|e| ("binding the queue", e))?;
    q.set_copy_range(queue, COPY_RANGE)
        .map_err(|e| ("setting the copy range", e))?;
    // If the kernel's queue overflows, let packets through rather than drop them: the fault is
    // "delay", not "loss".
    q.set_fail_open(queue, true)
        .map_err(|e| ("setting fail-open", e))?;
    q.set_nonblocking(true);
    Ok(q)
}

fn hold_loop(mut q: Queue, delay: Duration, stop: &AtomicBool, delayed: &AtomicU64) {
    // Constant delay, so arrival order is release order: a FIFO suffices.
    let mut held: VecDeque<(Instant, Message)> = VecDeque::new();
    let release = |q: &mut Queue, mut msg: Message| {
        // Counted before the verdict: once the kernel has it, the packet can reach the client
        // before this thread runs again, and a caller that saw its connect complete must find
        // the packet counted.
        delayed.fetch_add(1, Ordering::Release);
        msg.set_verdict(Verdict::Accept);
        if let Err(err) = q.verdict(msg) {
            delayed.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(error = %err, "NFQUEUE verdict failed; the packet is lost");
        }
    };
    while !stop.load(Ordering::Acquire) {
        loop {
            match q.recv() {
                Ok(msg) => held.push_back((Instant::now() + delay, msg)),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::warn!(error = %err, "NFQUEUE receive failed");
                    break;
                }
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, msg)) = held.pop_front() {
                release(&mut q, msg);
            }
        }
        let nap = held.front().map_or(POLL_INTERVAL, |(due, _)| {
            due.saturating_duration_since(now).min(POLL_INTERVAL)
        });
        thread::sleep(nap);
    }
    // Closing the socket would make the kernel drop what is still queued; let it through.
    for (_, msg) in held {
        release(&mut q, msg);
    }
}
