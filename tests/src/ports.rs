//! Loopback ports a test needs: one that was free a moment ago, for a listener the test
//! configures by number, and one where nothing listens, so that a connect is refused (RST).

use std::net::{SocketAddr, TcpListener};

/// A port on 127.0.0.1 where nothing listens: connects are refused. (Bound to port 0 and
/// released, so the kernel will not hand it out again soon.)
pub fn refused_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
}

/// A loopback port that was free a moment ago, for a listener configured by number.
pub fn free_port() -> u16 {
    refused_addr().port()
}
