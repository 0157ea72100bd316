//! Zero-downtime binary upgrade by handing the listening sockets over, as nginx does on
//! SIGUSR2: the running gateway starts the binary found at its own path now (the new one, after
//! a package upgrade) with the same arguments, and passes it every listening socket it has.
//! Both processes accept from the same sockets, hence the same accept queues, while the new one
//! starts; once it says it is ready, the old one stops accepting and drains. No connection
//! waiting in a queue is lost, which closing a socket of an `SO_REUSEPORT` group would do, and
//! the listeners never go away, so clients see no refusal.
//!
//! The protocol, over the environment and one pipe:
//!
//! - `GATEWAY_LISTEN_FDS=3:client:127.0.0.1:8080,4:client:127.0.0.1:8080,5:admin:127.0.0.1:9901`
//!   names each inherited descriptor, its role and the address it was configured as (which
//!   may be a `:0` port: the socket keeps its real one). The new process matches them to its
//!   own config by that address; a socket for an address no longer configured is closed.
//! - `GATEWAY_UPGRADE_READY_FD=N`: the new process writes `ready <pid>\n` there once it
//!   serves, after it told systemd `MAINPID=<pid>` and `READY=1` (the unit has
//!   `NotifyAccess=all` for this). EOF without it means it failed; the old one keeps serving.

use std::{
    collections::HashMap,
    ffi::OsString,
    fs::File,
    io::{self, Write as _},
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use thiserror::Error;
use tokio::io::AsyncReadExt as _;
use tracing::{info, warn};

pub const ENV_LISTEN_FDS: &str = "GATEWAY_LISTEN_FDS";
pub const ENV_READY_FD: &str = "GATEWAY_UPGRADE_READY_FD";

/// How long the new process may take to start serving before the upgrade is called off.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a listening socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    /// The HTTPS listener (`https_port`, `https_listen`).
    Https,
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Https => "https",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "client" => Some(Role::Client),
            "https" => Some(Role::Https),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// One listening socket to hand over: its role, the address it was configured as, and a
/// descriptor of it.
pub struct Offered<'a> {
    pub role: Role,
    pub configured: SocketAddr,
    pub socket: &'a std::net::TcpListener,
}

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("{ENV_LISTEN_FDS} entry {entry:?} is malformed: {reason}")]
    Malformed { entry: String, reason: &'static str },
    #[error("inherited descriptor {fd} ({role} {addr}) is not a listening TCP socket: {reason}")]
    NotAListener {
        fd: RawFd,
        role: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{ENV_READY_FD}={value:?} is not the readiness pipe of an upgrade: {reason} (the variable is the gateway's own, set for the new process of a SIGUSR2 upgrade; unset it)"
    )]
    NotAReadyPipe { value: String, reason: String },
}

/// Listening sockets handed over by the previous process, by role and configured address.
#[derive(Default)]
pub struct Inherited {
    sockets: HashMap<(Role, SocketAddr), Vec<std::net::TcpListener>>,
    /// The pipe on which this process tells the one that started it (an upgrade) it serves.
    ready: Option<File>,
}

impl Inherited {
    /// Takes the sockets this process inherited, if it was started by an upgrade, and removes
    /// the variable so that nothing it starts inherits the claim. Call before any other thread
    /// exists (it changes the environment).
    pub fn from_env() -> Result<Inherited, HandoverError> {
        let ready = ready_pipe()?;
        let Some(spec) = std::env::var_os(ENV_LISTEN_FDS) else {
            return Ok(Inherited {
                ready,
                ..Inherited::default()
            });
        };
        // SAFETY: called at start-up, before any other thread exists (see above).
        unsafe { std::env::remove_var(ENV_LISTEN_FDS) };
        let spec = spec.to_string_lossy();
        let mut sockets: HashMap<_, Vec<_>> = HashMap::new();
        for entry in spec.split(',').filter(|e| !e.is_empty()) {
            let (fd, role, addr) = parse_entry(entry)?;
            let socket = adopt(fd, role, addr)?;
            sockets.entry((role, addr)).or_default().push(socket);
        }
        Ok(Inherited { sockets, ready })
    }

    /// In the new process of an upgrade: tells the old one it serves, and logs it. Does
    /// nothing on a normal start. Call once, after serving has started.
    pub fn announce_ready(&mut self) -> io::Result<()> {
        let Some(mut pipe) = self.ready.take() else {
            return Ok(());
        };
        writeln!(pipe, "ready {}", std::process::id())?;
        info!(
            pid = std::process::id(),
            "took over the listening sockets; serving"
        );
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.values().all(Vec::is_empty)
    }

    /// The sockets inherited for `role` at configured address `addr` (empty if none).
    pub fn take(&mut self, role: Role, addr: SocketAddr) -> Vec<std::net::TcpListener> {
        self.sockets.remove(&(role, addr)).unwrap_or_default()
    }

    /// Closes what no configured address claimed, saying so.
    pub fn close_unclaimed(&mut self) {
        for ((role, addr), sockets) in self.sockets.drain() {
            if !sockets.is_empty() {
                warn!(role = role.as_str(), configured = %addr, sockets = sockets.len(), "inherited listener not in the new config; closed (connections queued on it are reset)");
            }
        }
    }
}

fn parse_entry(entry: &str) -> Result<(RawFd, Role, SocketAddr), HandoverError> {
    let bad = |reason| HandoverError::Malformed {
        entry: entry.to_owned(),
        reason,
    };
    let mut parts = entry.splitn(3, ':');
    let fd = parts
        .next()
        .and_then(|f| f.parse::<RawFd>().ok())
        .filter(|f| *f > 2)
        .ok_or_else(|| bad("the descriptor must be a number above 2"))?;
    let role = parts
        .next()
        .and_then(Role::parse)
        .ok_or_else(|| bad("the role must be `client` or `admin`"))?;
    let addr = parts
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad("the address must be ip:port"))?;
    Ok((fd, role, addr))
}

fn sockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out-parameters of the right size.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut v).cast(), &mut len) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Checks that `fd` is a listening TCP socket, marks it close-on-exec and takes ownership.
fn adopt(fd: RawFd, role: Role, addr: SocketAddr) -> Result<std::net::TcpListener, HandoverError> {
    let not = |reason: String| HandoverError::NotAListener {
        fd,
        role: role.as_str(),
        addr,
        reason,
    };
    let listening =
        sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(|e| not(e.to_string()))?;
    let kind = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| not(e.to_string()))?;
    if listening != 1 || kind != libc::SOCK_STREAM {
        return Err(not("not listening, or not a stream socket".into()));
    }
    // SAFETY: fd is an open socket (getsockopt succeeded) handed to this process alone.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: as above; from here on this process owns it.
    let socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    socket
        .set_nonblocking(true)
        .map_err(|source| HandoverError::Io {
            what: "making an inherited listener non-blocking",
            source,
        })?;
    Ok(socket)
}

/// `fd` duplicated without close-on-exec, for a child to inherit.
fn inheritable(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup(2) of a descriptor we hold; the result is owned below.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: dup is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// The new process, started and not yet ready.
pub struct Successor {
    pub child: tokio::process::Child,
    ready: tokio::fs::File,
    /// [`READY_TIMEOUT`] after it started: kept here, since the wait is started again after
    /// every other signal the serving loop handles meanwhile.
    deadline: tokio::time::Instant,
    /// What the pipe said so far.
    line: Vec<u8>,
    /// A SIGHUP came while it started: it may have read the config before the change.
    reload_asked: bool,
}

/// How starting the new process ended.
pub enum Outcome {
    Ready { pid: u32 },
    Failed(String),
}

/// This process's command line, read at start-up: what the new process is started with.
#[derive(Clone, Debug)]
pub struct Relaunch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Relaunch {
    /// The executable's path as it is now (a package upgrade replaces the file at that path)
    /// and the arguments this process got.
    pub fn current() -> io::Result<Relaunch> {
        Ok(Relaunch {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Starts the new binary with every offered socket.
pub fn spawn(relaunch: &Relaunch, offered: &[Offered<'_>]) -> Result<Successor, HandoverError> {
    let io = |what| move |source| HandoverError::Io { what, source };
    let mut keep = Vec::with_capacity(offered.len() + 1);
    let mut spec = Vec::with_capacity(offered.len());
    for o in offered {
        let fd = inheritable(o.socket.as_raw_fd()).map_err(io("duplicating a listener"))?;
        spec.push(format!(
            "{}:{}:{}",
            fd.as_raw_fd(),
            o.role.as_str(),
            o.configured
        ));
        keep.push(fd);
    }
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(HandoverError::Io {
            what: "creating the readiness pipe",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: both are fresh descriptors from pipe2, owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write = inheritable(write.as_raw_fd()).map_err(io("duplicating the readiness pipe"))?;
    let child = tokio::process::Command::new(&relaunch.exe)
        .args(&relaunch.args)
        .env(ENV_LISTEN_FDS, spec.join(","))
        .env(ENV_READY_FD, write.as_raw_fd().to_string())
        // systemd's watchdog applies to whichever process is the main one; the new one
        // becomes it (sd_watchdog_enabled() would refuse a WATCHDOG_PID that is not its own).
        .env_remove("WATCHDOG_PID")
        .spawn()
        .map_err(io("starting the new gateway binary"))?;
    // Our copies of the inheritable descriptors close here; the child has its own.
    drop(keep);
    drop(write);
    Ok(Successor {
        child,
        ready: tokio::fs::File::from_std(File::from(read)),
        deadline: tokio::time::Instant::now() + READY_TIMEOUT,
        line: Vec::new(),
        reload_asked: false,
    })
}

impl Successor {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// This process reloaded while the new one was starting (a `systemctl reload` during a
    /// package upgrade): the new one may have read the config before it changed, so it gets
    /// a SIGHUP of its own once it serves (before, its handlers are not there yet, and a
    /// SIGHUP would end it). Otherwise it served the old config on, saying nothing.
    pub fn reload_when_serving(&mut self) {
        self.reload_asked = true;
    }

    /// Sends the SIGHUP a reload during the upgrade asked for, to the child this process
    /// started, once it said it serves as `pid`: never to a pid the pipe alone named (`0` would
    /// be this process's group, `-1` every process).
    fn pass_on_reload(&self, pid: u32) {
        let child = self.child.id().and_then(|c| libc::pid_t::try_from(c).ok());
        let Some(child) = child.filter(|c| *c > 0 && c.cast_unsigned() == pid) else {
            warn!(pid, child = ?self.child.id(), "a SIGHUP came while the new process started, and it said another pid than the one started: not passed on; reload it");
            return;
        };
        // SAFETY: kill(2) on the positive pid of the child this process started and has not
        // reaped (it serves), which names that one process.
        if unsafe { libc::kill(child, libc::SIGHUP) } == 0 {
            info!(
                pid,
                "a SIGHUP came while the new process started: passed on to it"
            );
        } else {
            let e = io::Error::last_os_error();
            warn!(pid, error = %e, "a SIGHUP came while the new process started, and could not be passed on: reload it");
        }
    }

    /// This process stops while the new one was starting: stops it, unless it serves. It may
    /// have told systemd it is the main process just before it said so on the pipe; then it
    /// serves on, and only this one stops.
    pub async fn stop_unless_serving(mut self) {
        let said = tokio::time::timeout(Duration::from_millis(100), self.wait_ready()).await;
        if let Ok(Outcome::Ready { pid }) = said {
            warn!(
                pid,
                "stopping during an upgrade whose new process serves: it serves on"
            );
            return;
        }
        warn!(
            pid = self.pid(),
            "stopping during an upgrade: stopped the new process, which had not taken over"
        );
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for `ready <pid>`, the pipe's EOF (the child failed), or [`READY_TIMEOUT`] after
    /// it started. Cancel-safe: what was read is kept for the next call.
    pub async fn wait_ready(&mut self) -> Outcome {
        let line = &mut self.line;
        let ready = &mut self.ready;
        let read = tokio::time::timeout_at(self.deadline, async {
            let mut buf = [0u8; 64];
            loop {
                match ready.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        line.extend_from_slice(&buf[..n]);
                        if line.contains(&b'\n') {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        })
        .await;
        let line = &self.line;
        let text = String::from_utf8_lossy(line);
        if let Some(pid) = text
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse::<u32>().ok())
        {
            if std::mem::take(&mut self.reload_asked) {
                self.pass_on_reload(pid);
            }
            return Outcome::Ready { pid };
        }
        if read.is_err() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
            return Outcome::Failed(format!(
                "the new process did not become ready within {} s; stopped it",
                READY_TIMEOUT.as_secs()
            ));
        }
        match self.child.wait().await {
            Ok(status) => Outcome::Failed(format!(
                "the new process exited with {status} before it was ready"
            )),
            Err(e) => Outcome::Failed(format!("the new process closed its readiness pipe: {e}")),
        }
    }
}

/// The readiness pipe an upgrade's old process passed (`GATEWAY_UPGRADE_READY_FD`), taken at
/// start, before this process opens anything that could reuse a wrong number: a descriptor
/// that is no pipe is refused, where writing to it later closed a listener, or aborted the
/// process (a descriptor Rust already owned).
fn ready_pipe() -> Result<Option<File>, HandoverError> {
    let Some(value) = std::env::var_os(ENV_READY_FD) else {
        return Ok(None);
    };
    let not = |reason: &str| HandoverError::NotAReadyPipe {
        value: value.to_string_lossy().into_owned(),
        reason: reason.to_owned(),
    };
    let fd: RawFd = value
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|f| *f > 2)
        .ok_or_else(|| not("not a descriptor number above 2"))?;
    // SAFETY: fstat(2) into a zeroed struct of the right size; fd is only a number here.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(not(&io::Error::last_os_error().to_string()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(not("the descriptor is open, but not a pipe"));
    }
    // SAFETY: fcntl(2) on a descriptor fstat found open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_WRONLY {
        return Err(not(
            "the descriptor is a pipe's read end, not its write end",
        ));
    }
    // SAFETY: as above; nothing this process starts inherits it.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(not(&io::Error::last_os_error().to_string()));
    }
    // SAFETY: an open pipe's write end, inherited for exactly this. Nothing else in the process
    // owns it: this runs once, at start, while the process holds no descriptor of its own.
    Ok(Some(unsafe { File::from_raw_fd(fd) }))
}

/// Whether this process was started by an upgrade (and so must not send `READY=1` before it
/// serves, nor treat the unit's `WATCHDOG_PID` as someone else's).
pub fn is_successor() -> bool {
    std::env::var_os(ENV_READY_FD).is_some()
}

#[cfg(test)]
mod tests;
