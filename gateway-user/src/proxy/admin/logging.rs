//! `/logging`: the gateway's log level, read (`GET`) and changed at once (`PUT`, the new
//! directives as the body: `curl -X PUT --data debug http://127.0.0.1:9901/logging`).
//!
//! A change is accepted from loopback clients only, whatever `[admin] allow_remote` says: it
//! can flood the log, so it needs a shell on the host. It is a `PUT` so that a web page open in
//! a browser on the host cannot make it (a cross-origin `PUT` needs a CORS preflight, which
//! this listener never grants). The level holds until the next reload (SIGHUP applies the
//! config's `[log] level` again) or restart; `RUST_LOG` is only read at start.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header::ALLOW};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Body;
use tracing::info;

use super::{TEXT, reply};
use crate::logging::{self, SetLevelError};

/// Longest body accepted (a directive list).
const MAX_BODY: usize = 1024;

/// A request's body, as this module reads it.
pub(super) trait AdminBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
{
}
impl<B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>> AdminBody for B {}

pub(super) async fn handle(
    peer: SocketAddr,
    req: Request<impl AdminBody>,
) -> Response<Full<Bytes>> {
    match *req.method() {
        Method::GET | Method::HEAD => match logging::current() {
            Some(l) => reply(
                StatusCode::OK,
                TEXT,
                format!("{}\n(from {})\n", l.directives, l.source.name()),
            ),
            None => not_controlled(),
        },
        Method::PUT => put(peer, req).await,
        _ => {
            let mut resp = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "GET the log level, or PUT new directives (e.g. `debug`)\n".into(),
            );
            resp.headers_mut()
                .insert(ALLOW, http::HeaderValue::from_static("GET, HEAD, PUT"));
            resp
        }
    }
}

async fn put(peer: SocketAddr, req: Request<impl AdminBody>) -> Response<Full<Bytes>> {
    if !peer.ip().to_canonical().is_loopback() {
        return reply(
            StatusCode::FORBIDDEN,
            TEXT,
            format!(
                "the log level can only be changed from loopback (this request came from {})\n",
                peer.ip()
            ),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                TEXT,
                format!("send the directives as a body of at most {MAX_BODY} bytes\n"),
            );
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return reply(
            StatusCode::BAD_REQUEST,
            TEXT,
            "the body is not UTF-8\n".into(),
        );
    };
    match logging::set_level(text) {
        Ok(was) => {
            let now = text.trim();
            info!(level = now, was = %was.directives, %peer, "log level changed through the admin API");
            reply(
                StatusCode::OK,
                TEXT,
                format!(
                    "{now}\n(was {} from {}; until the next reload)\n",
                    was.directives,
                    was.source.name()
                ),
            )
        }
        Err(SetLevelError::Invalid(e)) => reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
        Err(SetLevelError::NotControlled) => not_controlled(),
    }
}

fn not_controlled() -> Response<Full<Bytes>> {
    reply(
        StatusCode::CONFLICT,
        TEXT,
        format!("{}\n", SetLevelError::NotControlled),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_req(body: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(Method::PUT)
            .uri("/logging")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    #[tokio::test]
    async fn only_loopback_may_change_the_level() {
        for peer in ["10.0.0.7:40000", "[2001:db8::1]:40000"] {
            let resp = handle(peer.parse().unwrap(), put_req("debug")).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{peer}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(
                String::from_utf8_lossy(&body).contains("only be changed from loopback"),
                "{body:?}"
            );
        }
        // From loopback (v4-mapped too) it gets past the check: this test process's log is
        // not gateway's, so the answer is that it is not controlled, not forbidden.
        for peer in ["127.0.0.1:40000", "[::ffff:127.0.0.1]:40000", "[::1]:40000"] {
            let resp = handle(peer.parse().unwrap(), put_req("debug")).await;
            assert_eq!(resp.status(), StatusCode::CONFLICT, "{peer}");
        }
        let resp = handle(
            "127.0.0.1:1".parse().unwrap(),
            put_req("x".repeat(2000).leak()),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
