//! `lb_policy = "consistent_hash"` end to end, with nginx as three upstreams (each answering
//! with its port) and curl as the client, over HTTP/1.1 and HTTP/2:
//!
//! - on a header, a cookie, or the client (the one a trusted proxy names): every request with
//!   the same key reaches the same endpoint, and keys spread over the endpoints; `/status`
//!   says what each cluster hashes on;
//! - a request without the key is balanced round robin;
//! - a dead endpoint (refused) in the list: the keys it owned go, from their first request on,
//!   to their next endpoint, and every key is where a cluster without it sends it;
//! - `hash_balance_factor`: one hot key's concurrent requests spill past its endpoint's bound
//!   to the key's next endpoints (Python's `ThreadingHTTPServer` as slow upstreams, curl
//!   `--parallel`), and stay on it one at a time.
//!
//! Unprivileged: loopback only; nginx is Debian's (installed by `./dev`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    process::Command,
};

use gateway_testkit::{
    admin::status,
    inprocess::gateway,
    peers::{NginxProcess, nginx_listening},
    ports::{free_port, refused_addr},
    tempdir::temp_dir,
};

/// nginx on three loopback ports, each answering `200` with its port.
fn nginx3(dir: &Path) -> (Vec<SocketAddr>, NginxProcess) {
    let ports = [free_port(), free_port(), free_port()];
    let servers: String = ports
        .iter()
        .map(|p| {
            format!(" server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"$server_port\"; }} }}\n")
        })
        .collect();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n access_log off;\n{servers}}}\n",
            d = dir.display(),
        ),
    )
    .unwrap();
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let process = nginx_listening(dir, &conf, &addrs);
    (addrs, process)
}

/// curl: `n` GETs of `url` on one connection with `args` (headers, cookies, `--http2-prior-knowledge`);
/// each answer's body (the upstream's port), or `status:NNN` for anything but a 200.
fn curl(url: &str, n: usize, args: &[&str]) -> Vec<String> {
    let mut c = Command::new("curl");
    c.args(["-s", "-H", "Host: test.local"]).args(args);
    for _ in 0..n {
        c.arg(url);
    }
    let out = c.args(["-w", " %{http_code}\n"]).output().expect("curl");
    ports(&out.stdout)
}

/// curl's `-w` lines, `PORT STATUS`: the port of each 200, or `status:LINE` for anything else.
fn ports(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| match l.rsplit_once(' ') {
            Some((port, "200")) => port.to_owned(),
            _ => format!("status:{l}"),
        })
        .collect()
}

/// Keys per cluster: enough that the dead endpoint, a quarter of the weight, owns some
/// ((3/4)^48, about 1e-6, that it owns none).
const KEYS: usize = 48;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_the_same_key_reach_the_same_endpoint_and_a_dead_one_moves_only_its_keys() {
    let dir = temp_dir("consistent-hash-nginx");
    let (up, _nginx) = nginx3(&dir);
    let dead = refused_addr();
    let list = |extra: Option<SocketAddr>| {
        let mut l: Vec<String> = up.iter().map(|a| format!("\"{a}\"")).collect();
        l.extend(extra.map(|a| format!("\"{a}\"")));
        l.join(", ")
    };
    let gw = gateway(
        "consistent-hash",
        &format!(
            r#"
[router.forwarded]
trusted_proxies = ["127.0.0.0/8"]

[[routes]]
path_prefix = "/user/"
cluster = "user"

[[routes]]
path_prefix = "/user3/"
cluster = "user3"

[[routes]]
path_prefix = "/cookie/"
cluster = "cookie"

[[routes]]
path_prefix = "/client/"
cluster = "client"

[clusters.user]
endpoints = [{with_dead}]
lb_policy = "consistent_hash"
hash_on = "header:x-user"

[clusters.user3]
endpoints = [{three}]
lb_policy = "consistent_hash"
hash_on = "header:x-user"

[clusters.cookie]
endpoints = [{three}]
lb_policy = "consistent_hash"
hash_on = "cookie:session"

[clusters.client]
endpoints = [{three}]
lb_policy = "consistent_hash"
"#,
            with_dead = list(Some(dead)),
            three = list(None),
        ),
    )
    .await;
    let base = format!("http://{}", gw.addr);
    let run = |path: &str, n: usize, args: Vec<String>| {
        let url = format!("{base}{path}");
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&url, n, &args)
        })
    };
    // Each key: 3 requests on one connection, all to one endpoint. Returns key → port.
    let per_key = |path: &'static str, arg: fn(usize) -> Vec<String>| {
        let run = &run;
        async move {
            let mut owner = BTreeMap::new();
            for k in 0..KEYS {
                let got = run(path, 3, arg(k)).await.unwrap();
                let ports: BTreeSet<&String> = got.iter().collect();
                assert_eq!(ports.len(), 1, "{path} key {k}: {got:?}");
                let port = got[0].clone();
                assert!(!port.starts_with("status"), "{path} key {k}: {got:?}");
                owner.insert(k, port);
            }
            let spread: BTreeSet<&String> = owner.values().collect();
            assert!(
                spread.len() >= 2,
                "{path}: 24 keys on one endpoint: {owner:?}"
            );
            owner
        }
    };
    let header = |k: usize| vec!["-H".to_owned(), format!("x-user: user-{k}")];
    let users = per_key("/user3/", header).await;
    // The same cluster with a dead endpoint in its list: a key it would own goes to the key's
    // next endpoint (tried, then ejected), which is where the cluster without it sends the key;
    // every other key is where it was. So every key is where the three-endpoint cluster sends it.
    let with_dead = per_key("/user/", header).await;
    assert_eq!(users, with_dead);
    per_key("/cookie/", |k| {
        vec!["-b".to_owned(), format!("theme=dark; session=s-{k}")]
    })
    .await;
    per_key("/client/", |k| {
        vec!["-H".to_owned(), format!("x-forwarded-for: 203.0.113.{k}")]
    })
    .await;
    // HTTP/2: the same key, the same endpoint as over HTTP/1.1. One request per curl: curl
    // 7.88 sends nothing for a second URL on a prior-knowledge connection (nor to nginx).
    for _ in 0..3 {
        let args = ["--http2-prior-knowledge", "-H", "x-user: user-5"];
        let h2 = run("/user3/", 1, args.map(str::to_owned).to_vec());
        assert_eq!(h2.await.unwrap(), [users[&5].clone()]);
    }
    // /status says what each cluster hashes on.
    let admin = gw.handle.admin_addr().unwrap();
    let s = tokio::task::spawn_blocking(move || status(admin))
        .await
        .unwrap();
    let hash_on = |name: &str| {
        s["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| (c["lb_policy"].clone(), c["hash_on"].clone()))
            .unwrap()
    };
    assert_eq!(
        hash_on("user"),
        ("consistent_hash".into(), "header:x-user".into())
    );
    assert_eq!(hash_on("cookie").1, "cookie:session");
    assert_eq!(hash_on("client").1, "client");
    // No key: round robin over the three.
    let got = run("/user3/", 6, Vec::new()).await.unwrap();
    let ports: BTreeSet<&String> = got.iter().collect();
    assert_eq!(ports.len(), 3, "{got:?}");
}

/// A Python (stdlib `ThreadingHTTPServer`) upstream that answers each GET after 300 ms with its
/// port (body and `x-port`), so that concurrent requests are in flight together.
const SLOW_SERVER: &str = r#"
import time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(0.3)
        body = str(self.server.server_address[1]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-port", body.decode())
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class S(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

s = S(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// curl: `n` GETs of `url` at once (`--parallel`), all with the key `hot`: the port each
/// reached (its `x-port`: the bodies of parallel transfers interleave on stdout).
fn curl_parallel(url: &str, n: usize) -> Vec<String> {
    let mut c = Command::new("curl");
    c.args(["-s", "--parallel", "--parallel-immediate", "--parallel-max"])
        .arg(n.to_string())
        .args(["-H", "Host: test.local", "-H", "X-User: hot"]);
    for _ in 0..n {
        c.args(["-o", "/dev/null"]).arg(url);
    }
    let out = c
        .args(["-w", "%header{x-port} %{http_code}\n"])
        .output()
        .expect("curl");
    ports(&out.stdout)
}

/// `hash_balance_factor`: one hot key, 24 requests in flight at once. Unbounded, all 24 go to
/// the key's endpoint; bounded at 125 %, the key's endpoint holds at most its bound and the
/// rest spill to the key's next endpoints, each spill counted on the key's endpoint. One at a
/// time, the key stays on its endpoint either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_spills_over_its_endpoints_bound_and_stays_put_under_light_load() {
    let dir = temp_dir("consistent-hash-bounded");
    let ups: Vec<_> = (0..3)
        .map(|i| {
            gateway_testkit::peers::serve_python(&dir, &format!("slow{i}.py"), SLOW_SERVER, &[])
        })
        .collect();
    let list: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr())).collect();
    let cluster = |name: &str, factor: &str| {
        format!(
            "[[routes]]\npath_prefix = \"/{name}/\"\ncluster = \"{name}\"\n\
             [clusters.{name}]\nendpoints = [{}]\nlb_policy = \"consistent_hash\"\n\
             hash_on = \"header:x-user\"\n{factor}\n\
             [clusters.{name}.limits]\nmax_connections = 256\n",
            list.join(", ")
        )
    };
    let gw = gateway(
        "consistent-hash-bounded",
        &(cluster("bounded", "hash_balance_factor = 125") + &cluster("unbounded", "")),
    )
    .await;
    let (addr, admin) = (gw.addr, gw.handle.admin_addr().unwrap());
    tokio::task::spawn_blocking(move || {
        let _ups = ups;
        let count = |ports: &[String]| {
            let mut by: BTreeMap<String, usize> = BTreeMap::new();
            for p in ports {
                *by.entry(p.clone()).or_default() += 1;
            }
            by
        };
        // Light load: one request at a time, all to the key's endpoint.
        let one_by_one: Vec<String> = (0..4)
            .flat_map(|_| curl_parallel(&format!("http://{addr}/bounded/x"), 1))
            .collect();
        let by = count(&one_by_one);
        assert!(
            by.len() == 1 && !one_by_one[0].starts_with("status:"),
            "{by:?}"
        );
        let owner = one_by_one[0].clone();

        let unbounded = count(&curl_parallel(&format!("http://{addr}/unbounded/x"), 24));
        assert_eq!(unbounded.get(&owner), Some(&24), "{unbounded:?}");

        let bounded = count(&curl_parallel(&format!("http://{addr}/bounded/x"), 24));
        assert_eq!(bounded.values().sum::<usize>(), 24, "{bounded:?}");
        let answered = |by: &BTreeMap<String, usize>| !by.keys().any(|k| k.starts_with("status:"));
        assert!(answered(&bounded), "{bounded:?}");
        let kept = bounded.get(&owner).copied().unwrap_or(0);
        eprintln!("24 at once, bounded: {bounded:?} (key endpoint {owner})");
        // 24 in flight: at most ceil(1.25 x 24 / 3) = 10 each, if they overlap as meant.
        assert!((1..=12).contains(&kept), "{bounded:?}");
        assert!(bounded.len() >= 2, "{bounded:?}");
        let m = gateway_testkit::admin::metrics(admin);
        let spills = |cluster: &str| {
            let endpoint = format!("127.0.0.1:{owner}");
            gateway_testkit::admin::sample(
                &m,
                "gateway_endpoint_hash_spills_total",
                &[("cluster", cluster), ("endpoint", &endpoint)],
            )
            .unwrap_or(0.0)
        };
        assert_eq!(spills("bounded"), (24 - kept) as f64, "{m}");
        assert_eq!(spills("unbounded"), 0.0);
    })
    .await
    .unwrap();
    drop(gw);
}
