//! Why `gateway run` could not start serving: a listener, the access log, a worker thread.

use std::net::SocketAddr;

use thiserror::Error;

use crate::config::LogOutput;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}{}", bind_hint(*addr, source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the access log {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker thread {index}: {source}")]
    Worker {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// The access log could not be opened: its path as written (or `stdout`, `stderr`).
    pub(super) fn access_log(output: &LogOutput, source: std::io::Error) -> StartError {
        let path = match output {
            LogOutput::File(p) => p.display().to_string(),
            other => format!("{other:?}").to_lowercase(),
        };
        StartError::AccessLog { path, source }
    }
}

/// What to do about a listener that could not be bound, for the errors whose cure is known.
fn bind_hint(addr: SocketAddr, e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) if addr.port() < 1024 => {
            "; a port below 1024 needs CAP_NET_BIND_SERVICE (the packaged unit grants it) or root"
        }
        Some(libc::EADDRNOTAVAIL) => {
            "; no interface of this host has that address (listen on 0.0.0.0 or [::] for every one)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_refused_for_a_known_cause_says_the_cure() {
        let bind = |addr: &str, errno| {
            StartError::Bind {
                addr: addr.parse().unwrap(),
                source: std::io::Error::from_raw_os_error(errno),
            }
            .to_string()
        };
        assert!(
            bind("0.0.0.0:81", libc::EACCES).ends_with(
                "; a port below 1024 needs CAP_NET_BIND_SERVICE (the packaged unit grants it) or root"
            ),
            "{}",
            bind("0.0.0.0:81", libc::EACCES)
        );
        assert!(bind("192.0.2.1:8080", libc::EADDRNOTAVAIL).contains("no interface of this host"));
        assert!(!bind("0.0.0.0:8080", libc::EACCES).contains(';'));
    }
}
