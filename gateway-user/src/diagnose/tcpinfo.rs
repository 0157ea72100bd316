//! `getsockopt(IPPROTO_TCP, TCP_INFO)` on a probe's own socket: what the kernel tells any
//! process about its connections, with no privileges. It fills in for the eBPF observer when
//! kernel signals are off, and says whether request bytes were ACKed while a connection is
//! open (the observer only writes its per-connection record on a retransmit or at close).
//!
//! The layout is `struct tcp_info` of include/uapi/linux/tcp.h up to `tcpi_total_rto_time`
//! (Linux 6.7). The kernel copies `min(len, its size)` bytes and reports how many, so fields
//! past what an older kernel knows are marked absent, never read as zero.

use std::{mem, os::fd::RawFd};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
    busy_time: u64,
    rwnd_limited: u64,
    sndbuf_limited: u64,
    delivered: u32,
    delivered_ce: u32,
    bytes_sent: u64,
    bytes_retrans: u64,
    dsack_dups: u32,
    reord_seen: u32,
    rcv_ooopack: u32,
    snd_wnd: u32,
    rcv_wnd: u32,
    rehash: u32,
    total_rto: u16,
    total_rto_recoveries: u16,
    total_rto_time: u32,
}

const _: () = assert!(mem::size_of::<RawTcpInfo>() == 248);
const BYTES_ACKED_END: usize = mem::offset_of!(RawTcpInfo, bytes_received);
const BYTES_RECEIVED_END: usize = mem::offset_of!(RawTcpInfo, segs_out);
const TOTAL_RTO_END: usize = mem::offset_of!(RawTcpInfo, total_rto_recoveries);
const BYTES_RETRANS_END: usize = mem::offset_of!(RawTcpInfo, dsack_dups);

/// The fields the probes use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    /// `enum tcp_state`: 1 = ESTABLISHED, 2 = SYN_SENT, …
    pub state: u8,
    /// RTOs that fired since the peer last ACKed new data (`icsk_retransmits`, which
    /// `tcp_ack()` clears whenever `snd_una` advances): above 0, the connection is stalled now.
    pub unrecovered_rtos: u8,
    /// The retransmission timeout now, µs (`tcpi_rto`): doubled at each RTO until new data
    /// is ACKed.
    pub rto_us: u32,
    /// Segments retransmitted over the socket's life, SYNs included
    /// (`__tcp_retransmit_skb()` counts every retransmit).
    pub total_retrans: u32,
    /// Bytes of ours the peer ACKed; the SYN counts as one (`tcp_snd_una_update()`).
    pub bytes_acked: Option<u64>,
    /// Bytes received from the peer (`tcp_rcv_nxt_update()`).
    pub bytes_received: Option<u64>,
    /// RTOs over the socket's life, SYN timeouts included (Linux 6.7+).
    pub total_rto: Option<u16>,
    /// Smoothed RTT, µs.
    pub rtt_us: u32,
    /// Segments sent and not yet ACKed (`tcpi_unacked`, `packets_out`).
    pub unacked: u32,
    /// Data bytes sent, retransmits included, and those retransmitted (Linux 4.19+).
    pub bytes_sent: Option<u64>,
    pub bytes_retrans: Option<u64>,
}

impl TcpInfo {
    /// Data bytes sent and not yet ACKed (the observer's `snd_nxt - snd_una`), when the kernel
    /// reports enough to tell.
    pub fn unacked_bytes(&self) -> Option<u64> {
        if self.unacked == 0 {
            return Some(0);
        }
        // bytes_acked counts the SYN; bytes_sent counts each retransmit again.
        let sent_once = self.bytes_sent?.checked_sub(self.bytes_retrans?)?;
        Some(sent_once.saturating_sub(self.bytes_acked?.saturating_sub(1)))
    }
}

pub const TCP_SYN_SENT: u8 = 2;

/// Reads `TCP_INFO` of `fd`.
pub fn read(fd: RawFd) -> Option<TcpInfo> {
    let mut raw = RawTcpInfo::default();
    let mut len = mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: raw is a writable buffer of `len` bytes; the kernel writes at most that many.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut raw).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let len = len as usize;
    Some(TcpInfo {
        state: raw.state,
        unrecovered_rtos: raw.retransmits,
        rto_us: raw.rto,
        total_retrans: raw.total_retrans,
        bytes_acked: (len >= BYTES_ACKED_END).then_some(raw.bytes_acked),
        bytes_received: (len >= BYTES_RECEIVED_END).then_some(raw.bytes_received),
        total_rto: (len >= TOTAL_RTO_END).then_some(raw.total_rto),
        rtt_us: raw.rtt,
        unacked: raw.unacked,
        bytes_sent: (len >= BYTES_RETRANS_END).then_some(raw.bytes_sent),
        bytes_retrans: (len >= BYTES_RETRANS_END).then_some(raw.bytes_retrans),
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd as _,
    };

    use super::*;

    #[test]
    fn loopback_bytes_are_acked_and_nothing_is_retransmitted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let before = read(client.as_raw_fd()).unwrap();
        assert_eq!(before.state, 1, "ESTABLISHED");
        client.write_all(b"hello").unwrap();
        let mut after = read(client.as_raw_fd()).unwrap();
        for _ in 0..100 {
            if after.bytes_acked >= before.bytes_acked.map(|b| b + 5) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            after = read(client.as_raw_fd()).unwrap();
        }
        assert_eq!(
            after.bytes_acked.unwrap() - before.bytes_acked.unwrap(),
            5,
            "{before:?} {after:?}"
        );
        assert_eq!(after.total_retrans, 0);
        assert_eq!(after.unacked_bytes(), Some(0));
    }

    #[test]
    fn unacked_bytes_are_those_sent_once_less_those_acked() {
        let i = TcpInfo {
            state: 1,
            unrecovered_rtos: 0,
            rto_us: 200_000,
            total_retrans: 1,
            bytes_acked: Some(1 + 300),
            bytes_received: Some(0),
            total_rto: Some(1),
            rtt_us: 100,
            unacked: 1,
            bytes_sent: Some(517 + 217),
            bytes_retrans: Some(217),
        };
        assert_eq!(i.unacked_bytes(), Some(217));
        let old_kernel = TcpInfo {
            bytes_sent: None,
            ..i
        };
        assert_eq!(old_kernel.unacked_bytes(), None);
    }
}
