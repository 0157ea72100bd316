//! The gateway's own overload protection: which accepted client connections are served, and
//! what the others get.
//!
//! Two limits, both in `[router.downstream]` and read from the config generation current at
//! each accept (a SIGHUP changes them for the next connection):
//!
//! - `max_client_connections`: one budget over every listener and worker, because what it
//!   protects is process-wide (file descriptors, memory);
//! - `max_accepts_per_second`: a token bucket per listener address (shared by the workers'
//!   `SO_REUSEPORT` sockets of that address), refilled continuously, holding one second's
//!   worth.
//!
//! A connection beyond either is accepted and answered at once, never left in the accept
//! queue where its client would wait for a SYN-ACK timeout: on a plain HTTP listener a `503`
//! with `x-gateway-error: overloaded`, `Retry-After: 1` and `Connection: close`, then a
//! lingering close (FIN, then what the client sends is read and dropped for up to
//! [`REJECT_LINGER`], so that its request arriving after our answer does not turn into a
//! reset that destroys the answer); on an HTTPS listener a close, since answering would cost a
//! TLS handshake. At most [`MAX_LINGERING`] rejected connections linger at once; beyond that
//! the answer is written without lingering.
//!
//! Out of file descriptors (`EMFILE`, `ENFILE`) `accept()` fails and the connection would wait
//! in the queue. Each accept loop keeps one descriptor in reserve (`/dev/null`): it gives it
//! up, accepts one connection on it, writes the same `503` where it can, closes it and takes
//! the reserve back; so clients get an answer instead of a stall, and the loop makes progress
//! instead of spinning. The swap holds a process-wide lock (`reserve`) so that no other accept
//! loop, nor the admin listener's, takes the descriptor it frees ([`accept`]): a reserve lost
//! so stayed lost while the process was out of descriptors, and its listener's queue waited
//! unanswered (1 run in 4 of `proxy_overload::out_of_file_descriptors…`, both workers'
//! reserves lost, 400 connections left waiting). Other allocations of the process (an
//! upstream connect, the resolver, a scrape reading `/proc/self/fd`) may still take it: a loop
//! without a reserve takes one back from the next connection it accepts
//! ([`ListenerGate::restock`]). Every accept error is counted by errno and logged at most once
//! per [`ACCEPT_ERROR_LOG_EVERY`] per listener, with the number of errors not logged.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::warn;

use super::{headers::Scheme, log_every::LogEvery, spread::Load};
use crate::{
    config::Downstream,
    metrics::{GatewayMetrics, ListenerErrno, ListenerReason},
};

/// How long a rejected plain HTTP connection is read from (and what it sends dropped) after
/// its answer, before it is closed.
pub(crate) const REJECT_LINGER: Duration = Duration::from_secs(1);

/// Rejected connections lingering at once, at most; beyond, the answer is written and the
/// socket closed at once.
pub(crate) const MAX_LINGERING: usize = 512;

/// At most one accept-error log line per listener this often.
pub(crate) const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long an accept loop waits after an accept error it could not answer on the reserve
/// descriptor, before it tries again.
pub(crate) const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What a failed `accept()` means for the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AcceptFailure {
    /// Out of file descriptors: one connection can be answered on the reserve descriptor.
    OutOfFds,
    /// Out of memory or buffers, or an error not known: back off before accepting again.
    Resource,
    /// An error of the one connection taken off the queue (it was aborted, or a network error
    /// was pending on it, which Linux's accept(2) passes on): the next is accepted at once,
    /// as nginx does, rather than holding every other connection waiting behind it.
    Connection,
}

impl AcceptFailure {
    pub fn of(errno: i32) -> AcceptFailure {
        match errno {
            libc::EMFILE | libc::ENFILE => AcceptFailure::OutOfFds,
            // Not EPERM: a security module's refusal comes before a connection is taken off
            // the queue, and would come back at once.
            libc::ECONNABORTED
            | libc::EPROTO
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT => AcceptFailure::Connection,
            _ => AcceptFailure::Resource,
        }
    }
}

/// Why a connection was turned away (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    MaxConnections,
    AcceptRate,
    FdExhausted,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [
        Rejection::MaxConnections,
        Rejection::AcceptRate,
        Rejection::FdExhausted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::MaxConnections => "max_connections",
            Rejection::AcceptRate => "accept_rate",
            Rejection::FdExhausted => "fd_exhausted",
        }
    }

    fn sentence(self) -> &'static str {
        match self {
            Rejection::MaxConnections => {
                "the gateway has as many client connections open as it allows (max_client_connections)"
            }
            Rejection::AcceptRate => {
                "this listener accepts no more new connections per second (max_accepts_per_second)"
            }
            Rejection::FdExhausted => "the gateway is out of file descriptors",
        }
    }
}

/// The `503` a rejected plain HTTP client gets.
fn answer(reason: Rejection) -> String {
    let body = format!(
        "503 Service Unavailable: {}; retry shortly\n",
        reason.sentence()
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         x-gateway-error: overloaded\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Process-wide admission state, in `Shared`.
pub(crate) struct Admission {
    open: Arc<AtomicUsize>,
    /// The most connections open at once since memory was last returned (`memory`).
    peak: AtomicUsize,
    lingering: Arc<AtomicUsize>,
    gauge: Gauge,
    /// Connections parked since memory was last returned (`memory`).
    parks: AtomicUsize,
    parked: Gauge,
    metrics: GatewayMetrics,
}

/// An idle client connection's place in `gateway_client_connections_parked`, while it is
/// parked (`server::park`).
pub(crate) struct Parked(Gauge);

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A served connection's place in `max_client_connections`; given back when dropped.
pub(crate) struct Permit {
    open: Arc<AtomicUsize>,
    gauge: Gauge,
    /// Its place in the count of the worker that serves it (`spread`).
    _worker: Option<Load>,
}

impl Permit {
    /// Counts the connection on the worker that will serve it, for as long as it is open.
    pub fn serve_on(&mut self, load: Load) {
        self._worker = Some(load);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

impl Admission {
    pub fn new(metrics: &GatewayMetrics) -> Admission {
        Admission {
            open: Arc::new(AtomicUsize::new(0)),
            peak: AtomicUsize::new(0),
            lingering: Arc::new(AtomicUsize::new(0)),
            gauge: metrics.client_connections.clone(),
            parks: AtomicUsize::new(0),
            parked: metrics.client_parked.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The peak since the last call, and the open count now; the peak restarts from it.
    pub fn take_peak(&self) -> (usize, usize) {
        let open = self.open();
        (self.peak.swap(open, Ordering::Relaxed).max(open), open)
    }

    /// A connection is parked until the guard is dropped.
    pub fn park(&self) -> Parked {
        self.parks.fetch_add(1, Ordering::Relaxed);
        self.parked.inc();
        Parked(self.parked.clone())
    }

    /// Connections parked since the last call.
    pub fn take_parks(&self) -> usize {
        self.parks.swap(0, Ordering::Relaxed)
    }
}

/// One listener address's accept rate limit and its counters, shared by the accept loops of
/// every worker on that address.
pub(crate) struct ListenerGate {
    pub addr: SocketAddr,
    bucket: Mutex<Bucket>,
    rejected: [Counter; 3],
    errors: Mutex<Vec<(i32, Counter)>>,
    /// The accept-error line, every [`ACCEPT_ERROR_LOG_EVERY`] at most.
    error_log: LogEvery,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl ListenerGate {
    pub fn new(addr: SocketAddr, admission: &Admission) -> ListenerGate {
        let listener = addr.to_string();
        let rejected = Rejection::ALL.map(|r| {
            admission
                .metrics
                .client_rejected
                .get_or_create(&ListenerReason {
                    listener: listener.clone(),
                    reason: r.label(),
                })
                .clone()
        });
        ListenerGate {
            addr,
            bucket: Mutex::new(Bucket {
                tokens: f64::INFINITY,
                at: Instant::now(),
            }),
            rejected,
            errors: Mutex::new(Vec::new()),
            error_log: LogEvery::new(ACCEPT_ERROR_LOG_EVERY),
        }
    }

    /// Takes one token of `rate` per second, bursting to one second's worth.
    fn take_token(&self, rate: u32, now: Instant) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let cap = f64::from(rate);
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * cap;
        b.tokens = (b.tokens + refill).min(cap);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a connection just accepted on this listener is served: its permit, or why not.
    pub fn admit(&self, admission: &Admission, limits: &Downstream) -> Result<Permit, Rejection> {
        if let Some(rate) = limits.max_accepts_per_second
            && !self.take_token(rate, Instant::now())
        {
            return Err(Rejection::AcceptRate);
        }
        let max = limits.max_client_connections.unwrap_or(usize::MAX);
        let admitted = admission
            .open
            .try_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        let Ok(before) = admitted else {
            return Err(Rejection::MaxConnections);
        };
        admission.peak.fetch_max(before + 1, Ordering::Relaxed);
        admission.gauge.inc();
        Ok(Permit {
            open: admission.open.clone(),
            gauge: admission.gauge.clone(),
            _worker: None,
        })
    }

    /// Turns `stream` away for `reason`: counted, answered (plain HTTP), closed.
    pub fn reject(
        &self,
        admission: &Admission,
        stream: TcpStream,
        scheme: Scheme,
        reason: Rejection,
    ) {
        self.rejected[reason as usize].inc();
        if scheme == Scheme::Https {
            return;
        }
        let text = answer(reason);
        // An empty send buffer takes the whole answer at once.
        let _ = stream.try_write(text.as_bytes());
        let lingering = &admission.lingering;
        if lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
            lingering.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let lingering = lingering.clone();
        tokio::spawn(async move {
            linger(stream).await;
            lingering.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// `accept()` failed with `err`: counted, logged (rate-limited), and classed.
    pub fn accept_failed(&self, admission: &Admission, err: &std::io::Error) -> AcceptFailure {
        let errno = err.raw_os_error().unwrap_or(0);
        self.error_counter(admission, errno).inc();
        let failure = AcceptFailure::of(errno);
        if let Some(suppressed) = self.error_log.due() {
            let what = match failure {
                AcceptFailure::Connection => {
                    "accept failed for one connection (an error pending on it); the next is \
                     accepted at once (counted in gateway_accept_errors_total)"
                }
                _ => {
                    "accept failed on a client listener; new connections are closed until it \
                     recovers (counted in gateway_accept_errors_total)"
                }
            };
            warn!(
                listener = %self.addr,
                errno = errno_label(errno),
                error = %err,
                suppressed,
                every_s = ACCEPT_ERROR_LOG_EVERY.as_secs(),
                "{what}"
            );
        }
        failure
    }

    fn error_counter(&self, admission: &Admission, errno: i32) -> Counter {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, c)) = errors.iter().find(|(e, _)| *e == errno) {
            return c.clone();
        }
        let c = admission
            .metrics
            .accept_errors
            .get_or_create(&ListenerErrno {
                listener: self.addr.to_string(),
                errno: errno_label(errno),
            })
            .clone();
        errors.push((errno, c.clone()));
        c
    }
}

/// FIN, then read and drop what the client still sends, until it closes or [`REJECT_LINGER`].
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let never = std::future::pending();
    super::io::linger::read_and_drop(&stream, REJECT_LINGER, REJECT_LINGER, never).await;
}

fn errno_label(errno: i32) -> &'static str {
    match errno {
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENOMEM => "ENOMEM",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPERM => "EPERM",
        _ => "other",
    }
}

mod reserve;
pub(crate) use reserve::{accept, open_reserve};
#[cfg(test)]
mod tests;
