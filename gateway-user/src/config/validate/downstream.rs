//! `[router.downstream]`: the client side's timeouts and limits, and its HTTP/2 settings.

use std::time::Duration;

use super::{At, Checker, DAY_MS, Warning, ms};
use crate::config::{model::*, settings::*, source::KeyPath};

/// `[router.downstream]`: the client side's timeouts and limits.
pub(super) fn downstream(c: &mut Checker, r: &RouterConfig) -> Downstream {
    let ds = &r.downstream;
    let dk = KeyPath::root().key("router").key("downstream");
    Downstream {
        header_read_timeout: timeout(
            c,
            &dk,
            "header_read_timeout_ms",
            ds.header_read_timeout_ms,
            DEFAULT_HEADER_READ_TIMEOUT_MS,
        ),
        write_timeout: timeout(
            c,
            &dk,
            "write_timeout_ms",
            ds.write_timeout_ms,
            DEFAULT_DOWNSTREAM_WRITE_TIMEOUT_MS,
        ),
        http2_idle_timeout: timeout(
            c,
            &dk,
            "http2_idle_timeout_ms",
            ds.http2_idle_timeout_ms,
            DEFAULT_HTTP2_IDLE_TIMEOUT_MS,
        ),
        max_request_header_bytes: c.range(
            &dk.key("max_request_header_bytes"),
            ds.max_request_header_bytes
                .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES) as u64,
            1024,
            1 << 20,
            " bytes",
        ) as usize,
        max_request_body_bytes: ds.max_request_body_bytes,
        tls_handshake_timeout: timeout(
            c,
            &dk,
            "tls_handshake_timeout_ms",
            ds.tls_handshake_timeout_ms,
            DEFAULT_DOWNSTREAM_TLS_HANDSHAKE_TIMEOUT_MS,
        ),
        max_client_connections: ds.max_client_connections.map(|n| {
            c.range(
                &dk.key("max_client_connections"),
                n as u64,
                1,
                10_000_000,
                "",
            ) as usize
        }),
        max_accepts_per_second: ds.max_accepts_per_second.map(|n| {
            c.range(
                &dk.key("max_accepts_per_second"),
                u64::from(n),
                1,
                10_000_000,
                "",
            ) as u32
        }),
        request_buffering_memory_bytes: c.range(
            &dk.key("request_buffering_memory_bytes"),
            ds.request_buffering_memory_bytes
                .unwrap_or(DEFAULT_REQUEST_BUFFERING_MEMORY_BYTES),
            64 << 10,
            1 << 40,
            " bytes",
        ),
        http2_premature_resets: premature_resets(c, ds, &dk),
        http2_max_concurrent_streams: http2_streams(c, ds, &dk),
    }
}

/// `[router.downstream] http2_max_concurrent_streams`: at least 1, at most what HTTP/2 can
/// count (2^31 - 1); a warning below RFC 9113's 100.
fn http2_streams(c: &mut Checker, ds: &DownstreamConfig, dk: &KeyPath) -> u32 {
    let n = ds
        .http2_max_concurrent_streams
        .unwrap_or(DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS);
    let key = dk.key("http2_max_concurrent_streams");
    let n = c.range(&key, u64::from(n), 1, i32::MAX as u64, " streams") as u32;
    if n < 100 {
        c.warnings.push(At {
            key,
            what: Warning::FewHttp2Streams { streams: n },
        });
    }
    n
}

/// One of `[router.downstream]`'s timeouts: `value` (`default` when unset), from 1 ms to a
/// day.
fn timeout(c: &mut Checker, dk: &KeyPath, key: &str, value: Option<u64>, default: u64) -> Duration {
    ms(c.range(&dk.key(key), value.unwrap_or(default), 1, DAY_MS, " ms"))
}

/// `[router.downstream]`'s HTTP/2 rapid-reset rule.
fn premature_resets(c: &mut Checker, ds: &DownstreamConfig, dk: &KeyPath) -> PrematureResets {
    PrematureResets {
        streams: c.range(
            &dk.key("http2_premature_reset_streams"),
            ds.http2_premature_reset_streams
                .unwrap_or(DEFAULT_HTTP2_PREMATURE_RESET_STREAMS),
            0,
            1 << 32,
            " streams",
        ),
        lifetime: ms(c.range(
            &dk.key("http2_premature_reset_lifetime_ms"),
            ds.http2_premature_reset_lifetime_ms
                .unwrap_or(DEFAULT_HTTP2_PREMATURE_RESET_LIFETIME_MS),
            1,
            60_000,
            " ms",
        )),
    }
}
