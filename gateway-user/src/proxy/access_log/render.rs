//! Rendering one access log line, plain or JSON, from a request's [`Record`].

use std::{
    borrow::Cow,
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderValue, Version};
use serde::Serialize;

use super::{Attempt, Record};
use crate::{config::AccessLogFormat, proxy::error::ErrorKind};

/// A header value as log text: UTF-8 (lossy), at most [`MAX_LOGGED_HEADER`] characters.
fn header_text(v: Option<&HeaderValue>) -> Option<Cow<'_, str>> {
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
    attempt_errors: Vec<Cow<'static, str>>,
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
    request_id: Option<Cow<'a, str>>,
    host: Option<Cow<'a, str>>,
    user_agent: Option<Cow<'a, str>>,
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
    /// The client a trusted proxy's `X-Forwarded-For` names, when the peer (`client`) is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarded_client: Option<String>,
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
        attempt_errors: ex.attempts.iter().map(attempt_end).collect(),
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
        forwarded_client: ex.forwarded_client.map(|ip| ip.to_string()),
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
    list(&mut s, ex.attempts.iter().map(attempt_end));
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
    fn text(v: Option<&HeaderValue>) -> Cow<'_, str> {
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
    if let Some(ip) = ex.forwarded_client {
        let _ = write!(s, " forwarded_client={ip}");
    }
    if let Some(d) = &ex.error_detail {
        let _ = write!(s, " detail={d:?}");
    }
    s
}

/// What ended an attempt, for `attempt_errors`: its error's reason, `http_503` for a response
/// given up for a retry of its status (`retry.status_codes`, nginx's name for it in
/// `proxy_next_upstream`), `-` for the one that answered.
fn attempt_end(a: &Attempt) -> Cow<'static, str> {
    match (a.error, a.status) {
        (Some(e), _) => Cow::Borrowed(e.reason()),
        (None, Some(status)) => Cow::Owned(format!("http_{status}")),
        (None, None) => Cow::Borrowed("-"),
    }
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
    let (year, month, day) = crate::tls::validity::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}
