//! The access log: one line per request, plain or JSON, written when the response is over
//! (or abandoned). Lines go through a bounded channel to a writer thread, so a slow disk never
//! stalls the proxy; if the channel is full the line is dropped and counted, and the count is
//! written as soon as there is room. [`AccessLogger::reopen`] (SIGUSR1, SIGHUP) makes the
//! writer open the file's path again, so that after logrotate renamed it the log goes to a new
//! file at the configured path.

use std::{
    fmt::Write as _,
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderValue, Method, Uri, Version};
use serde::Serialize;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::error::ErrorKind;
use crate::config::{AccessLog, AccessLogFormat, LogOutput};

/// Lines buffered between the proxy and the writer thread.
const CHANNEL_LINES: usize = 16 * 1024;

/// One upstream attempt of a request.
#[derive(Clone, Debug)]
pub(crate) struct Attempt {
    pub endpoint: SocketAddr,
    pub cookie: Option<u64>,
    pub reused: bool,
    pub error: Option<ErrorKind>,
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
}

impl Record {
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
        }
    }
}

/// A header value as log text: UTF-8 (lossy), at most [`MAX_LOGGED_HEADER`] characters.
fn header_text(v: Option<&HeaderValue>) -> Option<std::borrow::Cow<'_, str>> {
    let v = v?;
    let bytes = &v.as_bytes()[..v.len().min(MAX_LOGGED_HEADER)];
    Some(String::from_utf8_lossy(bytes))
}

/// A client's `User-Agent` (or other header) is cut here in the log.
const MAX_LOGGED_HEADER: usize = 256;

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: &'a str,
    client: String,
    method: &'a str,
    path: &'a str,
    version: &'a str,
    status: u16,
    bytes: u64,
    route: Option<&'a str>,
    cluster: Option<&'a str>,
    endpoints: Vec<String>,
    attempt_errors: Vec<&'a str>,
    cookies: Vec<u64>,
    attempts: usize,
    retries: u32,
    connect_ms: Option<f64>,
    first_byte_ms: Option<f64>,
    total_ms: f64,
    error: Option<&'a str>,
    /// The error with its kernel evidence, e.g. "connect timeout to 10.0.0.5:8080 after 50 ms;
    /// kernel: aborted, 1 SYN sent, no SYN-ACK, no RST (dropped on the path or host down)".
    detail: Option<&'a str>,
    hedged: bool,
    aborted: bool,
    request_id: Option<std::borrow::Cow<'a, str>>,
    host: Option<std::borrow::Cow<'a, str>>,
    user_agent: Option<std::borrow::Cow<'a, str>>,
    upstream_status: Option<u16>,
    request_bytes: u64,
    tls: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<u8>,
    /// Why a response that began did not reach the client whole: the reason of
    /// `gateway_responses_incomplete_total`.
    #[serde(skip_serializing_if = "Option::is_none")]
    incomplete: Option<&'a str>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Renders one line (without the newline).
pub(crate) fn render(ex: &Record, format: AccessLogFormat) -> String {
    let total = ex.start.elapsed();
    // The arrival time, derived here rather than read per request: only logged requests pay.
    let ts = rfc3339(SystemTime::now() - total);
    // An authority-form target (`CONNECT host:443`), or `-` for a request hyper refused
    // unparsed (`server::rejected`), has no path: the target is logged as it is.
    let path = match ex.uri.path_and_query() {
        Some(p) => p.as_str(),
        None => ex.uri.authority().map_or("/", |a| a.as_str()),
    };
    match format {
        AccessLogFormat::Json => render_json(ex, &ts, path, total),
        AccessLogFormat::Plain => render_plain(ex, &ts, path, total),
    }
}

fn render_json(ex: &Record, ts: &str, path: &str, total: Duration) -> String {
    let line = JsonLine {
        ts,
        client: ex.client.to_string(),
        method: ex.method.as_str(),
        path,
        version: version_str(ex.version),
        status: ex.status,
        bytes: ex.bytes,
        route: ex.route.as_deref(),
        cluster: ex.cluster.as_deref(),
        endpoints: ex.attempts.iter().map(|a| a.endpoint.to_string()).collect(),
        attempt_errors: ex
            .attempts
            .iter()
            .map(|a| a.error.map_or("-", ErrorKind::reason))
            .collect(),
        cookies: ex.attempts.iter().filter_map(|a| a.cookie).collect(),
        attempts: ex.attempts.len(),
        retries: ex.retries,
        connect_ms: ex.connect.map(ms),
        first_byte_ms: ex.first_byte.map(ms),
        total_ms: ms(total),
        error: ex.error.map(ErrorKind::reason),
        detail: ex.error_detail.as_deref(),
        hedged: ex.hedged,
        aborted: ex.aborted,
        request_id: header_text(ex.request_id.as_ref()),
        host: header_text(ex.host.as_ref()),
        user_agent: header_text(ex.user_agent.as_ref()),
        upstream_status: ex.upstream_status,
        request_bytes: ex.request_bytes,
        tls: ex.tls,
        tunnel: ex.tunnel,
        grpc_status: ex.grpc_status,
        incomplete: ex.cut_short,
    };
    serde_json::to_string(&line).unwrap_or_default()
}

fn render_plain(ex: &Record, ts: &str, path: &str, total: Duration) -> String {
    let mut s = String::with_capacity(256);
    let _ = write!(
        s,
        "{ts} {} \"{} {} {}\" {} {} route={} cluster={} endpoints=",
        ex.client,
        ex.method,
        path.replace('"', "%22"),
        version_str(ex.version),
        ex.status,
        ex.bytes,
        ex.route.as_deref().unwrap_or("-"),
        ex.cluster.as_deref().unwrap_or("-"),
    );
    list(&mut s, ex.attempts.iter().map(|a| a.endpoint));
    s.push_str(" attempt_errors=");
    list(
        &mut s,
        ex.attempts
            .iter()
            .map(|a| a.error.map_or("-", ErrorKind::reason)),
    );
    s.push_str(" cookies=");
    list(&mut s, ex.attempts.iter().filter_map(|a| a.cookie));
    let _ = write!(s, " attempts={} retries={}", ex.attempts.len(), ex.retries);
    let _ = match ex.connect {
        Some(d) => write!(s, " connect_ms={}", ms(d)),
        None => write!(s, " connect_ms=-"),
    };
    let _ = match ex.first_byte {
        Some(d) => write!(s, " first_byte_ms={}", ms(d)),
        None => write!(s, " first_byte_ms=-"),
    };
    let _ = write!(
        s,
        " total_ms={} error={}",
        ms(total),
        ex.error.map_or("-", ErrorKind::reason)
    );
    fn text(v: Option<&HeaderValue>) -> std::borrow::Cow<'_, str> {
        header_text(v).unwrap_or(std::borrow::Cow::Borrowed("-"))
    }
    let _ = write!(
        s,
        " request_id={} host={} user_agent={:?} upstream_status={} request_bytes={} tls={}",
        text(ex.request_id.as_ref()),
        text(ex.host.as_ref()).replace([' ', '\t'], "%20"),
        text(ex.user_agent.as_ref()),
        ex.upstream_status
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        ex.request_bytes,
        ex.tls.unwrap_or("-"),
    );
    if let Some(t) = ex.tunnel {
        let _ = write!(s, " tunnel={t}");
    }
    if let Some(g) = ex.grpc_status {
        let _ = write!(s, " grpc_status={g}");
    }
    if ex.aborted {
        s.push_str(" aborted=1");
    }
    if let Some(r) = ex.cut_short {
        let _ = write!(s, " incomplete={r}");
    }
    if ex.hedged {
        s.push_str(" hedged=1");
    }
    if let Some(d) = &ex.error_detail {
        let _ = write!(s, " detail={d:?}");
    }
    s
}

fn list<T: std::fmt::Display>(s: &mut String, items: impl Iterator<Item = T>) {
    let mut any = false;
    for (i, it) in items.enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{it}");
        any = true;
    }
    if !any {
        s.push('-');
    }
}

/// `2025-01-31T12:34:56.789Z`, without a date-time dependency.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// What the writer thread receives.
enum Msg {
    Line(String),
    /// Wakes the writer to reopen now (the flag says so even if this did not fit).
    Reopen,
}

pub(crate) struct AccessLogger {
    json: AtomicBool,
    tx: Option<SyncSender<Msg>>,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
}

fn open_append(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    Ok(Box::new(
        OpenOptions::new().create(true).append(true).open(path)?,
    ))
}

impl AccessLogger {
    pub fn start(cfg: &AccessLog) -> io::Result<Self> {
        let (out, path): (Box<dyn Write + Send>, _) = match &cfg.output {
            LogOutput::Off => {
                return Ok(AccessLogger {
                    json: AtomicBool::new(false),
                    tx: None,
                    dropped: Arc::default(),
                    reopen: Arc::default(),
                });
            }
            LogOutput::Stdout => (Box::new(io::stdout()), None),
            LogOutput::Stderr => (Box::new(io::stderr()), None),
            LogOutput::File(p) => (open_append(p)?, Some(p.clone())),
        };
        let (tx, rx) = sync_channel(CHANNEL_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let (d, r) = (dropped.clone(), reopen.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out, path, d, r))?;
        Ok(AccessLogger {
            json: AtomicBool::new(cfg.format == AccessLogFormat::Json),
            tx: Some(tx),
            dropped,
            reopen,
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
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

const WRITE_BUFFER: usize = 64 * 1024;

fn writer(
    rx: Receiver<Msg>,
    out: Box<dyn Write + Send>,
    path: Option<PathBuf>,
    dropped: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
) {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, out);
    while let Ok(msg) = rx.recv() {
        let mut next = Some(msg);
        while let Some(msg) = next {
            if reopen.swap(false, Ordering::Acquire)
                && let Some(path) = &path
            {
                let _ = out.flush();
                match open_append(path) {
                    Ok(file) => {
                        out = BufWriter::with_capacity(WRITE_BUFFER, file);
                        tracing::info!(path = %path.display(), "access log reopened");
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot reopen the access log; still writing to the old file");
                    }
                }
            }
            if let Msg::Line(line) = msg {
                let _ = out.write_all(line.as_bytes());
                let _ = out.write_all(b"\n");
            }
            next = rx.try_recv().ok();
        }
        let n = dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            let _ = writeln!(
                out,
                "# access log: {n} line(s) dropped, the writer could not keep up"
            );
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests;
