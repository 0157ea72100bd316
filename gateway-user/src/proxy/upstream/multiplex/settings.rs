//! An HTTP/2 upstream's own limit on concurrent streams (`SETTINGS_MAX_CONCURRENT_STREAMS`,
//! RFC 9113 section 6.5.2), read from the frames the upstream sends, under hyper, which keeps
//! it to itself.
//!
//! h2 keeps to the limit by queueing the streams above it inside the connection, where they
//! wait, unseen, with their response timeouts running: an upstream that allows one stream had
//! a burst of requests answered one by one on one connection and the later ones timed out
//! (false `504`s, and the endpoint called slow). Knowing the limit, the multiplexer gives each
//! connection no more streams than that, and opens more connections instead, as Envoy does.
//!
//! [`SettingsTap`] sits between the connection's socket (or its TLS session) and hyper and
//! follows the frame headers of what hyper reads: 9 bytes, then a payload it skips, except a
//! SETTINGS frame's, whose 6-byte entries it reads. Nothing is copied or held back.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

use super::freed::Freed;

/// `SETTINGS_MAX_CONCURRENT_STREAMS`.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;
/// No limit said (the initial value: unlimited).
const UNLIMITED: u32 = u32::MAX;

/// What an upstream said in its SETTINGS frames, for one connection.
pub(crate) struct PeerSettings {
    max_streams: AtomicU32,
    /// Its first SETTINGS frame (the server's connection preface) arrived, or the connection
    /// ended without one.
    first: AtomicBool,
    notify: Notify,
    /// The endpoint's requests waiting for a stream: woken when the limit rises.
    freed: Option<Arc<Freed>>,
}

impl PeerSettings {
    pub fn new() -> Self {
        PeerSettings {
            max_streams: AtomicU32::new(UNLIMITED),
            first: AtomicBool::new(false),
            notify: Notify::new(),
            freed: None,
        }
    }

    /// Settings of a connection of the endpoint whose waiting requests `freed` wakes.
    pub fn for_endpoint(freed: Arc<Freed>) -> Self {
        PeerSettings {
            freed: Some(freed),
            ..Self::new()
        }
    }

    /// Settings that are known already, with no limit (tests, where nothing answers).
    #[cfg(test)]
    pub fn unlimited() -> Self {
        let s = Self::new();
        s.first.store(true, Ordering::Release);
        s
    }

    /// The upstream's limit on streams per connection (`usize::MAX`: none said).
    pub fn max_streams(&self) -> usize {
        match self.max_streams.load(Ordering::Relaxed) {
            UNLIMITED => usize::MAX,
            n => n as usize,
        }
    }

    /// The upstream's first SETTINGS frame was read (or the connection ended before it).
    pub fn known(&self) -> bool {
        self.first.load(Ordering::Acquire)
    }

    /// Completes once [`PeerSettings::known`].
    pub async fn first(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.known() {
            return;
        }
        notified.await;
    }

    /// The upstream said `limit`: a higher one than before has room for requests waiting for
    /// a stream (an upstream that starts at a low limit and raises it once warm), which
    /// would otherwise wait for some other stream to end.
    fn set_max_streams(&self, limit: u32) {
        let before = self.max_streams.swap(limit, Ordering::Relaxed);
        if limit > before
            && self.known()
            && let Some(freed) = &self.freed
        {
            freed.notify();
        }
    }

    fn set_known(&self) {
        if !self.first.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }
}

/// Where the frame reader is in the stream of frames.
#[derive(Default)]
struct Frames {
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to come (after its head).
    left: u32,
    in_payload: bool,
    /// The current frame is a SETTINGS frame (not an ACK): its entries are read.
    settings: bool,
    entry: [u8; 6],
    entry_len: usize,
}

impl Frames {
    /// Follows `bytes`, the next ones the upstream sent, telling `s` what they set.
    fn feed(&mut self, mut bytes: &[u8], s: &PeerSettings) {
        while !bytes.is_empty() {
            if !self.in_payload {
                let n = (9 - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len == 9 {
                    self.head_len = 0;
                    let h = self.head;
                    self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    self.settings = h[3] == SETTINGS && h[4] & ACK == 0;
                    self.entry_len = 0;
                    self.in_payload = true;
                    self.end_of_payload(s);
                }
                continue;
            }
            let n = (self.left as usize).min(bytes.len());
            if self.settings {
                for &b in &bytes[..n] {
                    self.entry[self.entry_len] = b;
                    self.entry_len += 1;
                    if self.entry_len == 6 {
                        self.entry_len = 0;
                        let e = self.entry;
                        if u16::from_be_bytes([e[0], e[1]]) == MAX_CONCURRENT_STREAMS {
                            let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
                            s.set_max_streams(v);
                        }
                    }
                }
            }
            self.left -= n as u32;
            bytes = &bytes[n..];
            self.end_of_payload(s);
        }
    }

    fn end_of_payload(&mut self, s: &PeerSettings) {
        if self.in_payload && self.left == 0 {
            self.in_payload = false;
            if self.settings {
                s.set_known();
            }
        }
    }
}

/// An upstream connection's I/O, with its SETTINGS read as hyper reads them.
pub(crate) struct SettingsTap<I> {
    io: I,
    settings: Arc<PeerSettings>,
    frames: Frames,
}

impl<I> SettingsTap<I> {
    pub fn new(io: I, settings: Arc<PeerSettings>) -> Self {
        SettingsTap {
            io,
            settings,
            frames: Frames::default(),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SettingsTap<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.frames.feed(&buf.filled()[before..], &this.settings);
            }
            // The end, or a failure: nobody waits for a first SETTINGS that will not come.
            Poll::Ready(_) => this.settings.set_known(),
            Poll::Pending => {}
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SettingsTap<I> {
    crate::proxy::io::delegate_async_write!(io);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    fn entry(id: u16, v: u32) -> Vec<u8> {
        [id.to_be_bytes().as_slice(), v.to_be_bytes().as_slice()].concat()
    }

    /// A server's preface (SETTINGS with three entries), a SETTINGS ACK, a HEADERS and a DATA
    /// frame, then SETTINGS changing the limit.
    fn stream() -> Vec<u8> {
        let mut s = frame(
            SETTINGS,
            0,
            &[entry(0x4, 65535), entry(0x3, 7), entry(0x5, 16384)].concat(),
        );
        s.extend(frame(SETTINGS, ACK, &[]));
        s.extend(frame(0x1, 0x4, &[0x88]));
        // A DATA frame whose payload looks like a SETTINGS entry setting the limit to 1.
        s.extend(frame(0x0, 0x1, &entry(0x3, 1)));
        s.extend(frame(SETTINGS, 0, &entry(0x3, 2)));
        s
    }

    #[test]
    fn the_limit_is_read_whole_or_in_any_pieces() {
        let all = stream();
        let preface_len = 9 + 18;
        for piece in [all.len(), 1, 2, 5, 7, 9, 13] {
            let s = PeerSettings::new();
            let mut f = Frames::default();
            let mut fed = 0;
            for chunk in all.chunks(piece) {
                f.feed(chunk, &s);
                fed += chunk.len();
                if fed < preface_len {
                    assert!(!s.known(), "piece {piece}, {fed} bytes");
                } else if fed < all.len() {
                    assert!(s.known());
                    assert_eq!(s.max_streams(), 7, "piece {piece}, {fed} bytes");
                }
            }
            assert_eq!(s.max_streams(), 2, "piece {piece}");
        }
    }

    #[test]
    fn a_preface_without_the_setting_leaves_no_limit() {
        let s = PeerSettings::new();
        Frames::default().feed(&frame(SETTINGS, 0, &entry(0x4, 1 << 20)), &s);
        assert!(s.known());
        assert_eq!(s.max_streams(), usize::MAX);
        let s = PeerSettings::new();
        Frames::default().feed(&frame(SETTINGS, 0, &[]), &s);
        assert!(s.known());
    }

    /// A limit that rises wakes the endpoint's requests waiting for a stream; the first
    /// SETTINGS, and a limit that falls or stays, do not (the first one lists the connection,
    /// which wakes them itself).
    #[tokio::test]
    async fn a_rising_limit_wakes_the_requests_waiting_for_a_stream() {
        use std::time::Duration;
        let freed = Arc::new(Freed::default());
        let s = PeerSettings::for_endpoint(freed.clone());
        let mut f = Frames::default();
        let mut woken = |settings: &[u8]| {
            let w = freed.waiter();
            f.feed(&frame(SETTINGS, 0, settings), &s);
            async move {
                tokio::time::timeout(Duration::from_millis(50), w)
                    .await
                    .is_ok()
            }
        };
        assert!(!woken(&entry(0x3, 1)).await, "the first SETTINGS");
        assert!(!woken(&entry(0x3, 1)).await, "the same limit again");
        assert!(woken(&entry(0x3, 4)).await, "a limit from 1 to 4");
        assert!(!woken(&entry(0x3, 2)).await, "a limit from 4 to 2");
        assert!(!woken(&entry(0x4, 1 << 20)).await, "another setting");
        assert_eq!(s.max_streams(), 2);
    }

    #[tokio::test]
    async fn the_tap_reads_what_hyper_reads_and_passes_it_on() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut server, client) = tokio::io::duplex(1024);
        let s = Arc::new(PeerSettings::new());
        let mut tap = SettingsTap::new(client, s.clone());
        let bytes = stream();
        server.write_all(&bytes).await.unwrap();
        drop(server);
        let mut got = Vec::new();
        tap.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, bytes);
        assert_eq!(s.max_streams(), 2);
        s.first().await;
    }
}
