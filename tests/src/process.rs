//! `gateway run` as a child process, started the one way every end-to-end test starts it:
//! [`GatewayProcess::spawn`] (or [`spawn_in`](GatewayProcess::spawn_in) a lab namespace) takes
//! the caller's command (the binary from [`gateway_bin!`](crate::gateway_bin), wrapped as the
//! test needs: `setpriv`, a cgroup, environment), collects its stdout and stderr line by line
//! with the time each was read, learns its addresses from the start-up log (configs may say
//! port 0), and returns once `GET /readyz` answers on the admin listener, whatever the status
//! (a test may expect 503), or panics with the output after [`READY_TIMEOUT`]. Dropping it
//! sends SIGTERM (twice: the second cuts the drain delay short), so that the gateway detaches
//! its observer and removes its cgroup, and SIGKILL after [`STOP_TIMEOUT`]. A start that must
//! fail is [`run_to_exit`].

use std::{
    io::{BufRead as _, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant, SystemTime},
};

use gateway_lab::{Netns, NetnsCommandExt as _};

/// How long a gateway may take from spawn to answering `/readyz` (the kernel observer's load
/// and attach included, on a loaded two-core machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a dropped gateway may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a child printed, a line at a time.
pub type Lines = Arc<Mutex<Vec<String>>>;

/// A running `gateway run` that answered `/readyz`; the child's own methods (signal, wait,
/// its output) are [`ChildProcess`]'s.
pub struct GatewayProcess {
    process: ChildProcess,
    /// The first client listener (`listener=` in the start-up log).
    pub addr: SocketAddr,
    /// The admin listener (`admin=` in the start-up log).
    pub admin: SocketAddr,
    netns: Option<Netns>,
}

impl GatewayProcess {
    /// Spawns `cmd` (a `gateway run`, see [`GatewayBin::run`](crate::bins::GatewayBin::run))
    /// and waits until it is ready.
    pub fn spawn(cmd: Command) -> GatewayProcess {
        GatewayProcess::ready(ChildProcess::start(cmd), None)
    }

    /// [`spawn`](GatewayProcess::spawn) inside `netns`, where its addresses are (and where
    /// `/readyz` is asked).
    pub fn spawn_in(mut cmd: Command, netns: &Netns) -> GatewayProcess {
        cmd.in_netns(netns);
        GatewayProcess::ready(ChildProcess::start(cmd), Some(netns.clone()))
    }

    fn ready(mut process: ChildProcess, netns: Option<Netns>) -> GatewayProcess {
        match wait_ready(&mut process, netns.as_ref()) {
            Ok((addr, admin)) => GatewayProcess {
                process,
                addr,
                admin,
                netns,
            },
            Err(why) => {
                let _ = process.child.kill();
                let _ = process.child.wait();
                panic!(
                    "gateway run is not ready: {why}; its output:\n{}",
                    process.text()
                );
            }
        }
    }

    /// The namespace it runs in, when it was spawned in one.
    pub fn netns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }
}

impl std::ops::Deref for GatewayProcess {
    type Target = ChildProcess;

    fn deref(&self) -> &ChildProcess {
        &self.process
    }
}

impl std::ops::DerefMut for GatewayProcess {
    fn deref_mut(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

/// A child process with its stdout and stderr collected line by line (ANSI colours off),
/// not waited for: a [`GatewayProcess`] before it is ready, or one that must fail to start.
/// Dropped, it gets SIGTERM (twice: the second cuts a drain delay short), then SIGKILL after
/// [`STOP_TIMEOUT`].
pub struct ChildProcess {
    pub child: Child,
    lines: Lines,
    /// When each of `lines` was read; locked after `lines`, so the two stay in step.
    times: Arc<Mutex<Vec<SystemTime>>>,
    stderr: Arc<Valve>,
    /// The threads that read stdout and stderr: each ends at its pipe's end.
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Whether a child's stderr is read: closed, it is not, as a log consumer that stalls (its
/// pipe fills up and the child's writes to it wait).
#[derive(Default)]
struct Valve {
    closed: Mutex<bool>,
    opened: Condvar,
}

/// A pipe read only while its valve is open.
struct Gated<R> {
    pipe: R,
    valve: Arc<Valve>,
}

impl<R: Read> Read for Gated<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut closed = self.valve.closed.lock().unwrap();
        while *closed {
            closed = self.valve.opened.wait(closed).unwrap();
        }
        drop(closed);
        self.pipe.read(buf)
    }
}

impl ChildProcess {
    /// Spawns `cmd` with stdin closed, `NO_COLOR=1`, and `RUST_LOG=info` unless it sets one.
    pub fn start(mut cmd: Command) -> ChildProcess {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let lines: Lines = Arc::default();
        let times: Arc<Mutex<Vec<SystemTime>>> = Arc::default();
        let valve = Arc::new(Valve::default());
        let stderr = Gated {
            pipe: child.stderr.take().expect("piped stderr"),
            valve: valve.clone(),
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let mut readers = Vec::new();
        for pipe in [Box::new(stderr) as Box<dyn Read + Send>, Box::new(stdout)] {
            let (lines, times) = (lines.clone(), times.clone());
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    let mut lines = lines.lock().unwrap();
                    times
                        .lock()
                        .unwrap()
                        .push(logged_at(&line).unwrap_or_else(SystemTime::now));
                    lines.push(line);
                }
            }));
        }
        ChildProcess {
            child,
            lines,
            times,
            stderr: valve,
            readers,
        }
    }

    /// Once the child exited: waits, up to `limit`, until every line it wrote has been read
    /// (both pipes ended), so that the last lines it printed are in [`text`](Self::text).
    /// Panics after `limit`: a process the child started may hold its pipes open.
    pub fn wait_output(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self
            .readers
            .iter()
            .all(std::thread::JoinHandle::is_finished)
        {
            assert!(
                Instant::now() < deadline,
                "the child's output did not end within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops reading the child's stderr (after the chunk being read, if any), as a log
    /// consumer that stalls: once the pipe is full, the child's writes to stderr wait.
    pub fn stall_stderr(&self) {
        *self.stderr.closed.lock().unwrap() = true;
    }

    /// Reads the child's stderr again.
    pub fn resume_stderr(&self) {
        *self.stderr.closed.lock().unwrap() = false;
        self.stderr.opened.notify_all();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    /// Waits for exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("waiting for the gateway") {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("waiting for the gateway")
            .is_none()
    }

    /// Everything it printed so far, one line each.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The lines collected so far and to come, shared with the threads that read them.
    pub fn shared_lines(&self) -> Lines {
        self.lines.clone()
    }

    /// The lines that contain every one of `needles`, each with the time it carries (a text
    /// log line's timestamp: when the process logged it), or else when it was read.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<(SystemTime, String)> {
        let lines = self.lines.lock().unwrap();
        let times = self.times.lock().unwrap();
        lines
            .iter()
            .zip(times.iter())
            .filter(|(l, _)| needles.iter().all(|n| l.contains(n)))
            .map(|(l, t)| (*t, l.clone()))
            .collect()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.count(needle) > 0
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines_with(&[needle]).len()
    }

    /// Waits until a line contains `needle`; panics with the output after `limit`.
    pub fn expect_log(&self, needle: &str, limit: Duration) {
        self.expect_line(&[needle], limit);
    }

    /// Waits until a line contains every one of `needles`, and returns it; panics with the
    /// output after `limit`. The lines are read by threads of their own, so a line can lag
    /// what the process already shows elsewhere (its `/status`, its metrics).
    pub fn expect_line(&self, needles: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((_, line)) = self.lines_with(needles).into_iter().next() {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needles:?} within {limit:?}; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Resident set size now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Threads now (`Threads` in /proc/PID/status).
    pub fn threads(&self) -> u64 {
        self.status_kib("Threads:")
    }

    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status of the gateway");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/status"))
    }

    /// Open file descriptors now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc/PID/fd of the gateway")
            .count()
    }

    /// CPU time (user + system) used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("/proc/PID/stat of the gateway");
        // After the command name in parentheses: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis((tick(11) + tick(12)) * 1000 / hz)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.resume_stderr();
        if self.alive() {
            // A second SIGTERM cuts the drain delay short (a test's config may keep the
            // default 5 s); in-flight requests still get the grace period.
            self.signal(libc::SIGTERM);
            if self.wait(Duration::from_millis(300)).is_none() && self.alive() {
                self.signal(libc::SIGTERM);
            }
            if self.wait(STOP_TIMEOUT).is_some() {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cmd` with its file descriptor limit (`RLIMIT_NOFILE`, soft and hard) set to `nofile` in
/// the child (raising the hard limit needs root).
pub fn with_nofile(cmd: Command, nofile: u64) -> Command {
    with_nofile_limits(cmd, nofile, nofile)
}

/// `cmd` with its soft and hard file descriptor limits set to `soft` and `hard` in the child
/// (raising the hard limit needs root).
pub fn with_nofile_limits(mut cmd: Command, soft: u64, hard: u64) -> Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// `cmd` with its stdout and stderr set non-blocking (`O_NONBLOCK`) in the child, as another
/// process sharing the pipe or terminal may leave them.
pub fn with_nonblocking_output(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: fcntl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Raises this process's own file descriptor limit to at least `nofile` (a test that holds
/// thousands of connections); panics when it cannot.
pub fn raise_own_nofile(nofile: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur >= nofile {
            return;
        }
        lim.rlim_cur = nofile;
        lim.rlim_max = lim.rlim_max.max(nofile);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "raising RLIMIT_NOFILE to {nofile}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `cmd` (a gateway that must refuse to start) until it exits, within `limit`; its exit
/// status and output. Panics, after killing it, if it is still running then.
pub fn run_to_exit(cmd: Command, limit: Duration) -> (ExitStatus, String) {
    let mut process = ChildProcess::start(cmd);
    let Some(status) = process.wait(limit) else {
        let _ = process.child.kill();
        let _ = process.child.wait();
        panic!(
            "still running after {limit:?}, but expected to exit; output:\n{}",
            process.text()
        );
    };
    process.wait_output(Duration::from_secs(5));
    (status, process.text())
}

/// Waits for the listener and admin addresses in the start-up log, then until `/readyz`
/// answers with any status.
fn wait_ready(
    process: &mut ChildProcess,
    netns: Option<&Netns>,
) -> Result<(SocketAddr, SocketAddr), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut admin = None;
    loop {
        if let Some(status) = process.child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("it exited with {status}"));
        }
        let listener = first_field(&process.lines, "listener=");
        admin = admin.or_else(|| first_field(&process.lines, "admin="));
        if let (Some(addr), Some(admin)) = (listener, admin)
            && readyz_answers(admin, netns)
        {
            return Ok((addr, admin));
        }
        if Instant::now() >= deadline {
            return Err(match (listener, admin) {
                (None, _) | (_, None) => format!(
                    "no `listener=` and `admin=` start-up lines within {READY_TIMEOUT:?} (an \
                     admin listener is needed)"
                ),
                (Some(_), Some(admin)) => {
                    format!("GET /readyz on {admin} did not answer within {READY_TIMEOUT:?}")
                }
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `GET /readyz` gets an HTTP answer, whatever its status.
fn readyz_answers(admin: SocketAddr, netns: Option<&Netns>) -> bool {
    let ask = move || crate::http::get_once(admin, "/readyz", Duration::from_secs(2)).is_ok();
    match netns {
        None => ask(),
        Some(ns) => ns.run(ask).unwrap_or(false),
    }
}

/// The address of field `key` (`listener=`, not `https_listener=`) in the first line that
/// has one, in the text log or the JSON one (`"listener":"…"`).
fn first_field(lines: &Lines, key: &str) -> Option<SocketAddr> {
    let json = format!("\"{}\":\"", key.trim_end_matches('='));
    lines.lock().unwrap().iter().find_map(|line| {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix(key)?.parse().ok())
            .or_else(|| {
                let (_, rest) = line.split_once(&json)?;
                rest.split('"').next()?.parse().ok()
            })
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The time at the start of a text log line (`2026-12-02T05:20:02.829290Z  INFO …`, UTC, as
/// tracing-subscriber writes it), or `None`. The reading thread can run later than the process
/// wrote the line by tens of ms on a busy machine, which is more than some tests' margins
/// (the scenario's recovery schedule allows 20 ms).
fn logged_at(line: &str) -> Option<SystemTime> {
    let stamp = line.get(..line.find(|c: char| c.is_whitespace())?)?;
    let t = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339);
    t.ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::logged_at;

    #[test]
    fn a_log_lines_own_timestamp_is_read() {
        let at = |s| logged_at(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        // date -u -d 2026-12-02T05:20:02Z +%s
        assert_eq!(
            at("2026-12-02T05:20:02.829290Z  INFO gateway::proxy: proxy listening"),
            Some(Duration::new(1_796_188_802, 829_290_000))
        );
        assert_eq!(
            at("2024-02-29T23:59:59Z WARN x"),
            Some(Duration::from_secs(1_709_251_199))
        );
        assert_eq!(
            at("1970-01-01T00:00:00.5Z x"),
            Some(Duration::from_millis(500))
        );
        for no in [
            "{\"timestamp\":1}",
            "listening on 127.0.0.1:80",
            "2026-13-01T00:00:00Z x",
            "",
        ] {
            assert_eq!(at(no), None, "{no}");
        }
    }
}
