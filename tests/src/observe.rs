//! `gateway observe` as a child process: spawned from the caller's command (the binary from
//! [`gateway_bin!`](crate::gateway_bin), wrapped as the test needs: `setpriv`, `ip netns
//! exec`), ready once its log says `observer attached` (the command has no admin listener), its
//! stdout read as JSON records and its log kept apart. Dropping it sends SIGTERM, then SIGKILL.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver},
    },
    time::{Duration, Instant},
};

/// How long `gateway observe` may take to load and attach the eBPF programs.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `gateway observe` that said it is attached.
pub struct ObserveProcess {
    pub child: Child,
    /// Lines of stdout (`--json`: one record each), not yet taken.
    stdout: Receiver<String>,
    /// Every line of its log (stderr) so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl ObserveProcess {
    /// Spawns `cmd` (a `gateway observe …`) and waits until its log says `observer attached`;
    /// panics with the log otherwise.
    pub fn spawn(mut cmd: Command) -> ObserveProcess {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("piped stderr");
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut obs = ObserveProcess { child, stdout, log };
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while !obs.log_contains("observer attached") {
            let exited = obs.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = obs.child.kill();
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "gateway observe did not attach ({}): {}",
                    exited.map_or_else(
                        || format!("not within {ATTACH_TIMEOUT:?}"),
                        |s| format!("exited with {s}")
                    ),
                    obs.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        obs
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// The next line of stdout within `limit`, which must be a JSON record (`--json`: one
    /// object per line, nothing else).
    pub fn next_record(&self, limit: Duration) -> Option<serde_json::Value> {
        let line = self.stdout.recv_timeout(limit).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}")))
    }

    /// The JSON record with `cookie`, waiting up to 5 s.
    pub fn record(&self, cookie: u64) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(5);
        while let Some(v) = self.next_record(end.saturating_duration_since(Instant::now())) {
            if v["cookie"] == cookie {
                return v;
            }
        }
        panic!("no JSON record for cookie {cookie}");
    }
}

impl Drop for ObserveProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
