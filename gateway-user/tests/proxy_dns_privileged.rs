//! Endpoints named by host name, end to end: the real binary with its own `/etc/hosts` (a
//! mount namespace of its own, where a file of the test is bound over it), nginx as the
//! upstreams on 127.0.0.1 and 127.0.0.2, curl as the client. Clusters resolve `up.test` every
//! 100 ms.
//!
//! - Slow start for an address DNS adds (a backend scaled up): `up.test` first names
//!   127.0.0.1 only, then both. With slow start the new address takes a small share of 400
//!   requests (its ramp starts at 10 % of its weight), and `/status` shows it warming
//!   (`slow_start_percent`) while the old one is not; without (the control), half at once.
//! - A name that stops resolving keeps its addresses: with `up.test` gone from the file, every
//!   request over ten refreshes still succeeds on both addresses, logged once, counted at
//!   each refresh, and shown in `/status` (`dns`) and on the status page; a reload that changes the cluster's settings meanwhile keeps them too; once
//!   it names 127.0.0.1 alone again, 127.0.0.2 is removed, and logged.
//!
//! Privileged: `unshare --mount` and the bind mount need root. The namespace dies with the
//! gateway; nothing outside it changes.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use gateway_testkit::{
    admin::{admin_get, endpoint, metrics, status},
    config::write_config,
    gateway_bin,
    peers::{curl_bodies, nginx_listening},
    ports::free_port,
    process::GatewayProcess,
    root::require_root,
    tempdir::temp_dir,
};

/// nginx on `port` of both addresses, answering with the address that took the request.
fn nginx_conf(dir: &Path, addrs: &[SocketAddr]) -> std::path::PathBuf {
    let conf = dir.join("nginx.conf");
    let servers: String = addrs
        .iter()
        .map(|a| {
            format!(" server {{ listen {a}; location / {{ return 200 \"$server_addr\"; }} }}\n")
        })
        .collect();
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
             events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n{servers}}}\n",
            d = dir.display(),
        ),
    )
    .unwrap();
    conf
}

/// curl: `n` GETs of `url` one after another on one connection; the address that answered
/// each (or `status:...` for anything but a 200).
fn curl(url: &str, n: usize) -> Vec<String> {
    curl_bodies(url, n, &[])
}

/// The hosts file's text with `up.test` naming `addrs` (none: the name is gone).
fn hosts_text(addrs: &[&str]) -> String {
    let mut t = "127.0.0.1 localhost\n".to_owned();
    for a in addrs {
        t.push_str(&format!("{a} up.test\n"));
    }
    t
}

/// A running gateway whose `/etc/hosts` is `hosts`, nginx on `old` and `new`.
struct Lab {
    gw: GatewayProcess,
    dir: std::path::PathBuf,
    port: u16,
    hosts: std::path::PathBuf,
    old: SocketAddr,
    new: SocketAddr,
    _nginx: gateway_testkit::peers::NginxProcess,
}

impl Lab {
    /// Starts nginx and the gateway with `up.test` naming `first`, and `clusters` (TOML;
    /// `{port}` stands for the upstreams' port).
    fn start(label: &str, first: &[&str], clusters: &str) -> Lab {
        Lab::start_with(label, first, clusters, None)
    }

    /// [`Lab::start`] with `resolv` (a resolv.conf's text) as the gateway's /etc/resolv.conf.
    fn start_with(label: &str, first: &[&str], clusters: &str, resolv: Option<&str>) -> Lab {
        let dir = temp_dir(label);
        let port = free_port();
        let old = SocketAddr::from(([127, 0, 0, 1], port));
        let new = SocketAddr::from(([127, 0, 0, 2], port));
        let nginx = nginx_listening(&dir, &nginx_conf(&dir, &[old, new]), &[old, new]);
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, hosts_text(first)).unwrap();
        let cfg = write_clusters(&dir, port, clusters);
        let resolv_conf = dir.join("resolv.conf");
        match resolv {
            Some(text) => std::fs::write(&resolv_conf, text).unwrap(),
            None => {
                std::fs::copy("/etc/resolv.conf", &resolv_conf).unwrap();
            }
        }
        // Names are looked up in the files, then DNS, whatever the host says (nscd or
        // systemd-resolved would not read the files below).
        let nsswitch = dir.join("nsswitch.conf");
        std::fs::write(&nsswitch, "hosts: files dns\n").unwrap();
        // The gateway sees the test's files as /etc/hosts, /etc/resolv.conf and
        // /etc/nsswitch.conf, in a mount namespace of its own, which the kernel removes when
        // the gateway (exec'd in place of unshare and sh) exits.
        let run = gateway_bin!().run(&cfg);
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind \"$0\" /etc/hosts && mount --bind \"$1\" /etc/resolv.conf \
                 && mount --bind \"$2\" /etc/nsswitch.conf && shift 2 && exec \"$@\"",
            )
            .arg(&hosts)
            .arg(&resolv_conf)
            .arg(&nsswitch)
            .arg(run.get_program())
            .args(run.get_args());
        for (k, v) in run.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        Lab {
            gw: GatewayProcess::spawn(cmd),
            dir,
            port,
            hosts,
            old,
            new,
            _nginx: nginx,
        }
    }

    /// DNS now says `addrs` for `up.test`, in place (the bound file is the same inode).
    fn names(&self, addrs: &[&str]) {
        std::fs::write(&self.hosts, hosts_text(addrs)).unwrap();
    }

    /// Reloads with `clusters` instead (SIGHUP), and waits until the gateway says it did.
    fn reload(&self, clusters: &str) {
        write_clusters(&self.dir, self.port, clusters);
        self.gw.signal(libc::SIGHUP);
        self.gw
            .expect_log("config reloaded", Duration::from_secs(10));
    }

    fn url(&self, cluster: &str) -> String {
        format!("http://{}/{cluster}/", self.gw.addr)
    }
}

/// Writes the gateway's config with `clusters` (`{port}`: the upstreams' port).
fn write_clusters(dir: &Path, port: u16, clusters: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            "{}[observer]\nmode = \"off\"\n",
            clusters.replace("{port}", &port.to_string())
        ),
    )
}

/// A cluster `name` of the endpoint `up.test:{port}`, resolved every 100 ms, and its route.
fn cluster(name: &str, health: &str) -> String {
    format!(
        "[[routes]]\npath_prefix = \"/{name}/\"\ncluster = \"{name}\"\n\
         [clusters.{name}]\nendpoints = [\"up.test:{{port}}\"]\ndns_refresh_ms = 100\n\
         [clusters.{name}.health]\n{health}\n"
    )
}

/// The addresses `cluster` lists in `/status`.
fn listed(admin: SocketAddr, cluster: &str) -> Vec<String> {
    let mut v: Vec<String> = cluster_of(admin, cluster)["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

/// The `dns` entry of `endpoint` in `cluster` of `/status`.
fn dns_of(admin: SocketAddr, cluster: &str, endpoint: &str) -> serde_json::Value {
    let c = cluster_of(admin, cluster);
    c["dns"]
        .as_array()
        .and_then(|d| d.iter().find(|n| n["endpoint"] == endpoint))
        .cloned()
        .unwrap_or_else(|| panic!("no dns entry {endpoint} in cluster {cluster}: {c:#}"))
}

/// The object of `cluster` in `/status` (null when there is none).
fn cluster_of(admin: SocketAddr, cluster: &str) -> serde_json::Value {
    status(admin)["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == cluster))
        .cloned()
        .unwrap_or_default()
}

/// Waits until `/status` lists exactly `addrs` in `cluster`.
fn wait_for(admin: SocketAddr, cluster: &str, addrs: &[SocketAddr]) {
    let mut want: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    want.sort();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got = listed(admin, cluster);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < until,
            "cluster {cluster} lists {got:?}, not {want:?}, after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_address_dns_adds_takes_a_growing_share_not_half_at_once_privileged() {
    require_root();
    let lab = Lab::start(
        "dns-slow-start",
        &["127.0.0.1"],
        &format!(
            "{}{}",
            cluster("ramp", "slow_start_ms = 60000"),
            cluster("plain", "")
        ),
    );
    let (old, new) = (lab.old, lab.new);
    // Before: every request to the one address there is.
    for c in ["ramp", "plain"] {
        let before = curl(&lab.url(c), 10);
        assert!(before.iter().all(|a| a == "127.0.0.1"), "{c}: {before:?}");
    }

    // The backend scales up: DNS names a second address.
    lab.names(&["127.0.0.1", "127.0.0.2"]);
    for c in ["ramp", "plain"] {
        wait_for(lab.gw.admin, c, &[old, new]);
    }
    let s = status(lab.gw.admin);
    let warming = &endpoint(&s, "ramp", new)["slow_start_percent"];
    assert!(
        warming.as_u64().is_some_and(|p| p < 50),
        "the new address should be warming: {warming}"
    );
    assert!(
        endpoint(&s, "ramp", old)["slow_start_percent"].is_null(),
        "the address that was there should not ramp: {s:#}"
    );

    let share = |c: &str| {
        let answers = curl(&lab.url(c), 400);
        assert!(
            answers.iter().all(|a| a == "127.0.0.1" || a == "127.0.0.2"),
            "{c}: {answers:?}"
        );
        answers.iter().filter(|a| *a == "127.0.0.2").count()
    };
    let ramped = share("ramp");
    let control = share("plain");
    eprintln!("the new address took {ramped} of 400 with slow start, {control} without");
    // The round robin offers it every other request, 200; at 10 % of its weight it keeps
    // about 20 of them (Binomial(200, 0.1): 5 and 45 are beyond six standard deviations; the
    // window is a minute, so the ramp stays at its floor while the requests run).
    assert!(
        (5..=45).contains(&ramped),
        "with slow start the new address took {ramped} of 400"
    );
    // Without, it takes every other request.
    assert!(
        (180..=220).contains(&control),
        "without slow start the new address took {control} of 400"
    );
}

#[test]
fn a_name_that_stops_resolving_keeps_its_addresses_until_it_resolves_again_privileged() {
    require_root();
    let lab = Lab::start(
        "dns-outage",
        &["127.0.0.1", "127.0.0.2"],
        &cluster("api", ""),
    );
    let (old, new) = (lab.old, lab.new);
    wait_for(lab.gw.admin, "api", &[old, new]);

    // The name stops resolving (as a DNS server timing out or answering SERVFAIL would):
    // over ten refreshes, both addresses stay, and every request succeeds on both. (Ten where
    // a lookup of a name no file has fails at once, as here; at least until the failure is
    // logged where the host's DNS server takes its time to say so.)
    lab.names(&[]);
    let logged = || {
        lab.gw
            .lines()
            .iter()
            .any(|l| l.contains("cannot resolve endpoint"))
    };
    let until = Instant::now() + Duration::from_secs(1);
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut answers = Vec::new();
    while Instant::now() < until || (!logged() && Instant::now() < give_up) {
        answers.extend(curl(&lab.url("api"), 10));
        assert_eq!(
            listed(lab.gw.admin, "api"),
            [old.to_string(), new.to_string()],
            "the endpoints of a name that does not resolve must stay"
        );
    }
    assert!(
        answers.iter().all(|a| a == "127.0.0.1" || a == "127.0.0.2"),
        "every request should succeed while DNS fails: {answers:?}"
    );
    for a in ["127.0.0.1", "127.0.0.2"] {
        assert!(answers.iter().any(|x| x == a), "{a} took none: {answers:?}");
    }
    let failing: Vec<String> = lab
        .gw
        .lines()
        .into_iter()
        .filter(|l| l.contains("cannot resolve endpoint"))
        .collect();
    assert_eq!(
        failing.len(),
        1,
        "logged once, not at every refresh: {failing:#?}"
    );
    assert!(
        failing[0].contains("keeping its last addresses"),
        "{}",
        failing[0]
    );
    // Counted at every refresh, for an alert, where the log says it once: at least twice
    // (where lookups fail at once, about ten times by now).
    let counted = || {
        let m = metrics(lab.gw.admin);
        m.lines()
            .find_map(|l| l.strip_prefix("gateway_dns_resolution_failures_total{cluster=\"api\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no DNS failure count for api in:\n{m}"))
    };
    while counted() < 2 {
        assert!(
            Instant::now() < give_up,
            "failed resolutions not counted at each refresh"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // `/status` and the status page say which name does not resolve, and why.
    let name = format!("up.test:{}", lab.port);
    let dns = dns_of(lab.gw.admin, "api", &name);
    assert_eq!(dns["resolves"], false, "{dns}");
    assert!(
        dns["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{dns}"
    );
    assert_eq!(
        dns["addresses"],
        serde_json::json!([old.to_string(), new.to_string()]),
        "the addresses it keeps: {dns}"
    );
    let outage_since = dns["since_unix_ms"].as_u64().expect("since_unix_ms");
    let page = admin_get(lab.gw.admin, "/").body;
    assert!(
        page.contains(&format!("<p class=\"dns\" data-endpoint=\"{name}\">")),
        "the status page should say the name does not resolve:\n{page}"
    );

    // A reload that changes the cluster's settings rebuilds it while its name still does not
    // resolve: it keeps the addresses it had, and every request still succeeds.
    lab.reload(&cluster("api", "slow_start_ms = 1000"));
    lab.gw.expect_log(
        "names that do not resolve keep the addresses they had before the reload",
        Duration::from_secs(5),
    );
    assert_eq!(
        listed(lab.gw.admin, "api"),
        [old.to_string(), new.to_string()],
        "a cluster rebuilt by a reload during the outage must keep its addresses"
    );
    // The rebuilt cluster carries the name's state on: the outage's start, and no second
    // line for it.
    let dns = dns_of(lab.gw.admin, "api", &name);
    assert_eq!(dns["since_unix_ms"].as_u64(), Some(outage_since), "{dns}");
    let logged = lab
        .gw
        .lines()
        .iter()
        .filter(|l| l.contains("cannot resolve endpoint"))
        .count();
    assert_eq!(logged, 1, "a reload does not log the outage again");
    let reloaded = curl(&lab.url("api"), 20);
    assert!(
        reloaded
            .iter()
            .all(|a| a == "127.0.0.1" || a == "127.0.0.2"),
        "every request should succeed after the reload: {reloaded:?}"
    );

    // It resolves again, to one address: the other is removed, and both are logged (the lines
    // are read by threads of their own and may lag `/status`).
    lab.names(&["127.0.0.1"]);
    wait_for(lab.gw.admin, "api", &[old]);
    let after = curl(&lab.url("api"), 10);
    assert!(after.iter().all(|a| a == "127.0.0.1"), "{after:?}");
    let limit = Duration::from_secs(5);
    lab.gw.expect_log("endpoint resolves again", limit);
    let dns = dns_of(lab.gw.admin, "api", &name);
    assert_eq!(dns["resolves"], true, "{dns}");
    assert!(dns.get("error").is_none(), "{dns}");
    assert!(
        !admin_get(lab.gw.admin, "/")
            .body
            .contains("<p class=\"dns\"")
    );
    lab.gw.expect_line(
        &["endpoints re-resolved", &format!("removed=[{new}]")],
        limit,
    );
}

#[test]
fn a_dns_server_that_never_answers_costs_a_lookup_five_seconds_not_the_resolvers_thirty_privileged()
{
    require_root();
    // A DNS server on loopback that takes every query and answers none (on the first of
    // 127.0.0.77 to .99 whose port 53 is free), and a resolver told to wait 30 s for it.
    let silent = (77..100)
        .find_map(|last| std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, last], 53))).ok())
        .expect("port 53 is taken on every address from 127.0.0.77 to 127.0.0.99");
    let server = silent.local_addr().unwrap().ip();
    let lab = Lab::start_with(
        "dns-silent",
        &["127.0.0.1"],
        &cluster("api", ""),
        Some(&format!(
            "nameserver {server}\noptions timeout:30 attempts:1\n"
        )),
    );
    let old = lab.old;
    wait_for(lab.gw.admin, "api", &[old]);
    let name = format!("up.test:{}", lab.port);

    // The name leaves the hosts file: the lookup goes to the silent server. Within about five
    // seconds (not thirty) it counts as failed, keeping its address; requests go on.
    lab.names(&[]);
    let asked = std::time::Instant::now();
    let until = asked + Duration::from_secs(15);
    loop {
        let answers = curl(&lab.url("api"), 3);
        assert!(answers.iter().all(|a| a == "127.0.0.1"), "{answers:?}");
        let dns = dns_of(lab.gw.admin, "api", &name);
        if dns["resolves"] == false {
            assert!(
                dns["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no answer within 5 s")),
                "{dns}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the lookup did not give up within 15 s: {dns}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(12), "gave up after {took:?}");
    // One lookup at a time per name: the one still waiting on the resolver's 30 s keeps the
    // name from being looked up again (its A and AAAA queries are all the server gets), where
    // each refresh would have left one more thread waiting.
    std::thread::sleep(Duration::from_secs(6));
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let mut queries = 0;
    while silent.recv(&mut buf).is_ok() {
        queries += 1;
    }
    eprintln!("{queries} queries reached the silent server");
    assert!(
        (1..=2).contains(&queries),
        "{queries} queries reached the silent server in 11 s"
    );

    // A reload while the server stays silent is not held for thirty seconds either, nor for
    // five per cluster: it adds three clusters whose names only the silent server could
    // answer, and their lookups run at once (one after another, they took 15 s).
    let added = ["b", "c", "d"];
    let more: String = added
        .iter()
        .map(|n| cluster(n, "").replace("up.test", &format!("{n}.test")))
        .collect();
    let reload = std::time::Instant::now();
    lab.reload(&(cluster("api", "slow_start_ms = 1000") + &more));
    let took = reload.elapsed();
    eprintln!("the reload with three silent names took {took:?}");
    assert!(took < Duration::from_secs(9), "the reload took {took:?}");
    assert_eq!(listed(lab.gw.admin, "api"), [old.to_string()]);
    for n in added {
        let dns = dns_of(lab.gw.admin, n, &format!("{n}.test:{}", lab.port));
        assert_eq!(dns["resolves"], false, "{n}: {dns}");
        assert!(
            dns["error"]
                .as_str()
                .is_some_and(|e| e.contains("no answer within 5 s")),
            "{n}: {dns}"
        );
    }

    // Nor is the exit: SIGTERM, and the gateway is gone within its drain and a second, not
    // once the resolver gives up.
    let mut gw = lab.gw;
    let stop = std::time::Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw.wait(Duration::from_secs(8));
    assert!(
        status.is_some(),
        "still running {:?} after SIGTERM",
        stop.elapsed()
    );
    eprintln!("exited {:?} after SIGTERM", stop.elapsed());
}
