//! The listening sockets: for each configured client address one `SO_REUSEPORT` socket per
//! worker (each with its own accept queue), and the admin socket. A socket handed over by the
//! previous process in a binary upgrade (`service::handover`) is used instead of binding anew
//! where its address matches, so no connection is refused across the upgrade. One descriptor
//! of every socket is kept for the next handover. An address another socket already listens on
//! is refused ([`taken`]).

mod taken;

use std::net::SocketAddr;

use tokio::net::TcpListener;

use super::{StartError, headers::Scheme};
use crate::{
    config::Settings,
    service::handover::{Inherited, Role},
};

/// Listen backlog for client and admin sockets.
const LISTEN_BACKLOG: i32 = 1024;

/// A client socket and what it speaks.
pub(crate) type ClientSocket = (Scheme, std::net::TcpListener);

pub(crate) struct Listeners {
    /// Each worker's client sockets.
    pub per_worker: Vec<Vec<ClientSocket>>,
    /// The bound plain HTTP addresses (a configured port 0 shows the port chosen).
    pub listen: Vec<SocketAddr>,
    /// The bound HTTPS addresses.
    pub https: Vec<SocketAddr>,
    pub admin: Option<TcpListener>,
    /// One descriptor of every distinct listening socket, for a later handover.
    pub sockets: Vec<(Role, SocketAddr, std::net::TcpListener)>,
}

/// Binds (or inherits) every listening socket of `settings` for `n` workers.
pub(crate) fn open(
    settings: &Settings,
    n: usize,
    inherited: &mut Inherited,
) -> Result<Listeners, StartError> {
    let mut l = Listeners {
        per_worker: (0..n).map(|_| Vec::new()).collect(),
        listen: Vec::new(),
        https: Vec::new(),
        admin: None,
        sockets: Vec::new(),
    };
    let https = settings.https.as_ref().map_or(&[][..], |h| &h.listen[..]);
    // A binary upgrade's new process: the sockets handed over still listen (here and in the
    // old process), and a new address beside them (`0.0.0.0:P` for `127.0.0.1:P`) is theirs.
    let upgrade = !inherited.is_empty();
    let all: Vec<_> = (settings.listen.iter().map(|a| (Role::Client, *a)))
        .chain(https.iter().map(|a| (Role::Https, *a)))
        .map(|(role, addr)| (role, addr, inherited.take(role, addr)))
        .collect();
    let admin = settings
        .admin
        .map(|a| (a, inherited.take(Role::Admin, a).pop()));
    // Each address bound anew is checked before any is bound: the gateway's own sockets may
    // overlap (`0.0.0.0:P` and `127.0.0.1:P`), as they always could. Not in an upgrade.
    let fresh = all
        .iter()
        .filter(|(_, _, handed)| handed.is_empty())
        .map(|(_, addr, _)| *addr)
        .chain(admin.iter().filter(|(_, s)| s.is_none()).map(|(a, _)| *a));
    for addr in fresh.filter(|a| a.port() != 0 && !upgrade) {
        taken::check(addr).map_err(|source| StartError::Bind { addr, source })?;
    }
    for (role, addr, handed) in all {
        let actual = if handed.is_empty() {
            l.bind_client(role, addr, n)?
        } else {
            l.take_client(role, addr, handed, n)?
        };
        match role {
            Role::Https => l.https.push(actual),
            _ => l.listen.push(actual),
        }
    }
    if let Some((a, handed)) = admin {
        let std_listener = match handed {
            Some(s) => s,
            None => bind(a, false)?,
        };
        l.sockets.push((Role::Admin, a, dup(&std_listener, a)?));
        l.admin = Some(
            TcpListener::from_std(std_listener)
                .map_err(|source| StartError::Bind { addr: a, source })?,
        );
    }
    inherited.close_unclaimed();
    Ok(l)
}

impl Listeners {
    /// A fresh socket per worker for `addr`; the address actually bound.
    fn bind_client(
        &mut self,
        role: Role,
        addr: SocketAddr,
        n: usize,
    ) -> Result<SocketAddr, StartError> {
        let scheme = scheme(role);
        let first = bind(addr, n > 1)?;
        let actual = first
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        self.sockets.push((role, addr, dup(&first, addr)?));
        self.per_worker[0].push((scheme, first));
        for w in self.per_worker.iter_mut().skip(1) {
            let s = bind(actual, true)?;
            self.sockets.push((role, addr, dup(&s, addr)?));
            w.push((scheme, s));
        }
        Ok(actual)
    }

    /// The sockets handed over for `addr`: every worker accepts on every handed-over socket it
    /// is given, and every socket has at least one worker (each has its own accept queue).
    fn take_client(
        &mut self,
        role: Role,
        addr: SocketAddr,
        handed: Vec<std::net::TcpListener>,
        n: usize,
    ) -> Result<SocketAddr, StartError> {
        let actual = handed[0]
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        for i in 0..n.max(handed.len()) {
            let s = dup(&handed[i % handed.len()], addr)?;
            self.per_worker[i % n].push((scheme(role), s));
        }
        for s in handed {
            self.sockets.push((role, addr, s));
        }
        Ok(actual)
    }
}

fn scheme(role: Role) -> Scheme {
    match role {
        Role::Https => Scheme::Https,
        _ => Scheme::Http,
    }
}

fn dup(l: &std::net::TcpListener, addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    l.try_clone()
        .map_err(|source| StartError::Bind { addr, source })
}

/// A TCP socket for `addr`, with `SO_REUSEADDR` (a restart binds beside connections in
/// `TIME_WAIT`), IPv6 only for an IPv6 address.
fn socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    Ok(s)
}

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<std::net::TcpListener, StartError> {
    let make = || -> std::io::Result<std::net::TcpListener> {
        let s = socket(addr)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(LISTEN_BACKLOG)?;
        Ok(s.into())
    };
    make().map_err(|source| StartError::Bind { addr, source })
}
