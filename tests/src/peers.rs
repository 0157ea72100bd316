//! Real third-party peers for the protocol tests, run as child processes: Python's
//! `websockets` (server and client), `grpcio` (server and client, with stubs generated at
//! test time by `grpcio-tools`) and `h2` (an HTTP/2 client), from the venv `./dev` installs (`~/.cache/gateway/
//! protocols-venv`), and nginx serving HTTP/2 with prior knowledge (h2c). A missing peer fails
//! the test with the command that installs it; nothing is skipped.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The venv's Python, or a panic saying how to get it.
pub fn python() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let py = home.join(".cache/gateway/protocols-venv/bin/python3");
    assert!(
        py.is_file(),
        "{} is missing: run `./dev setup` (it installs websockets, grpcio and h2 from PyPI into that venv)",
        py.display()
    );
    py
}

/// A child process killed when dropped.
pub struct Peer {
    pub child: Child,
    /// The address it printed as its first line, when it serves.
    pub addr: Option<SocketAddr>,
    pub stderr: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("a serving peer")
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// Writes `code` to DIR/NAME and starts it with the venv's Python and `args`; a server prints
/// its port on its first line, which this waits for (10 s).
pub fn serve_python(dir: &Path, name: &str, code: &str, args: &[&str]) -> Peer {
    let script = dir.join(name);
    std::fs::write(&script, code).unwrap();
    let stderr = dir.join(format!("{name}.err"));
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("starting python");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| {
        let _ = child.kill();
        panic!(
            "{name} did not print its port (got {line:?}); stderr:\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        )
    });
    Peer {
        child,
        addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        stderr,
    }
}

/// Runs a Python client script to its end (at most `limit`); its stdout, parsed as JSON.
pub fn run_python(
    dir: &Path,
    name: &str,
    code: &str,
    args: &[&str],
    limit: Duration,
) -> serde_json::Value {
    let script = dir.join(name);
    std::fs::write(&script, code).unwrap();
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{name} ran longer than {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} failed ({}): stdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{name} printed no JSON ({e}): {stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Opens `total` streams in batches of `batch`, waits `pause` seconds for the gateway to
/// accept each batch, resets every `reset_every`-th stream of it (CANCEL) and reads the
/// others' responses, and goes on until the connection ends. Prints what it saw as JSON.
/// A `pause` of 0 sends each batch's HEADERS and its RST_STREAMs in one write, so that the
/// gateway reads the resets before it has accepted the streams.
/// Arguments: HOST PORT TOTAL BATCH PAUSE RESET_EVERY [SNI]; with SNI, over TLS with ALPN
/// `h2` (the certificate is not checked).
pub const H2_RESET_CLIENT: &str = r#"
import json, select, socket, sys, time
import ssl
import h2.config, h2.connection, h2.errors, h2.events
host, port, total, batch, pause, reset_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
s = socket.create_connection((host, port))
if len(sys.argv) > 7:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(s, server_hostname=sys.argv[7])
    assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection(); s.sendall(c.data_to_send())
out = {"opened": 0, "reset": 0, "answered": 0, "ended": None}
kept = set()
def pump(wait):
    deadline = time.time() + wait
    while out["ended"] is None:
        left = deadline - time.time()
        if not (getattr(s, "pending", lambda: 0)() or select.select([s], [], [], max(left, 0))[0]):
            if left <= 0: return
            continue
        try:
            d = s.recv(65536)
        except OSError as e:
            out["ended"] = "error: %s" % e; return
        if not d:
            out["ended"] = "closed"; return
        for e in c.receive_data(d):
            if isinstance(e, h2.events.ConnectionTerminated):
                out["ended"] = "goaway %d" % e.error_code
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id in kept:
                out["answered"] += 1
        s.sendall(c.data_to_send())
try:
    while out["opened"] < total and out["ended"] is None:
        ids = []
        for _ in range(batch):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "%s:%d" % (host, port)), (":path", "/delay/200")], end_stream=True)
            out["opened"] += 1
            if out["opened"] % reset_every == 0: ids.append(sid)
            else: kept.add(sid)
        if pause > 0:
            s.sendall(c.data_to_send())
            pump(pause)
        # A GOAWAY read while pumping closes the connection, and h2 refuses a reset on it.
        if out["ended"] is not None: break
        for sid in ids:
            c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL); out["reset"] += 1
        s.sendall(c.data_to_send())
    # What is still to come: the kept streams' responses, or the connection's end.
    pump(1.0)
except OSError as e:
    out["ended"] = out["ended"] or "error: %s" % e
print(json.dumps(out))
"#;

/// A `websockets` echo server. A text message `__request__` is answered with what the server
/// saw of the upgrade request (path and headers), as JSON.
pub const WS_ECHO_SERVER: &str = r#"
import asyncio, json, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for m in ws:
        if m == "__request__":
            h = ws.request.headers
            await ws.send(json.dumps({"path": ws.request.path,
                                      "x-forwarded-for": h.get("x-forwarded-for"),
                                      "x-request-id": h.get("x-request-id"),
                                      "via": h.get("via")}))
        else:
            await ws.send(m)

async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None, ping_interval=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()

asyncio.run(main())
"#;

/// A `websockets` client. Modes: `echo URL N` (N text messages, one of 1 MiB binary, then
/// `__request__`; closes cleanly), `hold URL` (opens, one echo, prints `open` on stderr, then
/// waits for the gateway to close the connection: how long it took and how), `status URL`
/// (the status of the handshake's answer: 101, or the one it was refused with).
pub const WS_CLIENT: &str = r#"
import asyncio, json, os, sys, time
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

async def echo(url, n):
    async with connect(url, max_size=None, ping_interval=None, open_timeout=10) as ws:
        out = {"status": ws.response.status_code,
               "headers": {k.lower(): v for k, v in ws.response.headers.raw_items()}}
        ok = 0
        for i in range(n):
            msg = "hello %d" % i
            await ws.send(msg)
            ok += (await ws.recv()) == msg
        # Random: permessage-deflate would shrink anything regular to nothing.
        big = os.urandom(1 << 20)
        await ws.send(big)
        out["big_ok"] = (await ws.recv()) == big
        await ws.send("__request__")
        out["seen"] = json.loads(await ws.recv())
        out["echoed"] = ok
    print(json.dumps(out))

async def hold(url):
    async with connect(url, ping_interval=None, open_timeout=10, close_timeout=1) as ws:
        # Timed from before the last message: the gateway's idle timer starts after it.
        start = time.monotonic()
        await ws.send("ping")
        assert (await ws.recv()) == "ping"
        print("open", file=sys.stderr, flush=True)
        try:
            await ws.recv()
            how = "message"
        except ConnectionClosed as e:
            how = "closed %s" % (e.rcvd.code if e.rcvd else "abnormally")
        print(json.dumps({"held_ms": (time.monotonic() - start) * 1000, "how": how}))

async def status(url):
    try:
        async with connect(url, ping_interval=None, open_timeout=10) as ws:
            print(json.dumps({"status": ws.response.status_code}))
    except InvalidStatus as e:
        print(json.dumps({"status": e.response.status_code}))

mode, url = sys.argv[1], sys.argv[2]
if mode == "echo":
    asyncio.run(echo(url, int(sys.argv[3])))
elif mode == "status":
    asyncio.run(status(url))
else:
    asyncio.run(hold(url))
"#;

/// The gRPC service of the tests.
pub const PROTO: &str = r#"
syntax = "proto3";
package gwtest;
service Echo {
  rpc Unary(Msg) returns (Msg);
  rpc ServerStream(Count) returns (stream Msg);
  rpc ClientStream(stream Msg) returns (Count);
  rpc Bidi(stream Msg) returns (stream Msg);
  rpc Fail(Msg) returns (Msg);
  rpc Slow(Count) returns (Msg);
  rpc Remaining(Msg) returns (Msg);
  rpc Flaky(Msg) returns (Msg);
}
message Msg { string text = 1; }
message Count { int32 n = 1; }
"#;

/// Generates the Python stubs of [`PROTO`] into `dir` with grpcio-tools.
pub fn grpc_stubs(dir: &Path) {
    std::fs::write(dir.join("gwtest.proto"), PROTO).unwrap();
    let out = Command::new(python())
        .args([
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--grpc_python_out=.",
        ])
        .arg("gwtest.proto")
        .current_dir(dir)
        .output()
        .expect("running grpc_tools.protoc");
    assert!(
        out.status.success(),
        "protoc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A grpcio server of the `Echo` service. `Unary` answers with trailing metadata, `Fail`
/// aborts with NOT_FOUND, `Slow` sleeps `n` ms, `Remaining` answers how much of the call's
/// deadline it was given, `Flaky` answers UNAVAILABLE the first time it sees a text. An
/// argument, if any, is the streams it allows per connection (`grpc.max_concurrent_streams`,
/// its `SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const GRPC_SERVER: &str = r#"
import sys, time, threading
from concurrent import futures
import grpc
import gwtest_pb2 as pb, gwtest_pb2_grpc as rpc

seen = set()
lock = threading.Lock()

class Echo(rpc.EchoServicer):
    def Unary(self, req, ctx):
        ctx.set_trailing_metadata((("x-trailer", "t-" + req.text),))
        return pb.Msg(text="echo " + req.text)
    def ServerStream(self, req, ctx):
        for i in range(req.n):
            yield pb.Msg(text="item %d" % i)
    def ClientStream(self, reqs, ctx):
        return pb.Count(n=sum(1 for _ in reqs))
    def Bidi(self, reqs, ctx):
        for r in reqs:
            yield pb.Msg(text="re " + r.text)
    def Fail(self, req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + req.text)
    def Slow(self, req, ctx):
        time.sleep(req.n / 1000.0)
        return pb.Msg(text="slept")
    def Remaining(self, req, ctx):
        r = ctx.time_remaining()
        return pb.Msg(text="none" if r is None else "%d" % int(r * 1000))
    def Flaky(self, req, ctx):
        with lock:
            first = req.text not in seen
            seen.add(req.text)
        if first:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.Msg(text="ok " + req.text)

options = [("grpc.max_concurrent_streams", int(sys.argv[1]))] if len(sys.argv) > 1 else []
server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options)
rpc.add_EchoServicer_to_server(Echo(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

/// A grpcio client. `calls TARGET`: every kind of call, and an error status; `one TARGET
/// METHOD TEXT TIMEOUT_S`: one unary call, its result or its status and details; `slow TARGET
/// N MS TIMEOUT_S`: N `Slow(MS)` calls at once, their results; `stream TARGET N MS TIMEOUT_S`:
/// a `ClientStream` call of N messages, MS apart (TIMEOUT_S `none`: no deadline, so no
/// `grpc-timeout`), its count or its status.
pub const GRPC_CLIENT: &str = r#"
import json, sys
import grpc
import gwtest_pb2 as pb, gwtest_pb2_grpc as rpc

def status(e):
    return {"code": e.code().name, "details": e.details()}

def calls(stub):
    out = {}
    resp, call = stub.Unary.with_call(pb.Msg(text="a"), timeout=10)
    out["unary"] = resp.text
    out["trailer"] = dict(call.trailing_metadata()).get("x-trailer")
    out["server_stream"] = [m.text for m in stub.ServerStream(pb.Count(n=50), timeout=10)]
    out["client_stream"] = stub.ClientStream(iter([pb.Msg(text=str(i)) for i in range(40)]), timeout=10).n
    out["bidi"] = [m.text for m in stub.Bidi(iter([pb.Msg(text=str(i)) for i in range(30)]), timeout=10)]
    try:
        stub.Fail(pb.Msg(text="x"), timeout=10)
        out["fail"] = None
    except grpc.RpcError as e:
        out["fail"] = status(e)
    return out

def one(stub, method, text, timeout):
    try:
        if method == "Slow":
            r = stub.Slow(pb.Count(n=int(text)), timeout=timeout)
        else:
            r = getattr(stub, method)(pb.Msg(text=text), timeout=timeout)
        return {"ok": r.text}
    except grpc.RpcError as e:
        return status(e)

target = sys.argv[2]
with grpc.insecure_channel(target) as ch:
    stub = rpc.EchoStub(ch)
    if sys.argv[1] == "calls":
        print(json.dumps(calls(stub)))
    elif sys.argv[1] == "stream":
        import time
        n, ms = int(sys.argv[3]), int(sys.argv[4])
        timeout = None if sys.argv[5] == "none" else float(sys.argv[5])
        def msgs():
            for i in range(n):
                if i:
                    time.sleep(ms / 1000.0)
                yield pb.Msg(text=str(i))
        try:
            print(json.dumps({"ok": stub.ClientStream(msgs(), timeout=timeout).n}))
        except grpc.RpcError as e:
            print(json.dumps(status(e)))
    elif sys.argv[1] == "slow":
        from concurrent import futures
        n, ms, timeout = int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
        with futures.ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(lambda _: one(stub, "Slow", ms, timeout), range(n)))
        print(json.dumps({"results": results}))
    else:
        print(json.dumps(one(stub, sys.argv[3], sys.argv[4], float(sys.argv[5]))))
"#;

/// An nginx started by [`spawn_nginx`]: master and workers killed together when dropped.
///
/// Killing the master alone (`Child::kill`, SIGKILL) leaves its worker running, orphaned,
/// with the listening socket open: every test that used nginx left one behind, and a suite
/// run left dozens.
pub struct NginxProcess(Child);

/// Spawns `cmd` (an nginx with `daemon off`) in a process group of its own, so that dropping
/// the result can kill the master and its workers at once.
pub fn spawn_nginx(cmd: &mut Command) -> NginxProcess {
    use std::os::unix::process::CommandExt as _;
    NginxProcess(
        cmd.process_group(0)
            .spawn()
            .expect("nginx (Debian's nginx-light, installed by ./dev) starts"),
    )
}

impl Drop for NginxProcess {
    fn drop(&mut self) {
        // The group's ID is the master's PID (`process_group(0)`).
        let group = self.0.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; a negative PID names the group.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Debian's nginx with the config `conf` (`daemon off`; relative paths under `dir`), once it
/// listens on every one of `addrs` (within 5 s).
pub fn nginx_listening(dir: &Path, conf: &Path, addrs: &[SocketAddr]) -> NginxProcess {
    let process = spawn_nginx(
        Command::new("/usr/sbin/nginx")
            .args(["-e", "stderr", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    for a in addrs {
        while std::net::TcpStream::connect(a).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {a}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    process
}

/// A peer's log file once it has at least `at_least` lines and has stopped growing (unchanged
/// over 100 ms), read for at most 5 s. nginx writes a request's log line when it finalizes the
/// request, after the client may already have the answer: a log read right after the last
/// answer can miss its line.
pub fn settled_log(path: &Path, at_least: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let again = std::fs::read_to_string(path).unwrap_or_default();
        let settled = again == text && again.lines().count() >= at_least;
        if settled || Instant::now() >= deadline {
            return again;
        }
        text = again;
    }
}

/// nginx serving HTTP/2 with prior knowledge (h2c) on a loopback port, answering `200` with
/// the protocol it spoke and its connection number; `extra` goes into the server block.
/// Its access log (`$server_protocol $connection $status $request_uri $http_x_request_id`)
/// is DIR/h2c-access.log.
pub struct NginxH2c {
    pub addr: SocketAddr,
    pub log: PathBuf,
    _process: NginxProcess,
}

pub fn nginx_h2c(dir: &Path, extra: &str) -> NginxH2c {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.join("h2c-access.log");
    let conf = dir.join("nginx-h2c.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx-h2c.pid;\nerror_log {d}/nginx-h2c.err;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n log_format p '$server_protocol $connection $status $request_uri $http_x_request_id';\n\
             access_log {log} p;\n server {{\n  listen 127.0.0.1:{port} http2;\n  {extra}\n\
             location / {{ return 200 \"proto=$server_protocol conn=$connection\\n\"; }}\n }}\n}}\n",
            d = dir.display(),
            log = log.display(),
        ),
    )
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let process = nginx_listening(dir, &conf, &[addr]);
    NginxH2c {
        addr,
        log,
        _process: process,
    }
}

/// The result of an `h2load` run.
#[derive(Debug)]
pub struct H2load {
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub status_2xx: u64,
    pub status_4xx: u64,
    pub text: String,
}

/// Runs `h2load` (Debian's nghttp2-client) against `url` with `args`.
pub fn h2load(url: &str, args: &[&str]) -> H2load {
    let out = Command::new("h2load")
        .args(args)
        .arg(url)
        .output()
        .expect("h2load (Debian's nghttp2-client, installed by ./dev)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "h2load failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let num = |line: &str, key: &str| -> u64 {
        line.split(',')
            .find_map(|p| {
                let p = p.trim();
                p.strip_suffix(key).and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let mut r = H2load {
        succeeded: 0,
        failed: 0,
        errored: 0,
        status_2xx: 0,
        status_4xx: 0,
        text: text.clone(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("requests:") {
            r.succeeded = num(rest, "succeeded");
            r.failed = num(rest, "failed");
            r.errored = num(rest, "errored");
        }
        if let Some(rest) = line.strip_prefix("status codes:") {
            r.status_2xx = num(rest, "2xx");
            r.status_4xx = num(rest, "4xx");
        }
    }
    r
}

/// curl: `n` GETs of `url` one after another on one connection, with `args` (headers, say);
/// the body of each `200`, or `status:` and the line for anything else. A body must be one
/// line without spaces (an address or a port, as the upstreams of these tests answer).
pub fn curl_bodies(url: &str, n: usize, args: &[&str]) -> Vec<String> {
    let mut c = std::process::Command::new("curl");
    c.arg("-s").args(args);
    for _ in 0..n {
        c.arg(url);
    }
    let out = c.args(["-w", " %{http_code}\n"]).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.rsplit_once(' ') {
            Some((body, "200")) => body.to_owned(),
            _ => format!("status:{l}"),
        })
        .collect()
}

/// curl: `n` GETs of `url` one after another (on one connection, unless `args` say
/// otherwise), each within 5 s, with `args` (headers, `-k`, say); the status code of each
/// (`000` for none), bodies discarded.
pub fn curl_codes(url: &str, n: usize, args: &[&str]) -> Vec<String> {
    let mut c = std::process::Command::new("curl");
    c.args(["-s", "--max-time", "5", "-w", "%{http_code}\n"])
        .args(args);
    for _ in 0..n {
        c.args(["-o", "/dev/null", url]);
    }
    let out = c.output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
