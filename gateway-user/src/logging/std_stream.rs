//! stdout and stderr as the log's and the access log's writer threads write them: straight to
//! the descriptor, waiting for room when it has none.
//!
//! A descriptor's `O_NONBLOCK` belongs to the open pipe or terminal, shared by every process
//! that holds it: one that sets it (a Node.js process on the same terminal, a supervisor's
//! log pipe set up non-blocking) sets it for the gateway too. Then a write to a full pipe
//! fails at once with `EAGAIN`, where it would have waited, and std's `write_all` gives up:
//! the writer counted each such batch as lost (`write_error`) though the pipe would have taken
//! it a moment later. A writer thread is there to wait, so it waits for room (`poll`).

use std::{
    io::{self, Write},
    os::fd::RawFd,
};

/// The most bytes a pipe takes in one write, whole (Linux's `PIPE_BUF`): lines gathered into
/// writes of at most this much, cut between lines, never interleave with another writer's.
pub const PIPE_BUF: usize = 4096;

/// stdout or stderr, unbuffered.
pub struct StdStream {
    fd: RawFd,
}

impl StdStream {
    pub fn stdout() -> StdStream {
        StdStream {
            fd: libc::STDOUT_FILENO,
        }
    }

    pub fn stderr() -> StdStream {
        StdStream {
            fd: libc::STDERR_FILENO,
        }
    }
}

impl Write for StdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: write(2) from a live buffer of its length, to a descriptor the process
            // holds open for its life.
            let n = unsafe { libc::write(self.fd, buf.as_ptr().cast(), buf.len()) };
            if let Ok(n) = usize::try_from(n) {
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => wait_writable(self.fd),
                _ => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Until `fd` takes bytes again (or reports an error, which the next write returns).
fn wait_writable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives across the call. A signal's EINTR returns
    // early, and the write is tried again.
    unsafe { libc::poll(&mut p, 1, -1) };
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, os::fd::AsRawFd as _};

    use super::*;

    #[test]
    fn a_full_non_blocking_pipe_is_waited_for_not_an_error() {
        let (mut rx, tx) = std::io::pipe().unwrap();
        let fd = tx.as_raw_fd();
        // SAFETY: fcntl on a descriptor this test owns.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
        }
        // Four times a default pipe's 64 KiB, read a while after the pipe is full.
        let data = vec![b'x'; 256 * 1024];
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut got = Vec::new();
            rx.read_to_end(&mut got).unwrap();
            got.len()
        });
        let mut out = StdStream { fd };
        out.write_all(&data).expect("waits for room");
        drop(tx);
        assert_eq!(reader.join().unwrap(), data.len());
    }
}
