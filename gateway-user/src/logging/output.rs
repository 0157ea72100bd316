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

use super::std_stream::PIPE_BUF;
use crate::metrics::ReasonLabels;

/// Lines queued for stderr: about 1.5 MiB at a typical line's 200 bytes. A burst of warnings
/// fits; a stderr stalled for good loses lines past it, counted.
pub const QUEUE_LINES: usize = 8 * 1024;

/// At exit, how long the lines still queued may take to reach stderr.
pub const EXIT_FLUSH: Duration = Duration::from_secs(1);

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
    /// The writer, until [`Guard::start_writer`] gives it a thread.
    pending: Option<Writer>,
}

impl Guard {
    /// Starts the writer thread. Until then, lines wait in the queue: `gateway run` starts it
    /// once the steps that need a single-threaded process are done.
    pub fn start_writer(&mut self) -> io::Result<()> {
        if let Some(mut w) = self.pending.take() {
            std::thread::Builder::new()
                .name("log".into())
                .spawn(move || w.run())?;
        }
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Never started (an exit before it was due): what is queued is written here.
        if let Some(mut w) = self.pending.take() {
            while let Ok(msg) = w.rx.try_recv() {
                w.take(msg);
            }
            w.out.write();
            return;
        }
        flush_within(&self.tx, EXIT_FLUSH, Msg::Flush);
    }
}

/// Sends a writer thread the flush `make` builds around its answer, and waits until it is
/// answered (every line queued before it written), up to `limit`. A queue still full at the
/// limit is an output that stalled: its lines are lost.
pub(crate) fn flush_within<M>(
    tx: &SyncSender<M>,
    limit: Duration,
    make: impl FnOnce(SyncSender<()>) -> M,
) {
    let deadline = Instant::now() + limit;
    let (done, written) = sync_channel(1);
    let mut flush = make(done);
    loop {
        match tx.try_send(flush) {
            Ok(()) => {
                let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
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

/// The queue, and its writer on `out` (stderr, or a test's pipe), not started yet
/// ([`Guard::start_writer`]).
pub fn queue(out: Box<dyn Write + Send>) -> (Arc<Queue>, Guard) {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let unsaid = Arc::new(AtomicU64::new(0));
    let writer = Writer {
        rx,
        out: Batch {
            out,
            buf: Vec::with_capacity(PIPE_BUF),
            lines: 0,
            write_error: lost("write_error"),
        },
        unsaid: unsaid.clone(),
    };
    let queue = Queue {
        tx: tx.clone(),
        queue_full: lost("queue_full"),
        unsaid,
    };
    let guard = Guard {
        tx,
        pending: Some(writer),
    };
    (Arc::new(queue), guard)
}

/// The writer thread's side of the queue.
struct Writer {
    rx: Receiver<Msg>,
    out: Batch,
    unsaid: Arc<AtomicU64>,
}

impl Writer {
    /// Writes what is queued, as it comes, until every sender is gone.
    fn run(&mut self) {
        OWN.set(Some(Vec::new()));
        while let Ok(first) = self.rx.recv() {
            self.note_lost();
            let mut next = Some(first);
            while let Some(msg) = next {
                self.take(msg);
                next = self.rx.try_recv().ok();
            }
            self.out.write();
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Line(line) => self.out.push(&line),
            Msg::Flush(done) => {
                self.out.write();
                let _ = done.try_send(());
            }
        }
    }

    /// The lines dropped for a full queue since the last note, said in the log (formatted by
    /// it, so in its format) ahead of what comes next. A loss leaves the queue full, so a write
    /// always follows it, with its note. A level that leaves warnings out leaves it out too.
    fn note_lost(&mut self) {
        let n = self.unsaid.swap(0, Ordering::Relaxed);
        if n == 0 {
            return;
        }
        tracing::warn!(
            lost = n,
            "log lines lost: stderr did not take them as fast as they came (gateway_log_lines_lost_total{{reason=\"queue_full\"}})"
        );
        let note = OWN.with_borrow_mut(|own| own.as_mut().map(std::mem::take));
        if let Some(note) = note.filter(|n| !n.is_empty()) {
            self.out.push(&note);
        }
    }
}

/// Lines gathered into writes of at most `PIPE_BUF` bytes, cut between lines: a pipe writes
/// that much at once, so a line never interleaves with another process's on the same stderr
/// (the old and the new process during a `SIGUSR2` handover).
struct Batch {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    lines: u64,
    write_error: Counter,
}

impl Batch {
    fn push(&mut self, line: &[u8]) {
        if !self.buf.is_empty() && self.buf.len() + line.len() > PIPE_BUF {
            self.write();
        }
        self.buf.extend_from_slice(line);
        self.lines += 1;
    }

    /// Writes what is gathered; lines stderr refuses are counted.
    fn write(&mut self) {
        if !self.buf.is_empty()
            && self
                .out
                .write_all(&self.buf)
                .and_then(|()| self.out.flush())
                .is_err()
        {
            self.write_error.inc_by(self.lines);
        }
        self.buf.clear();
        self.lines = 0;
    }
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
        let (queue, mut guard) = queue(Box::new(out.clone()));
        guard.start_writer().unwrap();
        let before = counted("queue_full");
        let started = std::time::Instant::now();
        let n = 2 * QUEUE_LINES;
        for i in 0..n {
            // 100 bytes: the writer's stalled write holds 40 of them.
            (&*queue)
                .write_all(format!("line {i:<94}\n").as_bytes())
                .unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "queued without waiting for the output: {:?}",
            started.elapsed()
        );
        // The writer holds one write's lines and the queue is full: the rest, about
        // QUEUE_LINES - 40, were dropped.
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
        let (queue, mut guard) = queue(Box::new(full));
        guard.start_writer().unwrap();
        for _ in 0..3 {
            (&*queue).write_all(b"a line\n").unwrap();
        }
        drop(guard);
        assert!(counted("write_error") - before >= 3);
    }
}
