//! Where `gateway run`'s log goes: to stderr through a bounded queue and a thread of its own,
//! so that no worker and not the main thread ever waits for stderr.
//!
//! A stderr that stops taking lines is ordinary in production: a journald that stalls on a
//! slow disk, a container runtime's log driver in blocking mode whose consumer lags, a pipe
//! that nobody reads. Written in place, as before, the first line after the pipe filled up
//! held its thread: a worker stopped serving every connection it had, and the main thread its
//! signals, reloads and admin listener.
//!
//! Now the writer thread waits instead, and the queue fills. A line that finds the queue full
//! is dropped and counted (`gateway_log_lines_lost_total{reason="queue_full"}`), and once
//! there is room again the log says how many were lost. Lines stderr refuses (a closed pipe:
//! `EPIPE`) are counted as `write_error`; the log cannot say that itself. At exit the lines
//! still queued get [`EXIT_FLUSH`] to reach stderr.

use std::{
    cell::RefCell,
    io::{self, Write},
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::metrics::ReasonLabels;

/// Lines queued for stderr: about 1.5 MiB at a typical line's 200 bytes. A burst of warnings
/// fits; a stderr stalled for good loses lines past it, counted.
pub const QUEUE_LINES: usize = 8 * 1024;

/// At exit, how long the lines still queued may take to reach stderr.
pub const EXIT_FLUSH: Duration = Duration::from_secs(1);

/// Bytes gathered into one write.
const BATCH_BYTES: usize = 64 * 1024;

/// Lines lost, by reason (`queue_full`, `write_error`): the family `gateway run`'s metrics
/// register (`gateway_log_lines_lost_total`). It exists before the metrics do, so the lines
/// lost at start are counted too.
pub static LOST: LazyLock<Family<ReasonLabels, Counter>> = LazyLock::new(Family::default);

fn lost(reason: &'static str) -> Counter {
    LOST.get_or_create(&ReasonLabels { reason }).clone()
}

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it was written (or refused).
    Flush(SyncSender<()>),
}

/// The log's writer (`Arc<Queue>` is a `MakeWriter`): each formatted line is queued whole.
pub struct Queue {
    tx: SyncSender<Msg>,
    queue_full: Counter,
    /// Lines dropped for a full queue that the log has not said yet.
    unsaid: Arc<AtomicU64>,
}

thread_local! {
    /// On the writer thread, the lines it logs itself (the note of lost lines): they go into
    /// its next write, never through the queue, which may be full.
    static OWN: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

impl Write for &Queue {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let own = OWN.with_borrow_mut(|own| own.as_mut().map(|b| b.extend_from_slice(line)));
        if own.is_some() {
            return Ok(line.len());
        }
        match self.tx.try_send(Msg::Line(line.to_vec())) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.queue_full.inc();
                self.unsaid.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Held for as long as the log runs; dropped, it waits up to [`EXIT_FLUSH`] for the queued
/// lines to be written.
pub struct Guard {
    tx: SyncSender<Msg>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let deadline = Instant::now() + EXIT_FLUSH;
        let (done, written) = sync_channel(1);
        let mut flush = Msg::Flush(done);
        // A queue still full at the deadline is a stalled stderr: its lines are lost.
        loop {
            match self.tx.try_send(flush) {
                Ok(()) => {
                    let _ =
                        written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
                    return;
                }
                Err(TrySendError::Full(again)) if Instant::now() < deadline => {
                    flush = again;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    }
}

/// Starts the writer thread on `out` (stderr, or a test's pipe).
pub fn start(out: Box<dyn Write + Send>) -> io::Result<(Arc<Queue>, Guard)> {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let unsaid = Arc::new(AtomicU64::new(0));
    let said = unsaid.clone();
    std::thread::Builder::new()
        .name("log".into())
        .spawn(move || write_out(&rx, out, &said, &lost("write_error")))?;
    let queue = Queue {
        tx: tx.clone(),
        queue_full: lost("queue_full"),
        unsaid,
    };
    Ok((Arc::new(queue), Guard { tx }))
}

/// The writer thread: what is queued, in writes of up to [`BATCH_BYTES`], until every sender
/// is gone.
fn write_out(
    rx: &Receiver<Msg>,
    mut out: Box<dyn Write + Send>,
    unsaid: &AtomicU64,
    write_error: &Counter,
) {
    OWN.set(Some(Vec::new()));
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut flushed = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut lines = note_lost(unsaid, &mut batch);
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    batch.extend_from_slice(&line);
                    lines += 1;
                }
                Msg::Flush(done) => flushed.push(done),
            }
            next = if batch.len() < BATCH_BYTES {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() && out.write_all(&batch).and_then(|()| out.flush()).is_err() {
            write_error.inc_by(lines);
        }
        batch.clear();
        for done in flushed.drain(..) {
            let _ = done.try_send(());
        }
    }
}

/// The lines dropped for a full queue since the last note, said in the log (formatted by it,
/// so in its format) at the start of `batch`; returns the lines it added (0 or 1). A loss
/// leaves the queue full, so a write always follows it, with its note.
fn note_lost(unsaid: &AtomicU64, batch: &mut Vec<u8>) -> u64 {
    let n = unsaid.swap(0, Ordering::Relaxed);
    if n == 0 {
        return 0;
    }
    tracing::warn!(
        lost = n,
        "log lines lost: stderr did not take them as fast as they came (gateway_log_lines_lost_total{{reason=\"queue_full\"}})"
    );
    OWN.with_borrow_mut(|own| batch.append(own.get_or_insert_default()));
    1
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An output that takes nothing until `open` is set, then keeps what it is given.
    #[derive(Clone, Default)]
    struct Stalled {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, cv) = &*self.open;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn counted(reason: &'static str) -> u64 {
        lost(reason).get()
    }

    #[test]
    fn a_stalled_output_never_blocks_a_line_and_the_overflow_is_counted() {
        let out = Stalled::default();
        let (queue, guard) = start(Box::new(out.clone())).unwrap();
        let before = counted("queue_full");
        let started = std::time::Instant::now();
        let n = 2 * QUEUE_LINES;
        for i in 0..n {
            // 100 bytes: the writer's stalled batch (64 KiB) holds about 650 of them.
            (&*queue)
                .write_all(format!("line {i:<94}\n").as_bytes())
                .unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "queued without waiting for the output: {:?}",
            started.elapsed()
        );
        // The writer holds one batch in its stalled write and the queue is full: the rest,
        // about QUEUE_LINES - 650, were dropped.
        let dropped = counted("queue_full") - before;
        assert!(
            (QUEUE_LINES as u64 / 2..=QUEUE_LINES as u64).contains(&dropped),
            "{dropped} dropped"
        );
        *out.open.0.lock().unwrap() = true;
        out.open.1.notify_all();
        drop(guard);
        let got = String::from_utf8(out.got.lock().unwrap().clone()).unwrap();
        assert_eq!(
            got.lines().count() as u64,
            n as u64 - dropped,
            "every line not dropped is written, in order, before the guard's drop returns"
        );
        assert!(got.starts_with("line 0 "));
    }

    #[test]
    fn lines_the_output_refuses_are_counted() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let before = counted("write_error");
        let (queue, guard) = start(Box::new(full)).unwrap();
        for _ in 0..3 {
            (&*queue).write_all(b"a line\n").unwrap();
        }
        drop(guard);
        assert!(counted("write_error") - before >= 3);
    }
}
