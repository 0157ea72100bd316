//! The admin listener (default `127.0.0.1:9901`, loopback unless configured otherwise).
//!
//! For now it serves `GET /healthz`: 200 while serving, 503 once draining, so that a load
//! balancer stops sending new connections during shutdown. The body also says which kernel
//! signals the proxy runs with. Metrics and the admin API come with the kernel issue.

use std::{convert::Infallible, sync::Arc, sync::atomic::Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use super::{Shared, server::Phase};

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(route(&shared, &req)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = phase.changed() => {
                if *phase.borrow() == Phase::Force {
                    return;
                }
            }
        }
    }
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz" if shared.draining.load(Ordering::Relaxed) => {
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned())
        }
        "/healthz" => (
            StatusCode::OK,
            format!("ok\nsignals: {}\n", shared.signals.mode()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "not found; try /healthz\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("static"),
    );
    resp
}
