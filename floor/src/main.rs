//! The floor under `bench proxy`: the least a reverse proxy built on hyper and tokio can cost
//! per request, measured beside the gateway (`cargo xtask bench proxy --floor`).
//!
//! It has the gateway's shape and nothing else: one thread per core, each with its own
//! current-thread runtime and its own `SO_REUSEPORT` listener; HTTP/1.1 keep-alive on both
//! sides with hyper's connection types; per worker, a stack of idle upstream connections per
//! upstream; round robin. No header rewrite, no timeout, no retry, no metric, no log, no
//! kernel signal: what is left is hyper's and tokio's own cost, which the gateway cannot go
//! below without leaving them. It is a measuring instrument, not a proxy to run: errors
//! answer 502 and nothing is configurable.
//!
//! Usage: `hyper_floor LISTEN_ADDR UPSTREAM_ADDR...`

use std::{
    cell::{Cell, RefCell},
    convert::Infallible,
    net::SocketAddr,
    rc::Rc,
};

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, combinators::UnsyncBoxBody};
use hyper::{
    body::{Bytes, Incoming},
    client::conn::http1::{self as client, SendRequest},
    server::conn::http1 as server,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// One worker's upstreams and their idle connections.
struct Worker {
    upstreams: Vec<SocketAddr>,
    idle: Vec<RefCell<Vec<SendRequest<Incoming>>>>,
    next: Cell<usize>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return Err("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR...".into());
    }
    let listen: SocketAddr = args[0].parse()?;
    let upstreams: Vec<SocketAddr> = args[1..]
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    // A worker that panics ends the process, as one that fails does: the threads are not
    // joined (the main thread waits for SIGTERM below).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(101);
    }));
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    for _ in 0..workers {
        let upstreams = upstreams.clone();
        std::thread::spawn(move || {
            if let Err(e) = worker(listen, upstreams) {
                eprintln!("hyper_floor: worker: {e}");
                std::process::exit(1);
            }
        });
    }
    // SIGTERM ends the process through exit(), so that a build instrumented for PGO
    // (xtask/src/pgo.rs) writes its counts: the signal's default action would not.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?
                .recv()
                .await;
            Ok::<_, std::io::Error>(())
        })?;
    std::process::exit(0)
}

fn worker(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseport(true)?;
        socket.set_reuseaddr(true)?;
        socket.bind(listen)?;
        let listener: TcpListener = socket.listen(1024)?;
        let w = Rc::new(Worker {
            idle: upstreams.iter().map(|_| RefCell::new(Vec::new())).collect(),
            upstreams,
            next: Cell::new(0),
        });
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let w = w.clone();
            tokio::task::spawn_local(async move {
                let svc = service_fn(move |req| forward(w.clone(), req));
                let _ = server::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

async fn forward(w: Rc<Worker>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let i = w.next.get();
    w.next.set((i + 1) % w.upstreams.len());
    let Some(mut sender) = checkout(&w, i).await else {
        return Ok(bad_gateway());
    };
    match sender.send_request(req).await {
        Ok(resp) => {
            // Back at once: a connection whose previous response is still being read is not
            // ready, and `checkout` passes over it.
            w.idle[i].borrow_mut().push(sender);
            Ok(resp.map(|b| b.boxed_unsync()))
        }
        Err(_) => Ok(bad_gateway()),
    }
}

/// A ready idle connection to upstream `i`, else a new one.
async fn checkout(w: &Worker, i: usize) -> Option<SendRequest<Incoming>> {
    {
        let mut idle = w.idle[i].borrow_mut();
        if let Some(pos) = idle.iter().rposition(SendRequest::is_ready) {
            return Some(idle.swap_remove(pos));
        }
        idle.retain(|s| !s.is_closed());
    }
    let tcp = TcpStream::connect(w.upstreams[i]).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (sender, conn) = client::handshake(TokioIo::new(tcp)).await.ok()?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Some(sender)
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}
