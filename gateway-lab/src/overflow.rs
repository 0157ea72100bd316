//! Accept-queue overflow: a listener with backlog 0 that never calls `accept()`, filled from
//! inside the upstream namespace until it takes no more connections. From then on the listener
//! drops every new SYN (`tcp_conn_request` in `net/ipv4/tcp_input.c`: `sk_acceptq_is_full` →
//! `LINUX_MIB_LISTENOVERFLOWS`, drop), so a client sees a connect that retransmits SYNs exactly
//! like a SYN blackhole, while the upstream namespace's `TcpExtListenOverflows` counts the drops.
//!
//! The filler connections come from the upstream namespace itself (over its loopback route), so
//! they do not show up in the client namespace's counters.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use super::{
    error::{LabError, LabResult},
    netns::Netns,
    registry::{Background, Registry},
};

/// How long a filler connect may take before the queue counts as full. A handshake within one
/// namespace takes microseconds; the first SYN retransmit would only come after 1 s.
const FILL_PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// At most this many connects per listener while filling (backlog 0 takes 1).
const MAX_FILL_ATTEMPTS: usize = 16;

/// A listener whose accept queue is full. Dropping it (or the lab) closes the listener and the
/// filler connections.
pub struct AcceptQueueOverflow {
    state: Arc<OverflowState>,
    addrs: Vec<SocketAddr>,
    filled: usize,
    detached: bool,
}

struct OverflowState {
    sockets: Mutex<Option<Vec<Socket>>>,
}

impl Background for OverflowState {
    fn stop(&self) {
        self.sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn is_stopped(&self) -> bool {
        self.sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

impl AcceptQueueOverflow {
    pub(crate) fn start(
        netns: &Netns,
        addrs: &[SocketAddr],
        registry: &Registry,
    ) -> LabResult<Self> {
        let (sockets, filled) = netns.run(|| {
            let mut sockets = Vec::new();
            let mut filled = 0;
            for &addr in addrs {
                let (listener, fillers) = fill(addr, netns.name())?;
                filled += fillers.len();
                sockets.push(listener);
                sockets.extend(fillers);
            }
            Ok::<_, LabError>((sockets, filled))
        })??;
        let state = Arc::new(OverflowState {
            sockets: Mutex::new(Some(sockets)),
        });
        registry.register(Arc::clone(&state) as Arc<dyn Background>);
        Ok(Self {
            state,
            addrs: addrs.to_vec(),
            filled,
            detached: false,
        })
    }

    /// The listening addresses (v4 and v6).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Connections sitting in the accept queues.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Keeps the full listener until the lab is dropped.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for AcceptQueueOverflow {
    fn drop(&mut self) {
        if !self.detached {
            self.state.stop();
        }
    }
}

/// Listens on `addr` with backlog 0 and connects to it until a connect hangs.
fn fill(addr: SocketAddr, netns: &str) -> LabResult<(Socket, Vec<Socket>)> {
    let err = |action| {
        move |source| LabError::Socket {
            action,
            netns: netns.to_owned(),
            addr,
            source,
        }
    };
    let new_socket = || Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP));
    let listener = new_socket().map_err(err("creating a listener for"))?;
    listener
        .set_reuse_address(true)
        .map_err(err("configuring"))?;
    listener.bind(&addr.into()).map_err(err("binding"))?;
    listener.listen(0).map_err(err("listening on"))?;

    let mut fillers = Vec::new();
    for _ in 0..MAX_FILL_ATTEMPTS {
        let socket = new_socket().map_err(err("creating a filler for"))?;
        socket.set_nonblocking(true).map_err(err("configuring"))?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(err("filling")(e)),
        }
        if connected_within(&socket, FILL_PROBE_TIMEOUT) {
            fillers.push(socket);
        } else if !fillers.is_empty() {
            // The SYN was dropped: the queue is full. Closing a SYN_SENT socket sends nothing.
            return Ok((listener, fillers));
        }
    }
    Err(LabError::OverflowNotReached {
        netns: netns.to_owned(),
        addr,
        attempts: MAX_FILL_ATTEMPTS,
    })
}

fn connected_within(socket: &Socket, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
    ready == 1 && pfd.revents & libc::POLLOUT != 0 && matches!(socket.take_error(), Ok(None))
}
