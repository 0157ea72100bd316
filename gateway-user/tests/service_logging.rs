//! The gateway's own log, as an operator sets it: `[log] format = "json"` and `level` in the
//! config, a level change at run time through `PUT /logging` on the admin listener (and back
//! to the config's on SIGHUP), and an invalid `RUST_LOG` refused by every command instead of
//! falling back to `info` without a word. Unprivileged: `[observer] mode = "off"`, loopback
//! only.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gateway_testkit::{admin::admin_get, ports::free_port, tempdir::temp_dir};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// `PUT path` with `body` on the admin listener; status and body.
fn put(admin: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// `gateway run` with its stderr collected; killed on drop.
struct Run {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Run {
    /// With `RUST_LOG` set to `rust_log`, or unset.
    fn start(config: &std::path::Path, rust_log: Option<&str>) -> Run {
        let mut cmd = Command::new(GATEWAY);
        match rust_log {
            Some(v) => cmd.env("RUST_LOG", v),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Run { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a line contains `needle`, up to 10 s.
    fn wait_for(&self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < end,
                "no log line with {needle:?}:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

fn config(dir: &std::path::Path, admin: SocketAddr, log: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[router]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\ndrain_delay_ms = 0\n\n\
             [router.upstream]\nendpoints = [\"127.0.0.1:9\"]\n\n\
             [admin]\nlisten = \"{admin}\"\n\n[access_log]\noutput = \"off\"\n\n\
             [observer]\nmode = \"off\"\n\n[log]\n{log}\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn json_log_at_the_configured_level_changed_through_the_admin_api_and_back_on_sighup() {
    let dir = temp_dir("log-json");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = config(&dir, admin, "format = \"json\"\nlevel = \"warn\"");
    let gw = Run::start(&cfg, None);
    // At `warn`, the start-up lines (info) are not written; wait for the admin API instead.
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < end, "{}", gw.lines().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = admin_get(admin, "/logging");
    assert_eq!(
        (got.status, got.body.as_str()),
        (200, "warn\n(from the config's [log] level)\n")
    );
    // An info line is not written at `warn`...
    gw.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !gw.lines()
            .iter()
            .any(|l| l.contains("reopening the access log")),
        "{}",
        gw.lines().join("\n")
    );
    // ...and is once the level changed at run time.
    let (status, body) = put(admin, "/logging", "info");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "info\n(was warn from the config's [log] level; until the next reload)\n"
    );
    let changed = gw.wait_for("log level changed through the admin API");
    gw.signal(libc::SIGUSR1);
    let line = gw.wait_for("reopening the access log");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["message"], "SIGUSR1: reopening the access log", "{v}");
    assert!(v["timestamp"].is_string() && v["target"].is_string(), "{v}");
    let c: serde_json::Value = serde_json::from_str(&changed).unwrap();
    assert_eq!(
        (c["level"].as_str(), c["was"].as_str()),
        (Some("info"), Some("warn")),
        "{c}"
    );
    for l in gw.lines() {
        serde_json::from_str::<serde_json::Value>(&l)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
    }
    // A bad level is refused with the reason, and changes nothing.
    let (status, body) = put(admin, "/logging", "verbose");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("`verbose` is not a level"), "{body}");
    assert!(admin_get(admin, "/logging").body.starts_with("info\n"));
    // SIGHUP applies the config's level again.
    gw.signal(libc::SIGHUP);
    let end = Instant::now() + Duration::from_secs(10);
    while !admin_get(admin, "/logging").body.starts_with("warn\n") {
        assert!(
            Instant::now() < end,
            "{}",
            admin_get(admin, "/logging").body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What each command says, and how soon, when `RUST_LOG` is wrong.
fn refused(args: &[&str], rust_log: &str) -> String {
    let mut child = Command::new(GATEWAY)
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} with RUST_LOG={rust_log} was still running after 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{args:?} accepted RUST_LOG={rust_log}");
    err
}

#[test]
fn an_invalid_rust_log_is_an_error_not_a_silent_fallback() {
    let dir = temp_dir("log-env");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = config(&dir, admin, "");
    let cfg = cfg.to_str().unwrap();
    let err = refused(&["run", "--config", cfg], "warning");
    assert!(
        err.contains("error: RUST_LOG=\"warning\" is invalid: `warning` is not a level (trace, debug, info, warn, error, off)"),
        "{err}"
    );
    let err = refused(&["run", "--config", cfg], "info,gateway=loud");
    assert!(
        err.contains("RUST_LOG=\"info,gateway=loud\" is invalid"),
        "{err}"
    );
    let err = refused(&["diagnose", "127.0.0.1:9", "--no-kernel"], "verbose");
    assert!(err.contains("RUST_LOG=\"verbose\" is invalid"), "{err}");
    let err = refused(&["observe", "--duration", "0.1"], "debugg");
    assert!(err.contains("RUST_LOG=\"debugg\" is invalid"), "{err}");
    // A valid one is taken, over the config.
    let ok = Command::new(GATEWAY)
        .args(["diagnose", "127.0.0.1:9", "--no-kernel", "--count", "1"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ok.stderr).contains("invalid"),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `RUST_LOG` wins over `[log] level`, also on the SIGHUP after a `PUT /logging`: that reload
/// applied the config's level, as if `RUST_LOG` were not set (and the packaged unit set
/// `RUST_LOG=info`, so the config's level never applied at start).
#[test]
fn rust_log_wins_over_the_config_again_on_the_reload_after_an_admin_change() {
    let dir = temp_dir("log-env");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = config(&dir, admin, "level = \"error\"");
    let gw = Run::start(&cfg, Some("warn"));
    let level = || admin_get(admin, "/logging").body;
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < end, "{}", gw.lines().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(level().starts_with("warn\n"), "{}", level());
    let (status, body) = put(admin, "/logging", "info");
    assert_eq!(status, 200, "{body}");
    gw.signal(libc::SIGHUP);
    let end = Instant::now() + Duration::from_secs(10);
    while !level().starts_with("warn\n") {
        assert!(Instant::now() < end, "after the reload: {}", level());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
