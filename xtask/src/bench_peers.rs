//! The set-up `bench proxy` and `bench tls` share: three upstreams (one nginx process, one
//! worker, three `return 200` servers) behind the gateway, nginx and HAProxy, configured
//! alike: keep-alive pools to the upstreams, round robin, no access log, `X-Forwarded-For`
//! added. Each proxy gets the machine's cores (gateway: one worker per core; nginx:
//! `worker_processes auto`; HAProxy: `nbthread` = cores).
//!
//! With [`Tls`], the three listen on HTTPS only, with the same certificate and key files, TLS
//! 1.2 and 1.3, ALPN `h2` and `http/1.1`, a session cache and session tickets (what each does
//! by default or with its usual production settings), and add `X-Forwarded-Proto: https`.

use crate::{
    Proc,
    bench::{Scheme, Target, family, free_port, free_ports, spawn_proc, wait_ready},
};
use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;

/// The HTTPS listeners' certificate: PEM chain, PEM key, and both in one file (HAProxy).
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub combined: PathBuf,
}

/// The running proxies (the gateway first) and their upstreams, stopped when dropped.
pub struct Peers {
    pub gateway: Proc,
    pub nginx: Proc,
    pub haproxy: Proc,
    _upstreams: Proc,
    pub upstream_ports: Vec<u16>,
    ports: [u16; 3],
    scheme: Scheme,
    /// A second gateway, with the kernel observer off ([`Peers::add_gateway_without_observer`]).
    without_observer: Option<(Proc, u16)>,
    /// The bare hyper proxy ([`Peers::add_floor`]).
    floor: Option<(Proc, u16)>,
}

impl Peers {
    /// Writes the configs into `dir`, starts everything and waits until each proxy answers.
    pub fn start(dir: &Path, gateway_bin: &Path, tls: Option<&Tls>) -> anyhow::Result<Peers> {
        let ports = free_ports(6)?;
        let (ups, (p_gw, p_nginx, p_haproxy)) =
            (ports[..3].to_vec(), (ports[3], ports[4], ports[5]));
        let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        let up_conf = write("upstreams.conf", upstreams_conf(dir, &ups))?;
        let nginx_conf = write("nginx.conf", nginx_conf(dir, p_nginx, &ups, tls))?;
        let haproxy_conf = write("haproxy.cfg", haproxy_conf(p_haproxy, &ups, tls))?;
        let gw_conf = write("gateway.toml", gateway_conf(p_gw, &ups, tls))?;

        let mut upstreams = spawn_proc("upstreams (nginx)", &mut nginx_command(dir, &up_conf))?;
        for p in &ups {
            wait_ready("upstream", Scheme::Http, *p, &mut upstreams)?;
        }
        let mut gateway = spawn_gateway("gateway", gateway_bin, &gw_conf)?;
        let mut ngx = spawn_proc("nginx", &mut nginx_command(dir, &nginx_conf))?;
        let mut hap = spawn_proc(
            "haproxy",
            Command::new(crate::tool_path("haproxy"))
                .args(["-db", "-f"])
                .arg(&haproxy_conf),
        )?;
        let scheme = if tls.is_some() {
            Scheme::Https
        } else {
            Scheme::Http
        };
        wait_ready("gateway", scheme, p_gw, &mut gateway)?;
        wait_ready("nginx", scheme, p_nginx, &mut ngx)?;
        wait_ready("haproxy", scheme, p_haproxy, &mut hap)?;
        Ok(Peers {
            gateway,
            nginx: ngx,
            haproxy: hap,
            _upstreams: upstreams,
            upstream_ports: ups,
            ports: [p_gw, p_nginx, p_haproxy],
            scheme,
            without_observer: None,
            floor: None,
        })
    }

    /// Starts a second gateway like the first but with `[observer] mode = "off"`: the same
    /// binary, config and upstreams, without the eBPF programs on its connects. It becomes the
    /// second target, `gw-no-obs`, so the report's `gateway/gw-no-obs` ratios are what the
    /// observer costs.
    pub fn add_gateway_without_observer(
        &mut self,
        dir: &Path,
        gateway_bin: &Path,
    ) -> anyhow::Result<()> {
        let port = free_port()?;
        let conf = dir.join("gateway-no-observer.toml");
        std::fs::write(
            &conf,
            format!(
                "{}\n[observer]\nmode = \"off\"\n",
                gateway_conf(port, &self.upstream_ports, None)
            ),
        )?;
        let mut proc = spawn_gateway("gateway (observer off)", gateway_bin, &conf)?;
        wait_ready("gateway (observer off)", self.scheme, port, &mut proc)?;
        self.without_observer = Some((proc, port));
        Ok(())
    }

    /// Starts the bare hyper proxy (floor/src/main.rs) on the same
    /// upstreams: the target `hyper-floor`, what a proxy on hyper and tokio costs with nothing
    /// of the gateway's own per-request work. Plain HTTP only.
    pub fn add_floor(&mut self, bin: &Path) -> anyhow::Result<()> {
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("127.0.0.1:{port}"));
        for p in &self.upstream_ports {
            cmd.arg(format!("127.0.0.1:{p}"));
        }
        let mut proc = spawn_proc("hyper-floor", &mut cmd)?;
        wait_ready("hyper-floor", Scheme::Http, port, &mut proc)?;
        self.floor = Some((proc, port));
        Ok(())
    }

    /// The proxies as benchmark targets, the gateway first (`gw-no-obs` second and
    /// `hyper-floor` last when added).
    pub fn targets(&self) -> Vec<Target> {
        let pids = [
            vec![self.gateway.pid()],
            family(self.nginx.pid()),
            vec![self.haproxy.pid()],
        ];
        let mut targets: Vec<Target> = ["gateway", "nginx", "haproxy"]
            .into_iter()
            .zip(self.ports)
            .zip(pids)
            .map(|((name, port), pids)| Target {
                name,
                url: crate::bench::url(self.scheme, port),
                pids,
            })
            .collect();
        if let Some((proc, port)) = &self.without_observer {
            targets.insert(
                1,
                Target {
                    name: "gw-no-obs",
                    url: crate::bench::url(self.scheme, *port),
                    pids: vec![proc.pid()],
                },
            );
        }
        if let Some((proc, port)) = &self.floor {
            targets.push(Target {
                name: "hyper-floor",
                url: crate::bench::url(self.scheme, *port),
                pids: vec![proc.pid()],
            });
        }
        targets
    }

    /// An error when one of the proxies has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in [&mut self.gateway, &mut self.nginx, &mut self.haproxy] {
            p.check_alive()?;
        }
        for (p, _) in [&mut self.without_observer, &mut self.floor]
            .into_iter()
            .flatten()
        {
            p.check_alive()?;
        }
        Ok(())
    }

    pub fn describe_upstreams(&self) -> String {
        format!(
            "upstreams: 127.0.0.1:{{{}}} (nginx, 1 worker, return 200)",
            self.upstream_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// nginx with its prefix `dir` and config `conf`, logging errors to stderr.
pub(crate) fn nginx_command(dir: &Path, conf: &Path) -> Command {
    let mut c = Command::new(crate::tool_path("nginx"));
    c.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(conf)
        .args(["-e", "stderr"]);
    c
}

pub(crate) fn upstreams_conf(dir: &Path, ports: &[u16]) -> String {
    let mut servers = String::new();
    for p in ports {
        let _ = writeln!(
            servers,
            "  server {{ listen 127.0.0.1:{p} backlog=4096; keepalive_requests 1000000; location / {{ return 200 \"hello from {p}\\n\"; }} }}"
        );
    }
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/upstreams.pid;\nerror_log {d}/upstreams.err warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n{servers}}}\n",
        d = dir.display()
    )
}

pub(crate) fn nginx_conf(dir: &Path, port: u16, ups: &[u16], tls: Option<&Tls>) -> String {
    let servers: String = ups
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    let (listen, tls_lines) = match tls {
        None => (format!("127.0.0.1:{port} backlog=4096"), String::new()),
        Some(t) => (
            format!("127.0.0.1:{port} ssl http2 backlog=4096"),
            format!(
                "    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:SSL:10m;\n    ssl_session_tickets on;\n    proxy_set_header X-Forwarded-Proto https;\n",
                t.cert.display(),
                t.key.display()
            ),
        ),
    };
    format!(
        "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  upstream backend {{\n{servers}    keepalive 128;\n  }}\n  server {{\n    listen {listen};\n    keepalive_requests 1000000;\n{tls_lines}    location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_connect_timeout 5s;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

pub(crate) fn haproxy_conf(port: u16, ups: &[u16], tls: Option<&Tls>) -> String {
    let servers: String = ups
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server u{i} 127.0.0.1:{p}\n"))
        .collect();
    let (bind, tls_lines) = match tls {
        None => (format!("127.0.0.1:{port}"), ""),
        Some(t) => (
            format!(
                "127.0.0.1:{port} ssl crt {} alpn h2,http/1.1 ssl-min-ver TLSv1.2",
                t.combined.display()
            ),
            "  http-request set-header X-Forwarded-Proto https\n",
        ),
    };
    format!(
        "global\n  nbthread {n}\n  maxconn 8000\ndefaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n  option forwardfor\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend fe\n  bind {bind}\n{tls_lines}  default_backend be\nbackend be\n  balance roundrobin\n{servers}",
        n = crate::bench::cores()
    )
}

pub(crate) fn gateway_conf(port: u16, ups: &[u16], tls: Option<&Tls>) -> String {
    let eps: Vec<String> = ups.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    // Both listeners are set: the gateway's plain listener is never driven when TLS is on.
    let (listen, tls_lines) = match tls {
        None => (format!("listen = [\"127.0.0.1:{port}\"]\n"), String::new()),
        Some(t) => (
            format!("listen = [\"127.0.0.1:0\"]\nhttps_listen = [\"127.0.0.1:{port}\"]\n"),
            format!(
                "\n[router.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                t.cert.display(),
                t.key.display()
            ),
        ),
    };
    format!(
        "[router]\n{listen}drain_delay_ms = 0\n{tls_lines}\n[router.upstream]\nlb_policy = \"round_robin\"\nendpoints = [{}]\n\n[admin]\nenabled = false\n\n[access_log]\noutput = \"off\"\n",
        eps.join(", ")
    )
}

/// `gateway run --config CONF`, warnings and errors to `CONF` with the extension `.err`.
fn spawn_gateway(name: &'static str, bin: &Path, conf: &Path) -> anyhow::Result<Proc> {
    let err_log = std::fs::File::create(conf.with_extension("err"))?;
    spawn_proc(
        name,
        Command::new(bin)
            .args(["run", "--config"])
            .arg(conf)
            .env("RUST_LOG", "warn")
            .stderr(err_log),
    )
}

/// Waits until `port` accepts a TCP connection (h2c-only listeners answer no HTTP/1.0 probe).
pub(crate) fn wait_listening(name: &str, port: u16, proc: &mut Proc) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("{name} did not listen on {port} within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The three proxies of a row that wrk does not drive (HTTP/2, WebSocket), each started on
/// the config the row wrote for it (`confs`: the gateway's TOML, nginx's, HAProxy's), and
/// listening on `ports`, in that order.
pub struct Trio {
    procs: [Proc; 3],
}

impl Trio {
    pub const NAMES: [&'static str; 3] = ["gateway", "nginx", "haproxy"];

    pub fn start(
        tag: &str,
        gateway: &Path,
        dir: &Path,
        confs: [String; 3],
        ports: [u16; 3],
    ) -> anyhow::Result<Trio> {
        let write = |name: String, text: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        let gw_conf = write(format!("{tag}-gateway.toml"), &confs[0])?;
        let nginx_conf = write(format!("{tag}-nginx.conf"), &confs[1])?;
        let haproxy_conf = write(format!("{tag}-haproxy.cfg"), &confs[2])?;
        let gw = spawn_proc(
            "gateway",
            Command::new(gateway)
                .args(["run", "--config"])
                .arg(&gw_conf)
                .env("RUST_LOG", "warn")
                .stderr(std::fs::File::create(
                    dir.join(format!("{tag}-gateway.err")),
                )?),
        )?;
        let ngx = spawn_proc("nginx", &mut nginx_command(dir, &nginx_conf))?;
        let hap = spawn_proc(
            "haproxy",
            Command::new(crate::tool_path("haproxy"))
                .args(["-db", "-f"])
                .arg(&haproxy_conf),
        )?;
        let mut trio = Trio {
            procs: [gw, ngx, hap],
        };
        for (i, p) in trio.procs.iter_mut().enumerate() {
            wait_listening(Trio::NAMES[i], ports[i], p)?;
        }
        Ok(trio)
    }

    /// The processes whose CPU time each target costs (nginx's workers with their master).
    pub fn pids(&self) -> [Vec<u32>; 3] {
        [
            vec![self.procs[0].pid()],
            crate::bench::family(self.procs[1].pid()),
            vec![self.procs[2].pid()],
        ]
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> Tls {
        Tls {
            cert: "/t/cert.pem".into(),
            key: "/t/key.pem".into(),
            combined: "/t/both.pem".into(),
        }
    }

    #[test]
    fn tls_configs_listen_on_https_with_the_same_files() {
        let n = nginx_conf(Path::new("/d"), 9443, &[1, 2], Some(&tls()));
        assert!(n.contains("listen 127.0.0.1:9443 ssl http2"), "{n}");
        assert!(n.contains("ssl_certificate /t/cert.pem;"), "{n}");
        assert!(n.contains("ssl_certificate_key /t/key.pem;"), "{n}");
        let h = haproxy_conf(9443, &[1, 2], Some(&tls()));
        assert!(h.contains("bind 127.0.0.1:9443 ssl crt /t/both.pem"), "{h}");
        let g = gateway_conf(9443, &[1, 2], Some(&tls()));
        assert!(g.contains("https_listen = [\"127.0.0.1:9443\"]"), "{g}");
        assert!(g.contains("cert_file = \"/t/cert.pem\""), "{g}");
        // The [router.tls] table comes before the next table, not inside [router.upstream].
        assert!(g.find("[router.tls]") < g.find("[router.upstream]"), "{g}");
        let plain = gateway_conf(9080, &[1], None);
        assert!(
            !plain.contains("https") && plain.contains("127.0.0.1:9080"),
            "{plain}"
        );
    }
}
