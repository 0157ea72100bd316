//! The access log: one line per request, plain or JSON, written when the response is over
//! (or abandoned). Lines go through a bounded channel to a writer thread, so a slow disk never
//! stalls the proxy; if the channel is full the line is dropped and counted, and the count is
//! written as soon as there is room. Lines the output refuses (a full disk) are counted too,
//! and said in the gateway's own log at most every 10 s
//! (`gateway_access_log_lines_lost_total{reason}`). [`AccessLogger::reopen`] (SIGUSR1,
//! SIGHUP) makes the writer open the file's path again, so that after logrotate renamed it
//! the log goes to a new file at the configured path.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::Duration,
};

use http::{HeaderValue, Method, Uri, Version};
use smallvec::SmallVec;
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;

use super::{error::ErrorKind, log_every::LogEvery};
use crate::{
    config::{AccessLog, AccessLogFormat, LogOutput},
    logging::std_stream::{PIPE_BUF, StdStream},
    metrics::{GatewayMetrics, ReasonLabels},
};

mod render;
pub(crate) use render::{render, rfc3339};

/// Lines buffered between the proxy and the writer thread.
const CHANNEL_LINES: usize = 16 * 1024;

/// One upstream attempt of a request.
#[derive(Clone, Debug)]
pub(crate) struct Attempt {
    pub endpoint: SocketAddr,
    pub cookie: Option<u64>,
    pub reused: bool,
    pub error: Option<ErrorKind>,
    /// The status of the response this attempt got and gave up for a retry
    /// (`retry.status_codes`).
    pub status: Option<u16>,
}

/// Everything the log line says about one request, filled in as it goes: plain data, built
/// by the request path (see `exchange`), read by the log and the metrics.
pub(crate) struct Record {
    pub start: Instant,
    pub client: SocketAddr,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    /// Inline for the usual one or two attempts: no allocation per request.
    pub attempts: SmallVec<[Attempt; 2]>,
    /// A hedged connect won this request's connection.
    pub hedged: bool,
    /// The error's full text with its kernel evidence, for failed requests.
    pub error_detail: Option<String>,
    pub retries: u32,
    /// The final attempt's TCP connect; `None` when it reused a pooled connection.
    pub connect: Option<Duration>,
    /// From arrival to the upstream's response head.
    pub first_byte: Option<Duration>,
    pub status: u16,
    pub bytes: u64,
    pub error: Option<ErrorKind>,
    /// The client went away before the end of the response.
    pub aborted: bool,
    /// The response began and did not reach the client whole: why
    /// (`gateway_responses_incomplete_total`'s reason).
    pub cut_short: Option<&'static str>,
    /// The request ID (kept from the client, or generated).
    pub request_id: Option<HeaderValue>,
    /// The request's authority (`Host`, or HTTP/2's `:authority`).
    pub host: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// The upstream's status, when a response head came back (the gateway's own answer may
    /// differ: a retried gRPC status, an error after the head).
    pub upstream_status: Option<u16>,
    /// Request body bytes read from the client (upgraded connections: bytes from the client).
    pub request_bytes: u64,
    /// The client connection's TLS version (`TLSv1.3`), `None` for plain HTTP.
    pub tls: Option<&'static str>,
    /// How an upgraded connection (WebSocket) ended.
    pub tunnel: Option<&'static str>,
    /// gRPC calls: the status the client got, from the upstream's trailers or the gateway's.
    pub grpc_status: Option<u8>,
    /// The client a trusted proxy's `X-Forwarded-For` names (`forwarded`).
    pub forwarded_client: Option<std::net::IpAddr>,
}

impl Record {
    /// The request's client: the one a trusted proxy names, else the peer.
    pub fn client_ip(&self) -> std::net::IpAddr {
        self.forwarded_client.unwrap_or(self.client.ip())
    }

    pub fn new(client: SocketAddr, method: Method, uri: Uri, version: Version) -> Self {
        Record {
            start: Instant::now(),
            client,
            method,
            uri,
            version,
            route: None,
            cluster: None,
            attempts: SmallVec::new(),
            retries: 0,
            hedged: false,
            error_detail: None,
            connect: None,
            first_byte: None,
            status: 0,
            bytes: 0,
            error: None,
            aborted: false,
            cut_short: None,
            request_id: None,
            host: None,
            user_agent: None,
            upstream_status: None,
            request_bytes: 0,
            tls: None,
            tunnel: None,
            grpc_status: None,
            forwarded_client: None,
        }
    }
}

/// What the writer thread receives.
enum Msg {
    Line(String),
    /// Wakes the writer to reopen now (the flag says so even if this did not fit).
    Reopen,
    /// Answered once every line sent before it was written (or refused).
    Flush(SyncSender<()>),
}

pub(crate) struct AccessLogger {
    json: AtomicBool,
    tx: Option<SyncSender<Msg>>,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    /// Lines dropped because the channel was full (the metric).
    queue_full: Counter,
}

/// How often a failing output is said in the gateway's own log.
const WRITE_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

fn open_append(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    Ok(Box::new(
        OpenOptions::new().create(true).append(true).open(path)?,
    ))
}

impl AccessLogger {
    pub fn start(cfg: &AccessLog, metrics: &GatewayMetrics) -> io::Result<Self> {
        let lost = |reason| {
            metrics
                .access_log_lost
                .get_or_create(&ReasonLabels { reason })
                .clone()
        };
        let (queue_full, write_error) = (lost("queue_full"), lost("write_error"));
        let (out, path): (Box<dyn Write + Send>, _) = match &cfg.output {
            LogOutput::Off => {
                return Ok(AccessLogger {
                    json: AtomicBool::new(false),
                    tx: None,
                    dropped: Arc::default(),
                    reopen: Arc::default(),
                    queue_full,
                });
            }
            LogOutput::Stdout => (Box::new(StdStream::stdout()), None),
            LogOutput::Stderr => (Box::new(StdStream::stderr()), None),
            LogOutput::File(p) => (open_append(p)?, Some(p.clone())),
        };
        AccessLogger::writing_to((out, path), cfg.format, (queue_full, write_error))
    }

    /// Lines in `format` to `out` (the file at `path`, which a reopen opens again), by a
    /// writer thread of their own.
    fn writing_to(
        (out, path): (Box<dyn Write + Send>, Option<PathBuf>),
        format: AccessLogFormat,
        (queue_full, write_error): (Counter, Counter),
    ) -> io::Result<Self> {
        let (tx, rx) = sync_channel(CHANNEL_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let (d, r) = (dropped.clone(), reopen.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, (out, path), d, r, write_error))?;
        Ok(AccessLogger {
            json: AtomicBool::new(format == AccessLogFormat::Json),
            tx: Some(tx),
            dropped,
            reopen,
            queue_full,
        })
    }

    /// Asks the writer to open the file's path again (nothing for stdout and stderr). Lines
    /// already handed over may still go to the old file; every later one goes to the new.
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            self.reopen.store(true, Ordering::Release);
            let _ = tx.try_send(Msg::Reopen);
        }
    }

    /// Lines are written (`output` is not `off`, which it stays for the process's life). What
    /// only a line shows need not be gathered otherwise.
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// Waits, up to `limit`, until every line logged so far is written: at exit, the lines of
    /// the requests that ended during the drain, which the process would otherwise end with
    /// (still queued, or in the writer's buffer). A queue still full at the limit is an
    /// output that stalled: its lines are lost.
    pub fn flush(&self, limit: Duration) {
        if let Some(tx) = &self.tx {
            crate::logging::output::flush_within(tx, limit, Msg::Flush);
        }
    }

    pub fn set_format(&self, f: AccessLogFormat) {
        self.json
            .store(f == AccessLogFormat::Json, Ordering::Relaxed);
    }

    pub fn log(&self, ex: &Record) {
        let Some(tx) = &self.tx else { return };
        let format = if self.json.load(Ordering::Relaxed) {
            AccessLogFormat::Json
        } else {
            AccessLogFormat::Plain
        };
        match tx.try_send(Msg::Line(render(ex, format))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.queue_full.inc();
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// What the writer gathers into one write to a file.
const WRITE_BUFFER: usize = 64 * 1024;

fn writer(
    rx: Receiver<Msg>,
    (out, path): (Box<dyn Write + Send>, Option<PathBuf>),
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    write_error: Counter,
) {
    let mut out = Output::new(out, path.is_some(), write_error);
    let mut flushed = Vec::new();
    while let Ok(msg) = rx.recv() {
        let mut next = Some(msg);
        while let Some(msg) = next {
            if reopen.swap(false, Ordering::Acquire)
                && let Some(path) = &path
            {
                out.flush();
                match open_append(path) {
                    Ok(file) => {
                        out.replace(file);
                        tracing::info!(path = %path.display(), "access log reopened");
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot reopen the access log; still writing to the old file");
                    }
                }
            }
            match msg {
                Msg::Line(line) => out.line(line.as_bytes(), true),
                Msg::Flush(done) => flushed.push(done),
                Msg::Reopen => {}
            }
            next = rx.try_recv().ok();
        }
        let n = dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            let note = format!("# access log: {n} line(s) dropped, the writer could not keep up");
            out.line(note.as_bytes(), false);
        }
        out.flush();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
    out.flush();
}

/// The writer's output, buffered, with the lines it holds not yet written out: when the output
/// refuses them (a full disk), they are counted as lost and let go (the buffer does not keep
/// them, so memory stays bounded), and the error is logged at most every
/// [`WRITE_ERROR_LOG_EVERY`].
///
/// stdout and stderr are written in writes of at most `PIPE_BUF` bytes, cut between lines. A
/// pipe takes that much at once, so a line of up to `PIPE_BUF` bytes never interleaves with
/// the log's lines on the same stderr, or another process's: a larger write that finds the
/// pipe nearly full is taken in parts, and the log's writer wrote between them, cutting a
/// line in two. A file takes 64 KiB at once.
struct Output {
    out: BufWriter<Box<dyn Write + Send>>,
    /// Lines handed to `out` since it last flushed.
    held: u64,
    lost: Counter,
    log: LogEvery,
}

impl Output {
    fn new(out: Box<dyn Write + Send>, to_file: bool, lost: Counter) -> Output {
        let capacity = if to_file { WRITE_BUFFER } else { PIPE_BUF };
        Output {
            out: BufWriter::with_capacity(capacity, out),
            held: 0,
            lost,
            log: LogEvery::new(WRITE_ERROR_LOG_EVERY),
        }
    }

    /// Writes `line` (a request's when `counted`; else the writer's own note, which is not
    /// counted as a lost request line). A line that does not fit in what the buffer has left
    /// flushes it first, here, so that `held` is what a failure loses: `write_all` would
    /// flush on its own, and a failure then would count lines already written.
    fn line(&mut self, line: &[u8], counted: bool) {
        if self.out.buffer().len() + line.len() + 1 > self.out.capacity() {
            self.flush();
        }
        self.held += u64::from(counted);
        let written = if line.len() < self.out.capacity() {
            self.out
                .write_all(line)
                .and_then(|()| self.out.write_all(b"\n"))
        } else {
            // Past the buffer, `BufWriter` writes the line straight out and keeps the newline
            // for later: another writer's line could come between them. One write instead
            // (a pipe may still split one of more than `PIPE_BUF` bytes).
            let mut whole = Vec::with_capacity(line.len() + 1);
            whole.extend_from_slice(line);
            whole.push(b'\n');
            self.out.write_all(&whole)
        };
        if let Err(e) = written {
            self.failed(&e);
        }
    }

    fn flush(&mut self) {
        match self.out.flush() {
            Ok(()) => self.held = 0,
            Err(e) => self.failed(&e),
        }
    }

    /// Points the output at a new file (a reopen), the old one flushed already.
    fn replace(&mut self, file: Box<dyn Write + Send>) {
        self.out = BufWriter::with_capacity(WRITE_BUFFER, file);
    }

    /// The output refused a write: what it held is lost.
    fn failed(&mut self, e: &io::Error) {
        let lost = std::mem::take(&mut self.held);
        self.lost.inc_by(lost);
        let capacity = self.out.capacity();
        let (inner, _) = std::mem::replace(
            &mut self.out,
            BufWriter::with_capacity(0, Box::new(io::sink())),
        )
        .into_parts();
        self.out = BufWriter::with_capacity(capacity, inner);
        if let Some(before) = self.log.due() {
            tracing::error!(error = %e, lost, failures_since_last_report = before, "cannot write the access log; its lines are lost (gateway_access_log_lines_lost_total{{reason=\"write_error\"}})");
        }
    }
}

#[cfg(test)]
mod tests;
