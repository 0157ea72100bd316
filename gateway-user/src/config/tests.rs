//! Unit tests for loading, defaults, error locations and warnings.

use std::{path::Path, time::Duration};

use super::{
    test_util::{err, load},
    *,
};

const COMMON: &str = r#"
[router]
listener_port = 8080

[router.upstream]
endpoints = ["127.0.0.1:9000"]

[router.upstream.timeouts]
connect_timeout_ms = 6000
"#;

#[test]
fn common_layout_is_accepted() {
    let l = load(COMMON).unwrap();
    let s = l.settings;
    assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
    let c = &s.clusters["default"];
    assert_eq!(c.timeouts.connect, Duration::from_millis(6000));
    assert_eq!(s.routes.len(), 1);
    assert_eq!(s.routes[0].cluster, "default");
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

#[test]
fn connect_timeout_defaults_to_5000_ms() {
    let text = "[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n";
    let s = load(text).unwrap().settings;
    let t = s.clusters["default"].timeouts;
    assert_eq!(
        t.connect,
        Duration::from_millis(model::DEFAULT_CONNECT_TIMEOUT_MS)
    );
    assert_eq!(t.connect, Duration::from_secs(5));
    assert_eq!(s.admin, Some("127.0.0.1:9901".parse().unwrap()));
}

#[test]
fn clusters_inherit_from_router_upstream_and_override() {
    let text = r#"
[router]
listen = ["127.0.0.1:8080"]
[router.upstream.timeouts]
connect_timeout_ms = 700
response_timeout_ms = 900
[[routes]]
path_prefix = "/api"
cluster = "api"
[[routes]]
host = "*.example.com"
cluster = "web"
[clusters.api]
endpoints = ["127.0.0.1:1", { address = "localhost:2", weight = 3 }]
lb_policy = "least_request"
[clusters.api.timeouts]
connect_timeout_ms = 250
[clusters.web]
endpoints = ["[::1]:3"]
"#;
    let s = load(text).unwrap().settings;
    let api = &s.clusters["api"];
    assert_eq!(api.timeouts.connect, Duration::from_millis(250));
    assert_eq!(api.timeouts.response, Duration::from_millis(900));
    assert_eq!(api.lb_policy, LbPolicy::LeastRequest);
    assert_eq!(api.endpoints[1].weight, 3);
    assert_eq!(
        api.endpoints[1].address,
        EndpointAddr::Host {
            host: "localhost".into(),
            port: 2
        }
    );
    let web = &s.clusters["web"];
    assert_eq!(web.timeouts.connect, Duration::from_millis(700));
    assert_eq!(
        s.routes[1].host,
        Some(HostMatch::Suffix(".example.com".into()))
    );
}

#[test]
fn unknown_key_names_line_key_and_allowed_keys() {
    let text =
        "[router]\nlistener_port = 8080\n\n[router.upstream.timeouts]\nconect_timeout_ms = 10\n";
    let e = err(text);
    assert!(
        e.starts_with("gw.toml:5:1: key `router.upstream.timeouts"),
        "{e}"
    );
    assert!(e.contains("unknown field `conect_timeout_ms`"), "{e}");
    assert!(e.contains("`connect_timeout_ms`"), "{e}");
}

#[test]
fn wrong_type_names_line_and_key() {
    let text = "[router]\nlistener_port = \"eighty\"\n";
    let e = err(text);
    assert!(e.starts_with("gw.toml:2:"), "{e}");
    assert!(e.contains("router.listener_port"), "{e}");
}

#[test]
fn syntax_error_names_line() {
    let e = err("[router]\nlistener_port = \n");
    assert!(e.starts_with("gw.toml:2:"), "{e}");
}

#[test]
fn validation_errors_name_line_and_key() {
    let text = r#"[router]
listener_port = 8080

[[routes]]
path_prefix = "/api"
cluster = "apii"

[clusters.api]
endpoints = ["127.0.0.1"]
"#;
    let e = err(text);
    let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("gw.toml")).collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert!(
        lines[0].starts_with(
            "gw.toml:6:1: key `routes[0].cluster`: unknown cluster `apii`; defined clusters: `api`"
        ),
        "{e}"
    );
    assert!(
        lines[1].starts_with(
            "gw.toml:9:14: key `clusters.api.endpoints[0]`: invalid endpoint \"127.0.0.1\": no port"
        ),
        "{e}"
    );
}

#[test]
fn out_of_range_says_what_is_allowed() {
    let text = "[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n[router.upstream.retry]\nbudget_percent = 250\n";
    let e = err(text);
    assert!(
        e.starts_with("gw.toml:6:1: key `router.upstream.retry.budget_percent`: 250 is out of range: allowed 0..=100 %"),
        "{e}"
    );
}

#[test]
fn missing_listener_and_upstream_are_errors() {
    let e = err("[router]\n");
    assert!(e.contains("no listener"), "{e}");
    assert!(e.contains("no upstream"), "{e}");
}

#[test]
fn admin_must_stay_on_loopback_unless_allowed() {
    let base = "[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n";
    let e = err(&format!("{base}[admin]\nlisten = \"0.0.0.0:9901\"\n"));
    assert!(
        e.contains("key `admin.listen`: admin address 0.0.0.0:9901 is not loopback"),
        "{e}"
    );
    let ok = load(&format!(
        "{base}[admin]\nlisten = \"0.0.0.0:9901\"\nallow_remote = true\n"
    ));
    assert!(ok.is_ok());
}

#[test]
fn cascading_timeouts_warn_at_the_request_timeout() {
    let text = r#"[router]
listener_port = 8080
[router.upstream]
endpoints = ["127.0.0.1:9000"]
[router.upstream.timeouts]
connect_timeout_ms = 2000
response_timeout_ms = 2000
request_timeout_ms = 3000
"#;
    let l = load(text).unwrap();
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    let w = l.warnings[0].to_string();
    assert!(
        w.starts_with("gw.toml:8:1: key `router.upstream.timeouts.request_timeout_ms`: cluster `default`: request_timeout_ms (3000) is shorter than connect_timeout_ms (2000) + response_timeout_ms (2000)"),
        "{w}"
    );
}

#[test]
fn endpoint_forms() {
    use validate::parse_endpoint;
    assert_eq!(
        parse_endpoint("10.0.0.5:8080"),
        Ok(EndpointAddr::Ip("10.0.0.5:8080".parse().unwrap()))
    );
    assert_eq!(
        parse_endpoint("[::1]:80"),
        Ok(EndpointAddr::Ip("[::1]:80".parse().unwrap()))
    );
    assert!(
        matches!(parse_endpoint("Api.Internal:80"), Ok(EndpointAddr::Host { host, port: 80 }) if host == "api.internal")
    );
    assert!(parse_endpoint("::1:80").is_err());
    assert!(parse_endpoint("host:0").is_err());
    assert!(parse_endpoint("host:http").is_err());
    assert!(parse_endpoint("ho st:80").is_err());
    // What the mistake was, not a consequence of it.
    assert_eq!(
        parse_endpoint("http://api.internal:80").unwrap_err(),
        "no scheme: an endpoint is an address and a port (a cluster's `tls` table makes it HTTPS)"
    );
    assert_eq!(parse_endpoint("[::1]").unwrap_err(), "no port");
    let e = err(
        "[router]\nlisten = [\"localhost:8080\"]\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n",
    );
    assert!(
        e.contains("invalid socket address syntax: expected an IP address and a port, e.g. \"0.0.0.0:8080\""),
        "{e}"
    );
}

#[test]
fn drain_delay_defaults_to_five_seconds_and_is_bounded() {
    let s = load(COMMON).unwrap().settings;
    assert_eq!(
        s.drain_delay,
        Duration::from_millis(model::DEFAULT_DRAIN_DELAY_MS)
    );
    assert_eq!(model::DEFAULT_DRAIN_DELAY_MS, 5_000);
    let zero = load(&COMMON.replace(
        "listener_port = 8080",
        "listener_port = 8080\ndrain_delay_ms = 0",
    ))
    .unwrap()
    .settings;
    assert_eq!(zero.drain_delay, Duration::ZERO);
    let e = err(&COMMON.replace(
        "listener_port = 8080",
        "listener_port = 8080\ndrain_delay_ms = 100000000",
    ));
    assert!(
        e.contains("gw.toml:4:")
            && e.contains("router.drain_delay_ms")
            && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn observer_cgroup_is_a_child_name_the_own_cgroup_or_an_absolute_path() {
    let with = |v: &str| format!("{COMMON}\n[observer]\ncgroup = \"{v}\"\n");
    let cg = |v: &str| load(&with(v)).unwrap().settings.observer.cgroup;
    assert_eq!(
        load(COMMON).unwrap().settings.observer.cgroup,
        ObserverCgroup::Child("gateway-{pid}".into())
    );
    assert_eq!(cg("."), ObserverCgroup::Own);
    assert_eq!(cg("obs-{pid}"), ObserverCgroup::Child("obs-{pid}".into()));
    assert_eq!(
        cg("/sys/fs/cgroup/x"),
        ObserverCgroup::Path("/sys/fs/cgroup/x".into())
    );
    for bad in [
        "",
        "a/b",
        "..",
        "cgroup.procs",
        "/sys/fs/cgroup/../x",
        "g-{pid}-{pid}",
    ] {
        let e = err(&with(bad));
        assert!(
            e.contains("observer.cgroup") && e.contains("gw.toml:12:"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn observer_max_connections_sizes_the_kernel_table_within_its_range() {
    let with = |v: &str| format!("{COMMON}\n[observer]\nmax_connections = {v}\n");
    assert_eq!(
        load(COMMON).unwrap().settings.observer.max_connections,
        65_536
    );
    assert_eq!(
        load(&with("1000"))
            .unwrap()
            .settings
            .observer
            .max_connections,
        1000
    );
    let big = load(&with("2000000")).unwrap();
    assert_eq!(big.settings.observer.max_connections, 2_000_000);
    assert!(
        big.warnings.iter().any(|w| w
            .to_string()
            .contains("max_connections = 2000000 preallocates 256 MiB")),
        "{:?}",
        big.warnings
    );
    assert!(load(&with("1048576")).unwrap().warnings.is_empty());
    for bad in ["0", "16777217", "-1"] {
        let e = err(&with(bad));
        assert!(
            e.contains("observer.max_connections") && e.contains("gw.toml:12:"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn consecutive_failures_is_refused_with_the_keys_that_replaced_it() {
    let text = r#"[router]
listener_port = 8080
[router.upstream]
endpoints = ["127.0.0.1:9000"]
[router.upstream.health]
consecutive_failures = 5
[clusters.api]
endpoints = ["127.0.0.1:9001"]
health = { consecutive_failures = "any value" }
[[routes]]
cluster = "api"
"#;
    let e = err(text);
    let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("gw.toml")).collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert!(
        lines[0].starts_with(
            "gw.toml:6:1: key `router.upstream.health.consecutive_failures`: \
             `consecutive_failures` was removed"
        ),
        "{e}"
    );
    assert!(
        lines[1].starts_with("gw.toml:9:12: key `clusters.api.health.consecutive_failures`: "),
        "{e}"
    );
    for replacement in [
        "`syn_unanswered_to_eject`",
        "`response_timeouts_to_eject`",
        "`slow_handshakes_to_suspect`",
    ] {
        assert!(lines[0].contains(replacement), "{e}");
    }
    assert!(e.contains("   6 | consecutive_failures = 5"), "{e}");
}

#[test]
fn health_defaults_are_the_state_machines() {
    let text = "[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n";
    let s = load(text).unwrap().settings;
    let h = &s.clusters["default"].health;
    assert_eq!(h.machine, crate::decide::health::HealthPolicy::default());
    assert_eq!(
        h.machine.max_ejected_percent,
        crate::decide::health::DEFAULT_MAX_EJECTED_PERCENT
    );
    assert_eq!(
        s.clusters["default"].timeouts.connect_deadline_floor,
        Some(crate::decide::deadline::DEFAULT_FLOOR)
    );
}

/// A probe path no request can carry is refused: its probes failed ("invalid uri
/// character"), and an endpoint once ejected stayed out for good.
#[test]
fn a_probe_path_that_no_request_can_carry_is_refused() {
    for bad in ["health check", "healthz"] {
        let text = format!(
            "[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n\
             [router.upstream.health]\nprobe_path = \"{bad}\"\n"
        );
        let e = err(&text);
        assert!(
            e.contains(&format!(
                "gw.toml:6:1: key `router.upstream.health.probe_path`: probe_path {bad:?} is not a path"
            )),
            "{e}"
        );
    }
    let ok = "[router]\nlistener_port = 1\n[clusters.a]\nendpoints = [\"127.0.0.1:9000\"]\n\
              [clusters.a.health]\nprobe_path = \"/healthz?deep=1\"\n\
              [[routes]]\ncluster = \"a\"\n";
    let s = load(ok).unwrap().settings;
    assert_eq!(
        s.clusters["a"].health.probe_path.as_deref(),
        Some("/healthz?deep=1")
    );
}

#[test]
fn peak_ewma_and_its_latency_table() {
    let loaded = load_str(
        "[router]\nlistener_port = 8080\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n\
         lb_policy = \"peak_ewma\"\n[router.upstream.latency]\nslow_margin_ms = 250\n",
        Path::new("t.toml"),
    )
    .expect("valid");
    let c = &loaded.settings.clusters["default"];
    assert_eq!(c.lb_policy, LbPolicy::PeakEwma);
    assert_eq!(c.latency.slow_margin, Duration::from_millis(250));
    assert_eq!(c.latency.decay, crate::decide::latency::DEFAULT_DECAY);
    let err = load_str(
        "[router]\nlistener_port = 8080\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n\
         [router.upstream.latency]\nslow_factor = 1\n",
        Path::new("t.toml"),
    )
    .expect_err("a factor of 1 makes every endpoint slow");
    assert!(err.to_string().contains("slow_factor"), "{err}");
}

#[test]
fn log_format_and_level_are_read_and_checked_with_file_line_and_key() {
    let s = load(&format!(
        "{COMMON}\n[log]\nformat = \"json\"\nlevel = \"warn,gateway::proxy=debug\"\n"
    ))
    .unwrap()
    .settings;
    assert_eq!(s.log.format, crate::logging::LogFormat::Json);
    assert_eq!(s.log.level.as_deref(), Some("warn,gateway::proxy=debug"));
    let d = load(COMMON).unwrap().settings.log;
    assert_eq!((d.format, d.level), (crate::logging::LogFormat::Text, None));
    let e = err(&format!("{COMMON}\n[log]\nlevel = \"warning\"\n"));
    assert!(
        e.starts_with(
            "gw.toml:12:1: key `log.level`: log level \"warning\": `warning` is not a level"
        ),
        "{e}"
    );
    let e = err(&format!("{COMMON}\n[log]\nformat = \"xml\"\n"));
    assert!(
        e.contains("gw.toml:12:10: key `log.format`") && e.contains("expected `text` or `json`"),
        "{e}"
    );
}

#[test]
fn the_rapid_reset_rule_is_envoys_by_default_and_can_be_turned_off() {
    use crate::config::settings::PrematureResets;
    let rule = |extra: &str| {
        load(&format!("{COMMON}\n[router.downstream]\n{extra}\n"))
            .unwrap()
            .settings
            .downstream
            .http2_premature_resets
    };
    assert_eq!(
        rule(""),
        PrematureResets {
            streams: 500,
            lifetime: Duration::from_secs(1)
        }
    );
    let off = rule("http2_premature_reset_streams = 0\nhttp2_premature_reset_lifetime_ms = 250");
    assert_eq!((off.streams, off.lifetime), (0, Duration::from_millis(250)));
    let e = err(&format!(
        "{COMMON}\n[router.downstream]\nhttp2_premature_reset_lifetime_ms = 0\n"
    ));
    assert!(
        e.contains("router.downstream.http2_premature_reset_lifetime_ms")
            && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn http2_max_concurrent_streams_is_200_by_default_and_from_1_to_2_pow_31_minus_1() {
    let streams = |extra: &str| {
        load(&format!("{COMMON}\n[router.downstream]\n{extra}\n"))
            .map(|l| l.settings.downstream.http2_max_concurrent_streams)
    };
    assert_eq!(streams("").unwrap(), 200);
    assert_eq!(
        streams("http2_max_concurrent_streams = 1000").unwrap(),
        1000
    );
    let few = load(&format!(
        "{COMMON}\n[router.downstream]\nhttp2_max_concurrent_streams = 10\n"
    ))
    .unwrap();
    assert_eq!(few.settings.downstream.http2_max_concurrent_streams, 10);
    let w: Vec<String> = few.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.len() == 1
            && w[0].contains("router.downstream.http2_max_concurrent_streams")
            && w[0].contains("below the 100"),
        "{w:?}"
    );
    assert_eq!(
        streams("http2_max_concurrent_streams = 2147483647").unwrap(),
        i32::MAX as u32
    );
    for bad in ["0", "2147483648"] {
        let e = err(&format!(
            "{COMMON}\n[router.downstream]\nhttp2_max_concurrent_streams = {bad}\n"
        ));
        assert!(
            e.contains("router.downstream.http2_max_concurrent_streams")
                && e.contains("out of range"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn request_buffering_memory_is_64_mib_by_default_and_at_least_one_body() {
    let s = load(COMMON).unwrap().settings;
    assert_eq!(s.downstream.request_buffering_memory_bytes, 64 << 20);
    let text = format!("{COMMON}\n[router.downstream]\nrequest_buffering_memory_bytes = 1048576\n");
    let s = load(&text).unwrap().settings;
    assert_eq!(s.downstream.request_buffering_memory_bytes, 1 << 20);
    let e = err(&format!(
        "{COMMON}\n[router.downstream]\nrequest_buffering_memory_bytes = 1000\n"
    ));
    assert!(
        e.contains("router.downstream.request_buffering_memory_bytes")
            && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn client_connection_limits_are_unlimited_by_default_and_at_least_one() {
    let s = load(COMMON).unwrap().settings;
    assert_eq!(s.downstream.max_client_connections, None);
    assert_eq!(s.downstream.max_accepts_per_second, None);
    let text = format!(
        "{COMMON}\n[router.downstream]\nmax_client_connections = 20000\nmax_accepts_per_second = 5000\n"
    );
    let s = load(&text).unwrap().settings;
    assert_eq!(s.downstream.max_client_connections, Some(20_000));
    assert_eq!(s.downstream.max_accepts_per_second, Some(5_000));
    for key in ["max_client_connections", "max_accepts_per_second"] {
        let e = err(&format!("{COMMON}\n[router.downstream]\n{key} = 0\n"));
        assert!(
            e.contains(&format!("router.downstream.{key}")) && e.contains("out of range"),
            "{e}"
        );
    }
}

/// A path that is no config file is an error at once: `/dev/zero` was read until memory ran
/// out. A pipe is read (`check-config <(envsubst < gateway.toml.in)`), and a FIFO nobody
/// writes to reads as empty rather than holding `check-config`, `run` and `reload` for good.
#[test]
fn a_path_that_is_no_config_file_is_refused_at_once_and_a_pipe_is_read() {
    let dir = std::env::temp_dir().join(format!("gateway-config-read-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path this test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let large = dir.join("large.toml");
    std::fs::File::create(&large)
        .unwrap()
        .set_len(MAX_CONFIG_BYTES + 1)
        .unwrap();
    for (path, want) in [
        (
            Path::new("/dev/zero"),
            "a device or a socket, not a file or a pipe",
        ),
        (&dir, "a directory, not a file or a pipe"),
        (&large, "larger than 16 MiB"),
    ] {
        let e = super::load(path).map(|_| ()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot read: ", path.display())) && e.contains(want),
            "{e}"
        );
    }
    // Nobody writes: empty, which is no config, at once.
    let e = super::load(&fifo).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("missing field `router`"), "{e}");
    // A pipe with a config in it (as `<(…)` passes one): its config.
    let (rx, mut tx) = std::io::pipe().unwrap();
    std::io::Write::write_all(
        &mut tx,
        b"[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n",
    )
    .unwrap();
    drop(tx);
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&rx));
    let loaded = super::load(Path::new(&path)).unwrap();
    assert_eq!(loaded.settings.listen, vec!["0.0.0.0:1".parse().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Listeners that would share connections are refused: an address beside a wildcard of its
/// family on the same port (the more specific socket takes all of its connections: plain HTTP
/// to 127.0.0.1 always met the HTTPS listener there), and the admin address on a client
/// listener's port (`run` failed with "Address already in use" naming no key). `0.0.0.0` and
/// `[::]` on one port are two listeners (IPv6 sockets are IPv6-only).
#[test]
fn listeners_that_would_share_connections_are_refused() {
    let up = "\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n";
    let e = err(&format!(
        "[router]\nlisten = [\"0.0.0.0:8080\", \"127.0.0.1:8080\"]\n{up}"
    ));
    assert!(
        e.contains(
            "key `router.listen`: listen address 127.0.0.1:8080 shares its port with 0.0.0.0:8080"
        ),
        "{e}"
    );
    let e = err(&format!(
        "[router]\nlistener_port = 8080\n{up}\n[admin]\nlisten = \"127.0.0.1:8080\"\n"
    ));
    assert!(
        e.contains("key `admin.listen`: admin address 127.0.0.1:8080 is also a client listener (0.0.0.0:8080)"),
        "{e}"
    );
    let e = err(&format!(
        "[router]\nlisten = [\"127.0.0.1:8080\", \"0.0.0.0:8080\"]\n{up}"
    ));
    assert!(
        e.contains("listen address 127.0.0.1:8080 shares its port with 0.0.0.0:8080"),
        "the wildcard is the one that covers, in either order: {e}"
    );
    let both = format!("[router]\nlisten = [\"0.0.0.0:8080\", \"[::]:8080\"]\n{up}");
    assert_eq!(load(&both).unwrap().settings.listen.len(), 2);
}

/// A relative access-log path starts from the config file's directory, as the TLS files' do
/// (from the working directory, a unit's went to `/`), and a directory that does not exist
/// is a warning (`run` could not open the log; systemd's `LogsDirectory=` makes it only when
/// the unit starts).
#[test]
fn a_relative_access_log_starts_from_the_configs_directory_and_a_missing_one_is_warned_of() {
    let text = "[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"127.0.0.1:9000\"]\n\
                [access_log]\noutput = \"no-such-dir/access.log\"\n";
    let loaded = load_str(text, Path::new("/nonexistent-gateway-etc/gw.toml")).unwrap();
    assert_eq!(
        loaded.settings.access_log.output,
        LogOutput::File("/nonexistent-gateway-etc/no-such-dir/access.log".into())
    );
    let warned: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warned.iter().any(|w| w.contains("key `access_log.output`")
            && w.contains("directory /nonexistent-gateway-etc/no-such-dir does not exist")),
        "{warned:?}"
    );
    let here = text.replace("no-such-dir/access.log", "/tmp/access.log");
    let loaded = load_str(&here, Path::new("/nonexistent-gateway-etc/gw.toml")).unwrap();
    assert_eq!(
        loaded.settings.access_log.output,
        LogOutput::File("/tmp/access.log".into())
    );
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

/// Likely mistakes that still make a config that runs are warned of: an endpoint listed twice
/// (it is one), a `max_ejection_ms` below `ejection_ms` (no ejection grows), `https_redirect`
/// with no HTTPS listener and no trusted proxy (behind a TLS-terminating load balancer, a
/// redirect loop); and a dotted number that is no IPv4 address is refused (it was taken for
/// a host name).
#[test]
fn likely_mistakes_are_warned_of_and_a_bad_dotted_address_refused() {
    let text = "[router]\nlistener_port = 1\nhttps_redirect = true\n\
                [router.upstream]\nendpoints = [\"127.0.0.1:9000\", \"127.0.0.1:9000\"]\n\
                [router.upstream.health]\nejection_ms = 5000\nmax_ejection_ms = 1000\n";
    let loaded = load(text).unwrap();
    let warned: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    for want in [
        "key `router.upstream.endpoints[1]`: endpoint \"127.0.0.1:9000\" is listed twice",
        "max_ejection_ms 1000 is below ejection_ms 5000",
        "key `router.https_redirect`: https_redirect with no HTTPS listener here and no trusted_proxies",
    ] {
        assert!(
            warned.iter().any(|w| w.contains(want)),
            "{want:?} not in {warned:?}"
        );
    }
    assert_eq!(loaded.settings.clusters["default"].endpoints.len(), 1);
    let e = err("[router]\nlistener_port = 1\n[router.upstream]\nendpoints = [\"999.1.1.1:80\"]\n");
    assert!(e.contains("not an IPv4 address"), "{e}");
}
