//! A path the gateway routes one way and its upstream reads another: a way past a route's
//! `allow_clients` (and its methods and rate limit). nginx, the upstream here, decodes
//! percent-encoding and merges slashes before it matches a location, so `/%61dmin/users`,
//! `//admin/users` and `/admin%2Fusers` are its `/admin/` location; the gateway, comparing the
//! path as sent, chose the route of `/` for each, and nginx answered them as admin pages. A
//! host with the trailing dot of a fully qualified name missed its host's route the same way,
//! and a `rewrite_prefix` could make a `..` segment of a path that had none
//! (`/static../admin/users` under prefix `/static` and rewrite `/v1/`). So did a host whose
//! port was no port (`admin.example.com:abc`: routes cut the port at the last `:`, nginx cuts
//! the host at the first), and a path with `;` parameters (`/admin;x/users`, which Tomcat,
//! Jetty and Spring read as `/admin/users`).
//!
//! Now such a path is refused (400) when, spelt plainly, it is another route's; the same
//! spellings within one route still go upstream as sent. The trailing dot is dropped for
//! routing. curl as the client (`--path-as-is`), over HTTP/1.1 and HTTP/2.

use std::net::SocketAddr;

use gateway_testkit::{inprocess::gateway, peers::nginx_listening, tempdir::temp_dir};

/// Status and body: curl with `--path-as-is` and `flags`.
fn curl(url: &str, flags: &[&str]) -> String {
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "5",
                "--path-as-is",
                "-w",
                " %{http_code}",
            ])
            .args(flags)
            .arg(url)
            .output()
            .expect("curl")
    });
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_or_host_an_upstream_reads_as_a_guarded_routes_is_refused_or_routed_there() {
    let dir = temp_dir("paths-nginx");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 64; }}\nhttp {{\n access_log off;\n server {{\n  \
             listen {nginx_addr};\n  server_name admin.example.com;\n  \
             location / {{ return 200 \"admin-vhost\"; }}\n }}\n server {{\n  \
             listen {nginx_addr} default_server;\n  \
             location /admin/ {{ return 200 \"admin\"; }}\n  \
             location /v1/admin/ {{ return 200 \"admin\"; }}\n  \
             location / {{ return 200 \"public\"; }}\n }}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let _nginx = nginx_listening(&dir, &conf, &[nginx_addr]);
    let gw = gateway(
        "paths",
        &format!(
            "[clusters.app]\nendpoints = [\"{nginx_addr}\"]\n\n\
             [[routes]]\nname = \"admin\"\npath_prefix = \"/admin/\"\ncluster = \"app\"\n\
             allow_clients = [\"10.9.9.9/32\"]\n\n\
             [[routes]]\nname = \"admin-host\"\nhost = \"admin.example.com\"\npath_prefix = \"/\"\n\
             cluster = \"app\"\nallow_clients = [\"10.9.9.9/32\"]\n\n\
             [[routes]]\nname = \"static\"\npath_prefix = \"/static\"\nrewrite_prefix = \"/v1/\"\n\
             cluster = \"app\"\n\n\
             [[routes]]\nname = \"public\"\npath_prefix = \"/\"\ncluster = \"app\"\n"
        ),
    )
    .await;
    let base = format!("http://{}", gw.addr);
    for h2 in [false, true] {
        let flags: &[&str] = if h2 {
            &["--http2-prior-knowledge"]
        } else {
            &[]
        };
        let get = |path: &str| curl(&format!("{base}{path}"), flags);
        // The guarded route, spelt plainly: refused by allow_clients.
        let got = get("/admin/users");
        assert!(got.ends_with(" 403"), "HTTP/2: {h2}: {got}");
        for path in [
            "/%61dmin/users",
            "//admin/users",
            "/admin%2Fusers",
            "/admin%2fusers",
            "/%2Fadmin/users",
            "/admin;x=1/users",
        ] {
            let got = get(path);
            assert!(got.ends_with(" 400"), "{path} (HTTP/2: {h2}): {got}");
        }
        // A rewrite that would make a `..` segment.
        let got = get("/static../admin/users");
        assert!(got.ends_with(" 400"), "rewrite (HTTP/2: {h2}): {got}");
        // Within one route, other spellings go upstream as sent.
        for path in ["/p%75blic/x", "//public//x", "/files/a%2Fb", "/static/x"] {
            let got = get(path);
            assert!(got.ends_with(" 200"), "{path} (HTTP/2: {h2}): {got}");
            assert!(!got.contains("admin"), "{path} (HTTP/2: {h2}): {got}");
        }
        // The host's route, with the trailing dot of a fully qualified name.
        for host in [
            "admin.example.com",
            "admin.example.com.",
            "ADMIN.example.com.:80",
        ] {
            let mut f = flags.to_vec();
            let header = format!("Host: {host}");
            f.extend(["-H", header.as_str()]);
            let got = curl(&format!("{base}/x"), &f);
            assert!(got.ends_with(" 403"), "{host} (HTTP/2: {h2}): {got}");
        }
        // A port that is no port: routes took the host up to the last `:`, nginx takes it up
        // to the first.
        if !h2 {
            for host in ["admin.example.com:abc", "admin.example.com:80:90"] {
                let header = format!("Host: {host}");
                let got = curl(&format!("{base}/x"), &["-H", header.as_str()]);
                assert!(got.ends_with(" 400"), "{host}: {got}");
            }
        }
    }
}
