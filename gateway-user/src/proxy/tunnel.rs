//! Upgraded connections (WebSocket, any HTTP/1.1 `Upgrade`): once the upstream's `101` has
//! gone to the client, the two connections are joined and bytes copied both ways, as they
//! come, without looking at them.
//!
//! Limits, per route (`upgrade_idle_timeout_ms`, `upgrade_max_duration_ms`): no byte either
//! way for the idle timeout, or the maximum duration since the `101`, closes both sides. A
//! write that makes no progress for `write_timeout_ms` (either side's `StallGuard`) is an
//! error. When one side closes its sending half, that half-close is passed on, and the
//! tunnel ends once both have.
//!
//! Shutdown: a tunnel holds its connection's place among the live connections (the drain
//! waits for it) and keeps going through the drain; when the grace period runs out
//! (`Force`), it is closed and counted as `shutdown`. The upstream connection (and its
//! connection slot) is held until the end; the access-log line is written then, with the
//! bytes each way, how long it lasted and how it ended (`tunnel=`).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tracing::debug;

use super::{
    exchange::Exchange,
    shared::{Drain, Phase},
    telemetry::TunnelEnd,
    upstream::Lease,
};

/// Limits when a request has no route (never: upgrades are routed); the config's defaults.
pub(crate) const FALLBACK_IDLE: Duration =
    Duration::from_millis(crate::config::model::DEFAULT_UPGRADE_IDLE_TIMEOUT_MS);
pub(crate) const FALLBACK_MAX: Duration =
    Duration::from_millis(crate::config::model::DEFAULT_UPGRADE_MAX_DURATION_MS);

/// Bytes read at a time, per direction.
const BUFFER: usize = 16 * 1024;

/// A `101` on its way: both sides' upgrades, and what the tunnel needs.
pub(crate) struct Tunnel {
    pub client: OnUpgrade,
    pub upstream: OnUpgrade,
    pub lease: Lease,
    pub exchange: Box<Exchange>,
    pub idle: Duration,
    pub max: Duration,
    pub drain: Drain,
}

/// Counts the request (its `101`) and runs the tunnel on its own task. From here on the
/// tunnel is no request in flight: not in its endpoint's count, which `least_request` and
/// `peak_ewma` balance by (a WebSocket open for hours would steer requests away from its
/// endpoint, and keep `peak_ewma`'s trickle from ever being due there), nor in its
/// cluster's retry and hedge budgets. Tunnels have their own gauge,
/// `gateway_upgraded_connections`.
pub(crate) fn spawn(mut t: Tunnel) {
    t.exchange.count();
    t.exchange.end_active();
    tokio::spawn(run(t));
}

async fn run(t: Tunnel) {
    let Tunnel {
        client,
        upstream,
        lease,
        mut exchange,
        idle,
        max,
        drain,
    } = t;
    // The upstream connection (and its slot) is held to the end; its place among the
    // requests in flight is not.
    let Lease {
        conn,
        endpoint,
        _in_flight,
        ..
    } = lease;
    drop(_in_flight);
    let meter = endpoint.meter.tunnels.clone();
    meter.opened();
    // The client's side completes once hyper has written the 101.
    let end = match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let mut c = TokioIo::new(c);
            let mut u = TokioIo::new(u);
            let ends = Ends {
                idle,
                max: Instant::now() + max,
                drain,
            };
            let copied = copy(&mut c, &mut u, ends, &mut exchange).await;
            let _ = tokio::join!(c.shutdown(), u.shutdown());
            copied
        }
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            TunnelEnd::Error
        }
    };
    meter.closed(end);
    meter.to_upstream.inc_by(exchange.record.request_bytes);
    meter.to_client.inc_by(exchange.record.bytes);
    exchange.record.tunnel = Some(end.name());
    drop((conn, endpoint));
    exchange.log();
}

/// When a tunnel must end besides its sides closing.
struct Ends {
    idle: Duration,
    max: Instant,
    drain: Drain,
}

/// Copies both ways until both sides closed, one failed, or a limit ended it; counts the
/// bytes into the record.
async fn copy<C, U>(client: &mut C, upstream: &mut U, ends: Ends, ex: &mut Exchange) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let last = Activity::new();
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let to_upstream = pump(cr, uw, &up_bytes, &last);
    let to_client = pump(ur, cw, &down_bytes, &last);
    tokio::pin!(to_upstream, to_client);
    let Ends {
        idle,
        max,
        mut drain,
    } = ends;
    let (mut up_done, mut down_done) = (false, false);
    let mut first_closed = None;
    let end = loop {
        if up_done && down_done {
            break first_closed.unwrap_or(TunnelEnd::ClientClosed);
        }
        let idle_at = last.get() + idle;
        tokio::select! {
            r = &mut to_upstream, if !up_done => match r {
                Ok(()) => {
                    up_done = true;
                    first_closed.get_or_insert(TunnelEnd::ClientClosed);
                }
                Err(_) => break TunnelEnd::Error,
            },
            r = &mut to_client, if !down_done => match r {
                Ok(()) => {
                    down_done = true;
                    first_closed.get_or_insert(TunnelEnd::UpstreamClosed);
                }
                Err(_) => break TunnelEnd::Error,
            },
            _ = tokio::time::sleep_until(idle_at) => {
                if last.get() + idle <= Instant::now() {
                    break TunnelEnd::IdleTimeout;
                }
            }
            _ = tokio::time::sleep_until(max) => break TunnelEnd::MaxDuration,
            changed = drain.phase.changed() => {
                if changed.is_err() || *drain.phase.borrow() == Phase::Force {
                    break TunnelEnd::Shutdown;
                }
            }
        }
    };
    ex.record.request_bytes += up_bytes.load(Ordering::Relaxed);
    ex.record.bytes += down_bytes.load(Ordering::Relaxed);
    end
}

/// When a byte last went through, either way (atomics: the future is `Send`, though both
/// directions run on the one task).
struct Activity {
    base: Instant,
    nanos: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let n = self.base.elapsed().as_nanos() as u64;
        self.nanos.store(n, Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        self.base + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// One direction: reads until EOF, writing everything on; passes the EOF on as a half-close.
async fn pump<R, W>(mut r: R, mut w: W, bytes: &AtomicU64, last: &Activity) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        last.touch();
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        last.touch();
    }
}
